"""Stable-Baselines3 on ``DiffusionDenoise-v0``: a ``VecEnv`` adapter and the UNet actor-critic policy.

::

    from stable_baselines3 import PPO
    from agents.sb3 import DiffusionActorCriticPolicy, DiffusionVecEnv

    venv = DiffusionVecEnv(num_envs=32, window="full", reward="jpeg_compressibility")
    model = PPO(DiffusionActorCriticPolicy, venv, policy_kwargs=venv.policy_kwargs(), gamma=1.0)
    model.learn(total_timesteps=32 * 80)

See ``examples/sb3_ppo.py`` for settings that learn on the embedded model in minutes.
"""

from diffusion_gym.extras import require

require("stable_baselines3", "sb3", "agents.sb3 (the Stable-Baselines3 adapter)")

from .policy import DiffusionActorCriticPolicy, PixelMeanGaussian, ValueNet, WarmupSchedule  # noqa: E402
from .vec_env import DiffusionVecEnv, GroupStandardizedReward  # noqa: E402

__all__ = [
    "DiffusionActorCriticPolicy",
    "DiffusionVecEnv",
    "GroupStandardizedReward",
    "PixelMeanGaussian",
    "ValueNet",
    "WarmupSchedule",
]
