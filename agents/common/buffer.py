"""A rollout buffer for denoising trajectories that stays on the device.

One epoch collects several batches of episodes from the vector env. Each stochastic step
``(x_k → x_{k+1})`` is a training pair; deterministic steps (σ = 0, e.g. the last DDIM step) are
not actions and are not stored. Each pair points at its trajectory, whose advantage is computed
from the final reward once the epoch is collected.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from diffusion_gym.envs import PendingRewards


class TransitionBatch(NamedTuple):
    """A minibatch of stored (sample, step) pairs (SB3-style named samples)."""

    x: Tensor
    """``x_k``, the state image."""
    x_next: Tensor
    """``x_{k+1}``, the action taken."""
    k: Tensor
    """Step index of the state."""
    c: Tensor
    """Condition."""
    log_prob: Tensor
    """``log π_old(x_next | x, k, c)`` at collection time (averaged over pixels)."""
    advantages: Tensor
    """Advantage of the pair (its trajectory's, or its own with per-step advantages)."""
    cond_noise: Tensor | None = None
    """DRIFT's condition-noise direction of the pair's trajectory (``None`` when off)."""


class RolloutBuffer:
    """Transitions and trajectory outcomes of one epoch.

    Args:
        device: where everything is kept.
    """

    def __init__(self, device: str | torch.device) -> None:
        self.device = torch.device(device)
        self._steps: dict[str, list[Tensor]] = {name: [] for name in ("x", "x_next", "k", "c", "log_prob", "traj")}
        self._traj: dict[str, list[Tensor]] = {name: [] for name in ("rewards", "groups", "conditions", "starts")}
        self._cond_noise: list[Tensor] = []
        self._pending: list[tuple[int, PendingRewards]] = []
        self.num_trajectories = 0
        self.advantages: Tensor | None = None
        self.pair_advantages: Tensor | None = None
        self.potentials: list[Tensor] = []
        """DRIFT's diversity potentials, one ``(S_b, B_global)`` tensor per batch (when shaping)."""
        self.final_potentials: list[Tensor] = []
        """``Φ`` of each batch's final images, ``(B_global,)`` per batch (when shaping)."""

    def start_batch(
        self, conditions: Tensor, groups: Tensor, starts: Tensor, cond_noise: Tensor | None = None
    ) -> Tensor:
        """Register a new batch of trajectories (and their condition-noise directions); returns their ids ``(B,)``."""
        n = conditions.shape[0]
        ids = torch.arange(self.num_trajectories, self.num_trajectories + n, device=self.device)
        self.num_trajectories += n
        self._traj["groups"].append(groups.to(self.device))
        self._traj["conditions"].append(conditions.to(self.device))
        self._traj["starts"].append(starts.to(self.device))
        if cond_noise is not None:
            self._cond_noise.append(cond_noise.to(self.device))
        return ids

    def add(self, x: Tensor, x_next: Tensor, k: Tensor, c: Tensor, log_prob: Tensor, traj: Tensor) -> None:
        """Store one step of a batch (``(B, …)`` tensors); call only for stochastic steps."""
        self._block_size = x.shape[0]
        for name, value in (("x", x), ("x_next", x_next), ("k", k), ("c", c), ("log_prob", log_prob), ("traj", traj)):
            self._steps[name].append(value.detach().to(self.device))

    def end_batch(self, rewards: Tensor | PendingRewards) -> None:
        """Record the final rewards ``(B,)`` of the batch's trajectories.

        ``rewards`` may still be computing (the env's ``info["pending_reward"]``); they are waited
        for when :attr:`rewards` is first read, so the next batch's rollout overlaps with them.
        """
        if isinstance(rewards, PendingRewards):
            self._pending.append((len(self._traj["rewards"]), rewards))
            self._traj["rewards"].append(torch.empty(0))  # placeholder until resolved
        else:
            self._traj["rewards"].append(rewards.detach().to(self.device).float())

    def _resolve_rewards(self) -> None:
        for position, pending in self._pending:
            self._traj["rewards"][position] = pending.result().to(self.device).float()
        self._pending = []

    def _cat(self, store: dict[str, list[Tensor]], name: str) -> Tensor:
        parts = store[name]
        if len(parts) == 1:
            return parts[0]
        return torch.cat(parts) if parts else torch.empty(0, device=self.device)

    def _consolidate(self) -> dict[str, Tensor]:
        """Concatenate each stored field once, in place, freeing the per-step blocks.

        The update's chunks then index one tensor per field instead of re-concatenating the whole
        buffer for every chunk (which held two copies of it in memory).
        """
        for name in self._steps:
            self._steps[name] = [self._cat(self._steps, name)]
        return {name: parts[0] for name, parts in self._steps.items()}

    @property
    def rewards(self) -> Tensor:
        """``(M,)`` final rewards of all trajectories (waits for any still being computed)."""
        self._resolve_rewards()
        return self._cat(self._traj, "rewards")

    @property
    def groups(self) -> Tensor:
        """``(M,)`` reference ids (−1 for pure noise)."""
        return self._cat(self._traj, "groups")

    @property
    def conditions(self) -> Tensor:
        """``(M,)`` conditions."""
        return self._cat(self._traj, "conditions")

    @property
    def start_steps(self) -> Tensor:
        """``(M,)`` start step indices."""
        return self._cat(self._traj, "starts")

    def __len__(self) -> int:
        return sum(t.shape[0] for t in self._steps["k"])

    def set_advantages(self, advantages: Tensor) -> None:
        """Per-trajectory advantages ``(M,)``."""
        if advantages.shape != (self.num_trajectories,):
            raise ValueError(f"need {self.num_trajectories} advantages, got shape {tuple(advantages.shape)}")
        self.advantages = advantages.to(self.device).float()

    def set_pair_advantages(self, advantages: Tensor) -> None:
        """Per-pair advantages ``(len(self),)`` in storage order; they replace the trajectories' ones."""
        if advantages.shape != (len(self),):
            raise ValueError(f"need {len(self)} pair advantages, got shape {tuple(advantages.shape)}")
        self.pair_advantages = advantages.to(self.device).float()

    def global_pair_trajectories(self, world_size: int = 1) -> Tensor:
        """The global trajectory index of every global (sample, step) pair.

        Pairs are stored one block of ``B`` per (batch, step); with ``world_size`` processes each
        holding ``B`` envs of a ``B · world_size`` batch, global pair ``g`` is row ``g % W`` of block
        ``g // W`` (``W = B · world_size``) and belongs to trajectory ``batch · W + row``. In one
        process this is each pair's trajectory id.
        """
        blocks = self._steps["traj"]
        if not blocks:
            return torch.empty(0, dtype=torch.long, device=self.device)
        b = self._block_size
        width = b * world_size
        traj = self._cat(self._steps, "traj")
        batch_of_block = torch.div(traj.view(-1, b)[:, 0], b, rounding_mode="floor")
        rows = torch.arange(width, device=self.device)
        return (batch_of_block.view(-1, 1) * width + rows.view(1, -1)).reshape(-1)

    def minibatches(self, order: Tensor, batch_size: int) -> list[TransitionBatch]:
        """The pairs in ``order`` (a permutation of ``range(len(self))``), cut into minibatches."""
        if self.advantages is None and self.pair_advantages is None:
            raise RuntimeError("set_advantages() or set_pair_advantages() before sampling minibatches")
        flat = self._consolidate()
        if len(self._cond_noise) > 1:
            self._cond_noise = [torch.cat(self._cond_noise)]
        cond_noise = self._cond_noise[0] if self._cond_noise else None
        out = []
        for idx in order.to(self.device).split(batch_size):
            traj = flat["traj"][idx]
            out.append(
                TransitionBatch(
                    x=flat["x"][idx],
                    x_next=flat["x_next"][idx],
                    k=flat["k"][idx],
                    c=flat["c"][idx],
                    log_prob=flat["log_prob"][idx],
                    advantages=self.pair_advantages[idx] if self.pair_advantages is not None else self.advantages[traj],
                    cond_noise=cond_noise[traj] if cond_noise is not None else None,
                )
            )
        return out
