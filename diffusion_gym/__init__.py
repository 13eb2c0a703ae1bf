"""diffusion-gym: RL fine-tuning of diffusion models as a Gymnasium problem.

``import diffusion_gym`` registers ``DiffusionDenoise-v0``::

    import gymnasium as gym
    import diffusion_gym  # noqa: F401

    env = gym.make("DiffusionDenoise-v0", window="hrf-d", reward="jpeg_incompressibility")
    envs = gym.make_vec("DiffusionDenoise-v0", num_envs=16, vectorization_mode="vector_entry_point")
"""

from gymnasium.envs.registration import register, registry

__version__ = "0.1.0"

ENV_ID = "DiffusionDenoise-v0"

if ENV_ID not in registry:
    register(
        id=ENV_ID,
        entry_point="diffusion_gym.envs.denoise:DiffusionDenoiseEnv",
        vector_entry_point="diffusion_gym.envs.denoise:DiffusionDenoiseVectorEnv",
    )
