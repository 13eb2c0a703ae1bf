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

from .advantages import group_standardize

__all__ = [
    "ConditionNoise",
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
        """``e + w · rms(e) · n`` for ``(B, D)`` embeddings, directions and ``(B,)`` weights."""
        rms = embedding.detach().float().pow(2).mean(1, keepdim=True).sqrt()
        return embedding + (weight.view(-1, 1) * rms * direction.float()).to(embedding.dtype)


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
