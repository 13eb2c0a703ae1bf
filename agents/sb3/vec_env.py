"""Stable-Baselines3 ``VecEnv`` over the native torch vector env, and group-standardised rewards.

SB3 speaks its own vectorised API (``reset() -> obs``, ``step_async`` / ``step_wait`` with numpy
arrays and a list of info dicts), not Gymnasium's ``VectorEnv``. :class:`DiffusionVecEnv` puts that
API in front of :class:`~diffusion_gym.envs.DiffusionDenoiseVectorEnv` *without* splitting it into
``num_envs`` single envs: the batch stays one tensor on the env's device, the UNet-free env step runs
batched there, and numpy appears only at the boundary SB3 requires (observations out, actions in).
Per step that is one device→host copy of the images, one of the small integer fields (stacked) and,
at terminal steps only, one of the rewards; ``benchmarks/sb3_roundtrip.py`` measures the cost.

:class:`GroupStandardizedReward` replaces each finished episode's reward by its standardisation
within its group (the episodes started from the same reference image, HRF §4.2) — the advantage
baseline of our PPO-IS, offered to SB3 algorithms as a reward transformation.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvObs, VecEnvStepReturn

from agents.common.advantages import group_standardize
from diffusion_gym.envs import DiffusionDenoiseVectorEnv

_INT_FIELDS = ("c", "t")
_INFO_FIELDS = ("start_step", "step_index", "group")


class DiffusionVecEnv(VecEnv):
    """An SB3 ``VecEnv`` in front of a :class:`~diffusion_gym.envs.DiffusionDenoiseVectorEnv`.

    Observations are dicts of numpy arrays ``{"c": (n,) int64, "t": (n,) int64, "x_t": (n, C, H, W)
    float32}``; actions a ``(n, C, H, W)`` (or ``(n, C·H·W)``) float array. Episodes that end are reset
    in the same step (SB3's convention): the returned observation is the new episode's, the finished
    one is in ``infos[i]["terminal_observation"]``, and ``infos[i]`` describes the finished episode
    (``start_step``, ``step_index``, ``group``, ``raw_reward``) while ``reset_infos[i]`` describes the
    new one. Episodes are never truncated.

    Args:
        env: the native vector env (or a Gymnasium wrapper around one, e.g. from ``gym.make_vec``).
            ``None`` builds one from ``env_kwargs``.
        **env_kwargs: arguments of :class:`~diffusion_gym.envs.DiffusionDenoiseVectorEnv` (``num_envs``,
            ``window``, ``reward``, ``device``…) when ``env`` is ``None``.

    Raises:
        TypeError: if ``env`` is not a ``DiffusionDenoiseVectorEnv``.
        ValueError: if both ``env`` and ``env_kwargs`` are given.
    """

    def __init__(self, env: gym.vector.VectorEnv | None = None, **env_kwargs: Any) -> None:
        if env is None:
            env = DiffusionDenoiseVectorEnv(**env_kwargs)
        elif env_kwargs:
            raise ValueError(f"pass either an env or env keyword arguments, not both (got {sorted(env_kwargs)})")
        native = getattr(env, "unwrapped", env)
        if not isinstance(native, DiffusionDenoiseVectorEnv):
            raise TypeError(
                f"env must be a diffusion_gym DiffusionDenoiseVectorEnv (e.g. gym.make_vec('DiffusionDenoise-v0', "
                f"vectorization_mode='vector_entry_point')), got {type(native).__name__}"
            )
        self.env = native
        self.device = native.device
        self.render_mode = native.render_mode
        self._actions: torch.Tensor | None = None
        self._sample_shape = native.core.sample_shape
        super().__init__(native.num_envs, native.single_observation_space, native.single_action_space)

    # ------------------------------------------------------------------------------- SB3 API
    def reset(self) -> VecEnvObs:
        """Start a new batch of episodes (using the seed and options set by ``seed`` / ``set_options``)."""
        seed = self._seeds[0]
        options = self._options[0]
        if any(o != options for o in self._options):
            raise ValueError(
                f"DiffusionVecEnv resets all envs together: options must be the same for every env, got {self._options}"
            )
        obs, info = self.env.reset(seed=seed, options=options or None)
        self._reset_seeds()
        self._reset_options()
        obs_np, info_np = self._to_numpy(obs, info)
        self.reset_infos = [self._env_info(info_np, i) for i in range(self.num_envs)]
        return obs_np

    def step_async(self, actions: np.ndarray) -> None:
        """Queue ``actions`` (moved to the env's device here, as float32)."""
        expected = int(np.prod(self._sample_shape))
        array = np.asarray(actions)
        if array.shape[0] != self.num_envs or array[0].size != expected:
            raise ValueError(
                f"actions must have shape ({self.num_envs}, {', '.join(map(str, self._sample_shape))}) "
                f"(or ({self.num_envs}, {expected})), got {array.shape}"
            )
        tensor = torch.as_tensor(array, dtype=torch.float32)
        self._actions = tensor.reshape(self.num_envs, *self._sample_shape).to(self.device, non_blocking=True)

    def step_wait(self) -> VecEnvStepReturn:
        """Step every env with the queued actions; finished episodes are reset in the same step."""
        if self._actions is None:
            raise RuntimeError("step_wait() called without step_async()")
        ending = self.env.steps_remaining() <= 1  # host-side: which episodes this step finishes
        obs, rewards, _, _, info = self.env.step(self._actions)
        self._actions = None
        obs_np, info_np = self._to_numpy(obs, info)
        dones = ending.copy()
        rewards_np = rewards.cpu().numpy().astype(np.float32) if dones.any() else np.zeros(self.num_envs, np.float32)
        infos = [self._env_info(info_np, i) for i in range(self.num_envs)]
        if dones.any():
            final_obs, final_info = self._to_numpy(info["final_obs"], info["final_info"])
            for i in np.flatnonzero(dones):
                self.reset_infos[i] = infos[i]
                infos[i] = {
                    **self._env_info(final_info, i),
                    "raw_reward": float(rewards_np[i]),
                    "terminal_observation": {key: value[i] for key, value in final_obs.items()},
                    "TimeLimit.truncated": False,
                }
        return obs_np, rewards_np, dones, infos

    def close(self) -> None:
        """Close the native env."""
        self.env.close()

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        """The native env's attribute, once per selected env (they share one env object)."""
        return [getattr(self.env, attr_name) for _ in self._indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        """Set an attribute of the native env (shared by all envs: ``indices`` must select all)."""
        self._require_all(indices, "set_attr")
        setattr(self.env, attr_name, value)

    def env_method(self, method_name: str, *method_args: Any, indices: VecEnvIndices = None, **method_kwargs: Any):
        """Call a method of the native env once (shared by all envs: ``indices`` must select all)."""
        self._require_all(indices, "env_method")
        result = getattr(self.env, method_name)(*method_args, **method_kwargs)
        return [result for _ in range(self.num_envs)]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        """Always ``False``: there are no per-env Gymnasium wrappers."""
        return [False for _ in self._indices(indices)]

    def get_images(self) -> Sequence[np.ndarray | None]:
        """The current images as ``H × W × 3`` uint8 arrays (``render_mode="rgb_array"``)."""
        images = self.env.render()
        return [None] * self.num_envs if images is None else list(images)

    # ------------------------------------------------------------------------------- helpers
    def policy_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """``policy_kwargs`` that make a :class:`~agents.sb3.DiffusionActorCriticPolicy` match this env.

        The model spec, number of steps, eta and scheduler kind of the env's chain (and a text model's
        prompts, negative prompt and guidance scale), updated with
        ``overrides`` (any policy option). Pass them to the algorithm: ``PPO(DiffusionActorCriticPolicy,
        venv, policy_kwargs=venv.policy_kwargs())``.

        Raises:
            ValueError: if the env was built from a model object (not a spec) and ``model`` is not given
                (the policy needs a spec string to rebuild the UNet when SB3 loads a saved agent).
        """
        core = self.env.core
        if core.model_spec.startswith("<") and "model" not in overrides:
            raise ValueError(
                f"the env was built from a {core.model_spec[1:-1]} object: pass the model's spec string, "
                "e.g. venv.policy_kwargs(model='embedded:digits')"
            )
        kwargs: dict[str, Any] = {
            "model": core.model_spec,
            "num_steps": core.num_steps,
            "eta": core.eta,
            "scheduler": core.scheduler_kind,
        }
        prompts = self.env.prompts
        if prompts is not None:
            if core.conditions.source.prompts is None:
                raise ValueError(
                    "the SB3 policy maps prompt ids to prompts with a fixed list: build the env with a prompt list "
                    "(a list, a file or a built-in set), not a prompt function"
                )
            kwargs.update(
                prompts=prompts, negative_prompt=core.conditions.negative_prompt, guidance_scale=core.guidance_scale
            )
        return {**kwargs, **overrides}

    def _to_numpy(self, obs: dict[str, torch.Tensor], info: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict]:
        """Observation and per-step info fields to numpy: one copy for the images, one for the integers."""
        ints = torch.stack([obs[k].long() for k in _INT_FIELDS] + [info[k].long() for k in _INFO_FIELDS]).cpu().numpy()
        obs_np = {"c": ints[0], "t": ints[1], "x_t": obs["x_t"].detach().cpu().numpy().astype(np.float32, copy=False)}
        info_np = {key: ints[2 + j] for j, key in enumerate(_INFO_FIELDS)}
        return obs_np, info_np

    @staticmethod
    def _env_info(info_np: dict[str, np.ndarray], i: int) -> dict[str, Any]:
        return {key: int(value[i]) for key, value in info_np.items()}

    def _indices(self, indices: VecEnvIndices) -> Iterable[int]:
        if indices is None:
            return range(self.num_envs)
        if isinstance(indices, int):
            return [indices]
        return indices

    def _require_all(self, indices: VecEnvIndices, what: str) -> None:
        if indices is not None and sorted(self._indices(indices)) != list(range(self.num_envs)):
            raise ValueError(
                f"{what}: the {self.num_envs} envs of a DiffusionVecEnv are one batched env; indices must be None "
                f"(all envs), got {indices!r}"
            )


class GroupStandardizedReward(VecEnvWrapper):
    """Standardise each finished episode's reward within its group (PPO-IS's advantage baseline).

    At a step where episodes finish, their rewards are replaced by ``(r − mean_g) / (std_g + 1e-6)``
    over the episodes of the same group ``g`` finishing on that step (``infos[i]["group"]``: the
    reference image, HRF §4.2), clipped to ``±clip``. Episodes from pure noise (``group = −1``, the
    ``full`` window) form one group: the batch. Groups of one episode use the batch statistics.
    With the default ``start_mode="shared"`` a whole batch finishes on the same step, so each group is
    complete. The raw reward stays in ``infos[i]["raw_reward"]``. Reward-free steps are untouched.

    Args:
        venv: a :class:`DiffusionVecEnv` (or a wrapper around one) whose infos carry ``group``.
        clip: advantages are clipped to ``±clip`` (ddpo-pytorch: 5).
    """

    def __init__(self, venv: VecEnv, clip: float = 5.0) -> None:
        if not clip > 0:
            raise ValueError(f"clip must be > 0, got {clip!r}")
        super().__init__(venv)
        self.clip = float(clip)

    def reset(self) -> VecEnvObs:
        """Reset the wrapped env."""
        return self.venv.reset()

    def step_wait(self) -> VecEnvStepReturn:
        """Step, then standardise the rewards of the episodes that finished."""
        obs, rewards, dones, infos = self.venv.step_wait()
        done = np.flatnonzero(dones)
        if len(done) > 1:
            groups = torch.tensor([infos[i]["group"] for i in done])
            raw = torch.as_tensor(rewards[done], dtype=torch.float64)
            rewards = rewards.copy()
            rewards[done] = group_standardize(raw, groups).clamp(-self.clip, self.clip).numpy()
        elif len(done) == 1:
            rewards = rewards.copy()
            rewards[done] = 0.0  # a lone episode has no baseline to compare with
        return obs, rewards, dones, infos
