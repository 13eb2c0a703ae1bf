"""One epoch's rollouts, on the device, knowing their own layout across processes.

An epoch collects ``num_batches`` batches of whole episodes. Each stochastic step
``(x_k → x_{k+1})`` is a training *pair*; deterministic steps (σ = 0, e.g. the last DDIM step) are
not actions and are not stored. Each pair points at its trajectory, whose advantage comes from the
final reward once the epoch is collected.

Layout. Under ``torchrun`` each of ``W`` processes collects ``B`` episodes of every global batch of
``B · W`` (:class:`RolloutLayout`). A :class:`Rollout` stores this process's pairs one block of
``B`` per (batch, step); the *global* pairs are the same blocks ``B · W`` wide, global pair ``g`` is
row ``g % (B·W)`` of block ``g // (B·W)``, so that every process enumerates, shuffles and chunks the
global pairs the same way (as one process holding all the envs would) and keeps its own. The
trajectory outcomes are gathered into that single-process order with :meth:`Rollout.trajectories`,
and the advantages of the whole batch are handed back with :meth:`Rollout.set_advantages`. In one
process (``W = 1``) every mapping is the identity and every collective a no-op.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .distributed import Distributed, DistributedError

__all__ = ["Rollout", "RolloutLayout", "Trajectories", "TransitionBatch"]


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
    start: Tensor | None = None
    """Start step index ``k0`` of the pair's trajectory."""


class Trajectories(NamedTuple):
    """The outcomes of the whole (global) batch's trajectories, in single-process order, ``(M,)`` each."""

    rewards: Tensor
    groups: Tensor
    """Reference id (−1 for pure noise)."""
    conditions: Tensor
    starts: Tensor
    """Start step index."""


@dataclass(frozen=True)
class RolloutLayout:
    """How one process's episodes sit in the global batch.

    Args:
        batch_envs: ``B``, this process's episodes per batch.
        world_size: ``W``, processes collecting each batch together.
        rank: this process's index.
    """

    batch_envs: int
    world_size: int = 1
    rank: int = 0

    @property
    def width(self) -> int:
        """``B · W``, the global batch size (and global pair-block width)."""
        return self.batch_envs * self.world_size

    @property
    def columns(self) -> slice:
        """This process's columns of a global batch."""
        return slice(self.rank * self.batch_envs, (self.rank + 1) * self.batch_envs)

    def owned(self, pairs: Tensor) -> Tensor:
        """Storage positions of the global ``pairs`` this process collected (the others are dropped)."""
        if self.world_size == 1:
            return pairs
        row = pairs % self.width
        mine = pairs[row // self.batch_envs == self.rank]
        return (mine // self.width) * self.batch_envs + (mine % self.width) % self.batch_envs

    def local_trajectories(self, values: Tensor) -> Tensor:
        """This process's trajectories of a whole-batch ``(M,)`` tensor (inverse of the gather)."""
        if self.world_size == 1:
            return values
        return values.view(-1, self.world_size, self.batch_envs)[:, self.rank].reshape(-1)


_STEP_FIELDS = ("x", "x_next", "k", "c", "log_prob", "traj")


class Rollout:
    """This process's transitions and trajectory outcomes of one epoch.

    Args:
        layout: where this process's episodes sit in the global batch.
        device: where everything is kept.
        dist: the collectives (the do-nothing default in one process).
    """

    def __init__(self, layout: RolloutLayout, device: str | torch.device, dist: Distributed | None = None) -> None:
        self.layout = layout
        self.device = torch.device(device)
        self.dist = dist if dist is not None else Distributed()
        self._steps: dict[str, list[Tensor]] = {name: [] for name in _STEP_FIELDS}
        self._rewards: list[Tensor | Future[Tensor]] = []
        self._groups: list[Tensor] = []
        self._conditions: list[Tensor] = []
        self._starts: list[Tensor] = []
        self._cond_noise: list[Tensor] = []
        self.num_trajectories = 0
        self.advantages: Tensor | None = None
        self.pair_advantages: Tensor | None = None

    # ------------------------------------------------------------------------------------ collection
    def start_batch(
        self, conditions: Tensor, groups: Tensor, starts: Tensor, cond_noise: Tensor | None = None
    ) -> Tensor:
        """Register a new batch of trajectories (and their condition-noise directions); returns their ids ``(B,)``."""
        n = conditions.shape[0]
        ids = torch.arange(self.num_trajectories, self.num_trajectories + n, device=self.device)
        self.num_trajectories += n
        self._groups.append(groups.to(self.device))
        self._conditions.append(conditions.to(self.device))
        self._starts.append(starts.to(self.device))
        if cond_noise is not None:
            self._cond_noise.append(cond_noise.to(self.device))
        return ids

    def add(self, x: Tensor, x_next: Tensor, k: Tensor, c: Tensor, log_prob: Tensor, traj: Tensor) -> None:
        """Store one step of a batch (``(B, …)`` tensors); call only for stochastic steps."""
        for name, value in zip(_STEP_FIELDS, (x, x_next, k, c, log_prob, traj), strict=True):
            self._steps[name].append(value.detach().to(self.device))

    def end_batch(self, rewards: Tensor | Future[Tensor]) -> None:
        """Record the batch's final rewards ``(B,)``: a tensor, or a future still being scored.

        A future is waited for when :attr:`rewards` is first read, so the next batch's rollout
        overlaps with the scoring.
        """
        self._rewards.append(rewards if isinstance(rewards, Future) else rewards.detach().to(self.device).float())

    # ------------------------------------------------------------------------------------ outcomes
    @staticmethod
    def _cat(parts: list[Tensor], device: torch.device) -> Tensor:
        if len(parts) == 1:
            return parts[0]
        return torch.cat(parts) if parts else torch.empty(0, device=device)

    @property
    def rewards(self) -> Tensor:
        """``(M_local,)`` final rewards of this process's trajectories (waits for any still being scored)."""
        self._rewards = [r.result().to(self.device).float() if isinstance(r, Future) else r for r in self._rewards]
        return self._cat(self._rewards, self.device)  # type: ignore[arg-type]

    def trajectories(self) -> Trajectories:
        """The whole batch's outcomes in single-process order (a collective under ``torchrun``).

        Each process holds ``num_batches`` blocks of its ``B`` episodes; gathered rank by rank, they
        are reordered batch by batch, as one process with all the envs would have stored them.

        Raises:
            DistributedError: when the processes started a batch from different steps.
        """
        local = Trajectories(
            self.rewards,
            self._cat(self._groups, self.device),
            self._cat(self._conditions, self.device),
            self._cat(self._starts, self.device),
        )
        if not self.dist.enabled:
            return local
        world, fields = self.dist.world_size, len(local)
        packed = torch.stack([v.double() for v in local], dim=1)  # exact for float32 and ids < 2**53
        rows = self.dist.all_gather_cat(packed)  # (world · batches · b, 4): rank-major
        rows = rows.view(world, len(self._groups), -1, fields).transpose(0, 1)
        starts = rows[..., 3]
        if not bool((starts == starts[:, :1, :1]).all()):
            raise DistributedError(
                f"rank {self.dist.rank}: the processes started a batch from different steps "
                f"({starts[:, :, 0].tolist()} per batch and rank): the env RNG or HRF-D choice diverged"
            )
        flat = rows.reshape(-1, fields)
        return Trajectories(flat[:, 0].float(), flat[:, 1].long(), flat[:, 2].long(), flat[:, 3].long())

    # ------------------------------------------------------------------------------------ advantages
    def set_advantages(self, advantages: Tensor) -> None:
        """One advantage per trajectory of the *whole* batch ``(M,)``; this process keeps its own."""
        local = self.layout.local_trajectories(advantages)
        if local.shape != (self.num_trajectories,):
            raise ValueError(f"need {self.num_trajectories} advantages, got shape {tuple(local.shape)}")
        self.advantages = local.to(self.device).float()

    def set_step_advantages(self, per_batch: list[Tensor]) -> None:
        """Advantages per (trajectory, step): one ``(S_b, B·W)`` tensor per batch; they replace the trajectories'."""
        local = torch.cat([adv[:, self.layout.columns].reshape(-1) for adv in per_batch])
        if local.shape != (len(self),):
            raise ValueError(f"need {len(self)} pair advantages, got shape {tuple(local.shape)}")
        self.pair_advantages = local.to(self.device).float()

    # ------------------------------------------------------------------------------------ pairs
    def __len__(self) -> int:
        """This process's stored pairs."""
        return sum(t.shape[0] for t in self._steps["k"])

    @property
    def num_global_pairs(self) -> int:
        """Pairs of the whole batch (every process stores the same number)."""
        return len(self) * self.layout.world_size

    def _consolidate(self) -> dict[str, Tensor]:
        """Concatenate each stored field once, in place, freeing the per-step blocks."""
        for name in self._steps:
            self._steps[name] = [self._cat(self._steps[name], self.device)]
        return {name: parts[0] for name, parts in self._steps.items()}

    def pair_trajectories(self) -> Tensor:
        """The global trajectory index of every global (sample, step) pair (its own id in one process)."""
        if not self._steps["traj"]:
            return torch.empty(0, dtype=torch.long, device=self.device)
        b, width = self.layout.batch_envs, self.layout.width
        traj = self._consolidate()["traj"]
        batch_of_block = torch.div(traj.view(-1, b)[:, 0], b, rounding_mode="floor")
        rows = torch.arange(width, device=self.device)
        return (batch_of_block.view(-1, 1) * width + rows.view(1, -1)).reshape(-1)

    def batch_chunks(self) -> list[Tensor]:
        """The global pairs of each collected batch, in collection order (one optimizer step per batch)."""
        batch = torch.div(self.pair_trajectories(), self.layout.width, rounding_mode="floor").cpu()
        order = torch.arange(batch.numel())
        return [order[batch == i] for i in range(len(self._groups))]

    def minibatches(self, positions: Tensor, batch_size: int) -> list[TransitionBatch]:
        """The stored pairs at ``positions`` (this process's), cut into minibatches of ``batch_size``."""
        if self.advantages is None and self.pair_advantages is None:
            raise RuntimeError("set_advantages() or set_step_advantages() before sampling minibatches")
        flat = self._consolidate()
        if len(self._cond_noise) > 1:
            self._cond_noise = [torch.cat(self._cond_noise)]
        cond_noise = self._cond_noise[0] if self._cond_noise else None
        starts = self._cat(self._starts, self.device)
        out = []
        for idx in positions.to(self.device).split(batch_size):
            traj = flat["traj"][idx]
            per_pair = self.pair_advantages[idx] if self.pair_advantages is not None else None
            out.append(
                TransitionBatch(
                    x=flat["x"][idx],
                    x_next=flat["x_next"][idx],
                    k=flat["k"][idx],
                    c=flat["c"][idx],
                    log_prob=flat["log_prob"][idx],
                    advantages=per_pair if per_pair is not None else self.advantages[traj],  # type: ignore[index]
                    cond_noise=cond_noise[traj] if cond_noise is not None else None,
                    start=starts[traj],
                )
            )
        return out
