"""DRIFT's three diversity mechanisms, as switchable parts of the PPO-IS loop.

DRIFT (*Beyond the Dirac Delta: Mitigating Diversity Collapse in Reinforcement Fine-Tuning for
Versatile Image Generation*) attacks diversity collapse from three sides; each is off by default and
switched on by its own key of the PPO-IS config's ``drift`` section:

1. **Sampling** — :func:`concentrated_subset`: of each group of episodes (same reference image, or
   same condition when episodes start from pure noise), train only on the ``subset_fraction`` whose
   rewards lie closest together. The reward outliers (one lucky or unlucky sample) would otherwise
   dominate the standardised advantages and pull the policy towards a single mode.
2. **Prompting** — :class:`ConditionNoise`: during rollouts (and in the update's recomputation of
   the same log-probs) the condition embedding gets Gaussian noise, sized relative to the
   embedding's RMS and annealed over the denoising time: ``w(t) = scale · clamp((t/T − τ1)/(τ2 − τ1),
   0, 1)``, so the noisiest steps see the widest conditioning and the final steps none (as CADS
   anneals its condition noise). Each episode keeps one noise direction; evaluation never adds it.
3. **Optimisation** — :func:`shaped_step_advantages`: the intra-group diversity of the predicted
   clean images is a potential ``Φ`` (:func:`diffusion_gym.metrics.group_cosine_diversity`); the
   dense reward ``λ(Φ(s_{k+1}) − Φ(s_k))`` telescopes, so the return-to-go of the action at step
   ``k`` is ``R + λ(Φ(x_0) − Φ(s_k))``: the objective gains ``λ`` times the final group diversity,
   and each step is credited with the diversity it adds. (With Ng et al.'s ``Φ(terminal) = 0`` —
   :class:`diffusion_gym.wrappers.VectorPotentialShaping` — the term would only be a baseline and
   leave the policy gradient's expectation unchanged; DRIFT's point is to incentivise diversity.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from diffusion_gym.metrics import group_cosine_diversity

from .advantages import PerConditionStatTracker, compute_advantages, group_standardize
from .distributed import Distributed
from .rollout import Rollout, Trajectories

__all__ = [
    "ConditionNoise",
    "DiversityPotentials",
    "DriftAdvantages",
    "concentrated_subset",
    "diversity_features",
    "diversity_step_rewards",
    "group_keys",
    "group_cosine_diversity",
    "shaped_step_advantages",
]


def group_keys(groups: Tensor, conditions: Tensor) -> Tensor:
    """The group of each episode: its reference image, or its condition when it started from noise.

    Reference ids are ``≥ 0`` and conditions are mapped to ``−1 − c``, so the two never collide.
    """
    return torch.where(groups >= 0, groups, -1 - conditions.to(groups.dtype))


def concentrated_subset(rewards: Tensor, keys: Tensor, fraction: float) -> Tensor:
    """DRIFT's reward-concentrated subset: a ``(N,)`` bool mask of the episodes to train on.

    In each group (equal ``keys``) of ``n`` episodes, keep ``m = max(min(n, 2), ceil(fraction · n))``
    of them: the ``m`` consecutive rewards in sorted order with the smallest range ``max − min``
    (ties: the lowest rewards), i.e. the most concentrated subset, which drops the outliers at
    either end. ``fraction = 1`` keeps everything.

    Raises:
        ValueError: for a ``fraction`` outside ``(0, 1]`` or mismatched shapes.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"subset fraction must lie in (0, 1], got {fraction!r}")
    if rewards.shape != keys.shape or rewards.ndim != 1:
        raise ValueError(f"rewards and keys must be (N,) tensors, got {tuple(rewards.shape)} and {tuple(keys.shape)}")
    keep = torch.zeros_like(rewards, dtype=torch.bool)
    for key in keys.unique():
        members = (keys == key).nonzero().flatten()
        n = members.numel()
        m = max(min(n, 2), math.ceil(fraction * n - 1e-9))
        values, order = rewards[members].sort(stable=True)
        spread = values[m - 1 :] - values[: n - m + 1]  # range of each window of m sorted rewards
        first = int(spread.argmin())  # argmin returns the first minimum: the lowest window on ties
        keep[members[order[first : first + m]]] = True
    return keep


@dataclass(frozen=True)
class ConditionNoise:
    """Annealed Gaussian noise on the condition embedding (DRIFT's stochastic prompting).

    The UNet's class embedding ``e`` of each sample becomes ``e + w(t) · rms(e) · n`` with a unit
    normal direction ``n`` per episode and ``w(t) = scale · clamp((t/T − τ1) / (τ2 − τ1), 0, 1)``
    (``t`` the training timestep, ``T`` their number).

    Args:
        scale: the noise's standard deviation relative to the embedding's RMS at full weight.
        tau: ``(τ1, τ2)`` in ``[0, 1]``, ``τ1 < τ2``: no noise at ``t/T ≤ τ1``, full at ``t/T ≥ τ2``.
    """

    scale: float
    tau: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale >= 0):
            raise ValueError(f"condition noise scale must be a finite number >= 0, got {self.scale!r}")
        lo, hi = self.tau
        if not 0 <= lo < hi <= 1:
            raise ValueError(f"condition noise tau must be (τ1, τ2) with 0 <= τ1 < τ2 <= 1, got {self.tau!r}")

    def weight(self, t: Tensor, num_train_timesteps: int) -> Tensor:
        """``w(t)`` for a ``(B,)`` tensor of training timesteps."""
        lo, hi = self.tau
        return self.scale * ((t.float() / num_train_timesteps - lo) / (hi - lo)).clamp(0, 1)

    def perturb(self, embedding: Tensor, direction: Tensor, weight: Tensor) -> Tensor:
        """``e + w · rms(e) · n`` for ``(B, D)`` or ``(B, L, D)`` embeddings, ``(B, D)`` directions, ``(B,)`` weights.

        The RMS is taken over the last dimension (per token); a sample's direction is the same for
        all its tokens.
        """
        rms = embedding.detach().float().pow(2).mean(-1, keepdim=True).sqrt()
        shape = (-1,) + (1,) * (embedding.ndim - 1)
        direction = direction.float().view(direction.shape[0], *(1,) * (embedding.ndim - 2), -1)
        return embedding + (weight.view(shape) * rms * direction).to(embedding.dtype)


def diversity_features(x0: Tensor, size: int = 32) -> Tensor:
    """``(B, D)`` features whose group diversity is the potential: x̂0, area-pooled to at most ``size``²."""
    if x0.ndim == 4 and max(x0.shape[-2:]) > size:
        x0 = torch.nn.functional.adaptive_avg_pool2d(x0.float(), size)
    return x0.flatten(1).float()


def diversity_step_rewards(potentials: Tensor, final_potential: Tensor, coef: float) -> Tensor:
    """DRIFT's dense diversity rewards ``λ(Φ(s_{k+1}) − Φ(s_k))`` of one batch's stochastic steps.

    Args:
        potentials: ``(S, B)``: ``Φ`` of the state at each of the ``S`` stored steps.
        final_potential: ``(B,)``: ``Φ`` of the final images (the state after the last step).
        coef: ``λ``.

    Returns:
        ``(S, B)``; summed over the steps they telescope to ``λ(Φ(x_0) − Φ(s_first))``.
    """
    following = torch.cat([potentials[1:], final_potential.view(1, -1)])
    return coef * (following - potentials)


def shaped_step_advantages(
    rewards: Tensor,
    final_potential: Tensor,
    potentials: list[Tensor],
    keys: Tensor,
    keep: Tensor,
    coef: float,
    clip: float,
) -> list[Tensor]:
    """Per-(episode, step) advantages of DRIFT's diversity-shaped returns.

    The return-to-go of the action taken at stochastic step ``s`` of episode ``i`` is
    ``G = R_i + λ(Φ_i(x_0) − Φ_i(s))``; advantages standardise ``G`` within each cell of the same
    group and the same step (a GRPO-style batch baseline), over the kept episodes only; dropped
    episodes get 0. Clipped to ``±clip``.

    Args:
        rewards: ``(M,)`` final rewards of the epoch's episodes (batch-major).
        final_potential: ``(M,)`` ``Φ`` of the final images.
        potentials: one ``(S_b, B)`` tensor per batch: ``Φ`` of the state of each stochastic step.
        keys: ``(M,)`` group keys (:func:`group_keys`).
        keep: ``(M,)`` bool mask of the episodes trained on.
        coef: ``λ``.
        clip: the advantage clip.

    Returns:
        One ``(S_b, B)`` advantage tensor per batch.
    """
    out = []
    row = 0
    for phi in potentials:
        steps, b = phi.shape
        sl = slice(row, row + b)
        row += b
        dense = diversity_step_rewards(phi, final_potential[sl], coef)
        returns = rewards[sl].view(1, b) + dense.flip(0).cumsum(0).flip(0)  # return-to-go of each step, (S_b, B)
        cell = keys[sl].view(1, b) * steps + torch.arange(steps, device=phi.device).view(steps, 1)
        mask = keep[sl].view(1, b).expand(steps, b)
        adv = torch.zeros_like(returns)
        adv[mask] = group_standardize(returns[mask], cell[mask])
        out.append(adv.clamp(-clip, clip))
    if row != rewards.numel():
        raise ValueError(f"the potentials cover {row} episodes, the rewards {rewards.numel()}")
    return out


class DiversityPotentials:
    """DRIFT (iii)'s collector plug-in: the group diversity ``Φ`` of every stored step's x̂0 and of the final images.

    A :class:`~agents.common.collector.BatchObserver`. ``Φ`` is computed over the whole batch
    (features gathered across processes), so every process records the global batch's potentials.

    Args:
        dist: the collectives (gathers the features of the global batch).
    """

    def __init__(self, dist: Distributed) -> None:
        self.dist = dist
        self.potentials: list[Tensor] = []
        """One ``(S_b, B·W)`` tensor per batch: ``Φ`` at each stored step."""
        self.final_potentials: list[Tensor] = []
        """One ``(B·W,)`` tensor per batch: ``Φ`` of the final images."""
        self._keys: Tensor | None = None
        self._steps: list[Tensor] = []

    def _potential(self, images: Tensor) -> Tensor:
        assert self._keys is not None
        return group_cosine_diversity(self.dist.all_gather_cat(diversity_features(images)), self._keys)

    def start_batch(self, groups: Tensor, conditions: Tensor) -> None:
        """Remember the batch's group keys (of the global batch)."""
        self._keys = self.dist.all_gather_cat(group_keys(groups, conditions))
        self._steps = []

    def stored_step(self, x0: Tensor) -> None:
        """Record ``Φ`` of the step's x̂0."""
        self._steps.append(self._potential(x0))

    def end_batch(self, final: Tensor) -> None:
        """Record the batch's potentials and ``Φ`` of its final images."""
        assert self._keys is not None
        empty = torch.zeros((0, self._keys.numel()), device=self._keys.device)
        self.potentials.append(torch.stack(self._steps) if self._steps else empty)
        self.final_potentials.append(self._potential(final))

    def take(self) -> tuple[list[Tensor], Tensor]:
        """The epoch's per-batch potentials and final potentials ``(M,)``, forgetting them."""
        potentials, final = self.potentials, torch.cat(self.final_potentials)
        self.potentials, self.final_potentials = [], []
        return potentials, final


class DriftAdvantages:
    """DRIFT's advantage plug-in for PPO-IS: (i) the reward-concentrated subset, (iii) diversity shaping.

    Args:
        subset_fraction: (i) the fraction of each group trained on (1: all).
        diversity_coef: (iii) ``λ`` (0: off).
        dist: the collectives.
    """

    def __init__(self, subset_fraction: float, diversity_coef: float, dist: Distributed) -> None:
        self.subset_fraction, self.diversity_coef = subset_fraction, diversity_coef
        self.diversity = DiversityPotentials(dist) if diversity_coef > 0 else None

    @property
    def observers(self) -> list[DiversityPotentials]:
        """The collector plug-ins it needs."""
        return [self.diversity] if self.diversity is not None else []

    def set_advantages(
        self,
        rollout: Rollout,
        traj: Trajectories,
        tracker: PerConditionStatTracker,
        mode: str,
        clip: float,
        std: str = "group",
    ) -> tuple[Tensor | None, dict[str, float]]:
        """Compute the epoch's advantages into ``rollout``; returns the kept-trajectory mask and statistics.

        With the subset, advantages are computed over the kept trajectories only (the others get 0
        and are left out of the update); with diversity shaping they are per (trajectory, step)
        (:func:`shaped_step_advantages`).
        """
        rewards, groups, conditions = traj.rewards, traj.groups, traj.conditions
        keys = group_keys(groups, conditions)
        keep = concentrated_subset(rewards, keys, self.subset_fraction) if self.subset_fraction < 1 else None
        kept = keep if keep is not None else torch.ones_like(rewards, dtype=torch.bool)
        stats = {"kept_fraction": kept.float().mean().item()}
        if self.diversity is not None:
            potentials, final = self.diversity.take()
            per_batch = shaped_step_advantages(rewards, final, potentials, keys, kept, self.diversity_coef, clip)
            rollout.set_step_advantages(per_batch)
            stats["final_diversity"] = final.mean().item()
        else:
            advantages = torch.zeros_like(rewards)
            advantages[kept] = compute_advantages(
                rewards[kept], groups[kept], conditions[kept], mode, tracker, clip=clip, std=std
            )
            rollout.set_advantages(advantages)
        return keep, stats
