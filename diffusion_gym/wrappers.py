"""Wrappers of ``DiffusionDenoise-v0``: prompt ids for SB3, and potential-based reward shaping.

:class:`PromptIdObservation` turns a text-to-image env's ``Text`` prompt observation into the
prompt's id (``Discrete``), which Stable-Baselines3 takes (it has no ``Text`` support).

Reward shaping follows Ng, Harada & Russell (1999).

Shaping adds ``F(s, s') = γ·Φ(s') − Φ(s)`` to every reward, with ``Φ(terminal) = 0``. Over a whole
episode the shaping terms telescope::

    Σ_k γ^k (r_k + F_k) = Σ_k γ^k r_k − Φ(s_0)

so every policy's return changes by the same amount per start state, and the optimal policy (of the
undiscounted, finite-horizon denoising MDP, or of any γ) is unchanged. What shaping changes is the
*timing* of the signal: a potential that grows where the final reward is likely to be high turns the
single terminal reward into a dense one (useful for per-step advantages and value learning).

* :class:`PotentialShaping` wraps the single :class:`~diffusion_gym.envs.DiffusionDenoiseEnv`
  (numpy observations, ``potential(obs) -> float``);
* :class:`VectorPotentialShaping` wraps the native
  :class:`~diffusion_gym.envs.DiffusionDenoiseVectorEnv` (torch observations,
  ``potential(obs) -> (B,) tensor``, one call per step for the whole batch, autoreset handled);
* :class:`GroupDiversityPotential` is DRIFT's intra-group diversity as a potential: each episode's
  mean cosine distance to the other episodes of its group (the ``samples_per_reference``
  consecutive envs that start from one reference), on the predicted clean images.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import VectorEnv, VectorWrapper
from torch import Tensor

from . import metrics, sampling

__all__ = ["GroupDiversityPotential", "PotentialShaping", "PromptIdObservation", "VectorPotentialShaping"]

SHAPING_KEY = "shaping_reward"
"""The ``info`` key holding the shaping term ``F`` that was added to the reward."""


class PromptIdObservation(gym.ObservationWrapper):
    """``obs["c"]``: the prompt's id in ``env.prompts`` (``Discrete``) instead of its text.

    For libraries without ``Text`` spaces (Stable-Baselines3). The ids are those of the vector env's
    observations: a list source's prompts in order.

    Raises:
        ValueError: for an env whose observations hold no prompt (a class-conditional pixel model).
    """

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        if not isinstance(env.observation_space["c"], gym.spaces.Text):
            raise ValueError("PromptIdObservation wraps a text-to-image env; this env's obs['c'] is already an id")
        core = env.unwrapped.core
        self._conditions = core.conditions
        self.observation_space = core.single_spaces(vector=True)[0]

    def observation(self, observation: dict[str, Any]) -> dict[str, Any]:
        """The observation with the prompt replaced by its id."""
        return {**observation, "c": np.int64(self._conditions.check(observation["c"]))}


def _check_gamma(gamma: float) -> float:
    if not (isinstance(gamma, int | float) and math.isfinite(gamma) and 0 <= gamma <= 1):
        raise ValueError(f"gamma must be a number in [0, 1], got {gamma!r}")
    return float(gamma)


class PotentialShaping(gym.Wrapper):
    """Add ``F = γ·Φ(s') − Φ(s)`` (``Φ(terminal) = 0``) to the rewards of a single env.

    The shaped return of a whole episode is the unshaped one minus ``Φ(s_0)``, for any policy:
    the optimal policy is unchanged (Ng et al., 1999). A truncated episode's last state is not
    terminal: it keeps its potential. ``info["shaping_reward"]`` holds ``F``; the env's own
    ``info["raw_reward"]`` (at the end) stays the unshaped reward.

    Args:
        env: a Gymnasium env, e.g. ``DiffusionDenoiseEnv``.
        potential: ``Φ``, a callable of the observation (the ``{"c", "t", "x_t"}`` dict) returning
            a finite float. It must depend on the state only (not on the step count or on a
            network that changes during the episode).
        gamma: the discount ``γ`` in ``[0, 1]`` the agent optimises (1 for the episodic
            denoising MDP).
    """

    def __init__(self, env: gym.Env, potential: Callable[[Any], float], gamma: float = 1.0) -> None:
        super().__init__(env)
        if not callable(potential):
            raise TypeError(f"potential must be a callable of the observation, got {potential!r}")
        self.potential = potential
        self.gamma = _check_gamma(gamma)
        self._last: float | None = None

    def _phi(self, obs: Any) -> float:
        value = float(self.potential(obs))
        if not math.isfinite(value):
            raise ValueError(f"the potential returned {value} (must be finite)")
        return value

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        """Reset the env and remember ``Φ(s_0)``."""
        obs, info = self.env.reset(seed=seed, options=options)
        self._last = self._phi(obs)
        return obs, info

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        """Step the env and add the shaping term to its reward."""
        if self._last is None:
            raise RuntimeError("call reset() before step()")
        obs, reward, terminated, truncated, info = self.env.step(action)
        nxt = 0.0 if terminated else self._phi(obs)
        shaping = self.gamma * nxt - self._last
        self._last = None if terminated or truncated else nxt
        info = {**info, SHAPING_KEY: shaping}
        return obs, float(reward) + shaping, terminated, truncated, info


class VectorPotentialShaping(VectorWrapper):
    """:class:`PotentialShaping` for the native torch vector env (``SAME_STEP`` autoreset).

    ``potential(obs)`` receives the batched observation (a dict of tensors) and returns a ``(B,)``
    tensor; it is called once per step, on the observation the step returns. For the envs whose
    episode ended on that step, that observation is the *next* episode's first one, so it serves as
    that episode's ``Φ(s_0)``, while the ended episode gets ``Φ(terminal) = 0`` (or, if it was only
    truncated, ``Φ`` of ``info["final_obs"]``). ``info["shaping_reward"]`` holds the ``(B,)`` ``F``.

    Args:
        env: a ``DiffusionDenoiseVectorEnv`` (or any vector env with torch tensors and
            ``SAME_STEP`` autoreset).
        potential: ``Φ``, batched: observation dict → ``(B,)`` tensor; a function of each env's
            state (or, like :class:`GroupDiversityPotential`, of its group's states).
        gamma: the discount ``γ`` in ``[0, 1]``.
    """

    def __init__(self, env: VectorEnv, potential: Callable[[dict[str, Tensor]], Tensor], gamma: float = 1.0) -> None:
        super().__init__(env)
        if not callable(potential):
            raise TypeError(f"potential must be a callable of the batched observation, got {potential!r}")
        self.potential = potential
        self.gamma = _check_gamma(gamma)
        self._last: Tensor | None = None

    def _phi(self, obs: dict[str, Tensor]) -> Tensor:
        value = self.potential(obs)
        if not isinstance(value, Tensor) or value.shape != (self.num_envs,):
            got = tuple(value.shape) if hasattr(value, "shape") else type(value).__name__
            raise ValueError(f"the potential must return a ({self.num_envs},) tensor, got {got}")
        return value.detach().float()

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Reset all envs and remember ``Φ(s_0)`` of each."""
        obs, info = self.env.reset(seed=seed, options=options)
        self._last = self._phi(obs)
        return obs, info

    def step(self, actions: Tensor) -> tuple[dict[str, Tensor], Tensor, Tensor, Tensor, dict[str, Any]]:
        """Step all envs and add the shaping term to their rewards."""
        if self._last is None:
            raise RuntimeError("call reset() before step()")
        obs, rewards, terminated, truncated, info = self.env.step(actions)
        phi = self._phi(obs)
        target = phi
        only_truncated = truncated & ~terminated
        if bool(only_truncated.any()):  # a truncated episode's last state keeps its potential
            target = torch.where(only_truncated, self._phi(info["final_obs"]), target)
        target = torch.where(terminated, torch.zeros_like(target), target)
        shaping = self.gamma * target - self._last
        self._last = phi
        info = {**info, SHAPING_KEY: shaping}
        return obs, rewards + shaping.to(rewards.dtype), terminated, truncated, info


class GroupDiversityPotential:
    """DRIFT's intra-group diversity as a shaping potential for the vector env.

    ``Φ_i(s) = scale · mean_{j ∈ group(i), j ≠ i} (1 − cos(f_i, f_j))``: the mean cosine distance of
    env ``i``'s features to those of the other envs of its group, where a group is
    ``group_size`` consecutive envs (the env's ``samples_per_reference`` layout; use
    ``group_size = num_envs`` for one group). The features ``f`` are the predicted clean images
    x̂0 when a ``denoiser`` is given (one batched call per step; use the *frozen* base model, so that
    Φ is a fixed function of the state), otherwise the noisy images ``x_t`` themselves, optionally
    passed through ``embed`` (e.g. a classifier's features). Shaped with
    :class:`VectorPotentialShaping`, the return of each episode changes by ``−Φ_i(s_0)`` only, so
    the diversity term redistributes credit over the steps without moving the optimum of the
    group's joint MDP.

    Args:
        group_size: envs per group (must divide ``num_envs``; ≥ 2).
        scale: the potential's weight (DRIFT's shaping coefficient).
        denoiser: ``(x, t, c) -> model_output`` to predict x̂0; ``None``: use ``x_t``.
        schedule: the env's :class:`~diffusion_gym.sampling.DenoisingSchedule` (needed with a
            denoiser, to map the observation's timestep to the step's coefficients).
        embed: optional map of ``(B, C, H, W)`` images (``[-1, 1]`` scale) to ``(B, D)`` features.
        conditional: pass the observation's ``c`` to the denoiser (class-conditional models).
    """

    def __init__(
        self,
        group_size: int,
        scale: float = 1.0,
        denoiser: sampling.Denoiser | None = None,
        schedule: sampling.DenoisingSchedule | None = None,
        embed: Callable[[Tensor], Tensor] | None = None,
        conditional: bool = True,
    ) -> None:
        if not isinstance(group_size, int) or group_size < 2:
            raise ValueError(f"group_size must be an int >= 2, got {group_size!r}")
        if denoiser is not None and schedule is None:
            raise ValueError("a denoiser needs the env's schedule (env.unwrapped.core.schedule)")
        self.group_size = group_size
        self.scale = float(scale)
        self.denoiser = denoiser
        self.schedule = schedule
        self.embed = embed
        self.conditional = conditional

    def features(self, obs: dict[str, Tensor]) -> Tensor:
        """The ``(B, D)`` features whose diversity is measured."""
        x = obs["x_t"]
        if self.denoiser is not None:
            assert self.schedule is not None
            timesteps = self.schedule.timesteps.to(x.device)
            match = obs["t"].to(x.device).view(-1, 1) == timesteps.view(1, -1)
            # the last match: t = 0 is both the last step's timestep and the clean image's
            k = timesteps.numel() - 1 - match.flip(1).int().argmax(1)
            with torch.no_grad():
                out = self.denoiser(x, timesteps[k], obs["c"] if self.conditional else None)
                x, _ = sampling.predict_x0_eps(out, x, k, self.schedule)
        if self.embed is not None:
            with torch.no_grad():
                x = self.embed(x)
        return x.flatten(1).float()

    def __call__(self, obs: dict[str, Tensor]) -> Tensor:
        """``(B,)`` potentials of the batched observation ``obs``."""
        f = self.features(obs)
        b = f.shape[0]
        if b % self.group_size:
            raise ValueError(f"group_size {self.group_size} must divide the number of envs {b}")
        groups = torch.arange(b, device=f.device) // self.group_size
        return self.scale * metrics.group_cosine_diversity(f, groups)
