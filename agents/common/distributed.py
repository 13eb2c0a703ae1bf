"""Data-parallel training on ``torch.distributed``, launched by ``torchrun`` (one process per GPU).

:func:`init_distributed` reads the variables ``torchrun`` sets (``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) and joins the process group: NCCL for CUDA devices,
gloo for the CPU, with a timeout, so that a dead or stuck peer turns into a :class:`DistributedError`
naming this rank and the timeout instead of a hang. Without those variables (or with
``WORLD_SIZE=1``) it returns a single-process :class:`Distributed` whose collectives are no-ops, so
the same trainer code runs in both cases.

The collectives the PPO-IS trainer needs are methods of :class:`Distributed`:

* :meth:`~Distributed.all_gather_cat` — concatenate a tensor of every rank along dim 0, in rank
  order (first dims may differ);
* :meth:`~Distributed.all_reduce_` — sum (or max) tensors in place, coalesced into large buckets
  (gradients);
* :meth:`~Distributed.broadcast_object` — rank 0's picklable object to all ranks;
* :meth:`~Distributed.barrier`.

Every collective wraps the backend's error (a closed connection when a peer was killed, a timeout
when it stopped answering) in :class:`DistributedError`.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

DEFAULT_TIMEOUT_S = 1800.0
"""Default collective timeout (torch's own default for gloo and NCCL process groups)."""
BUCKET_BYTES = 64 * 2**20
"""Gradients are all-reduced in flat buckets of at most this many bytes (one collective each)."""

_T = TypeVar("_T")


class DistributedError(RuntimeError):
    """A collective failed: a peer process died, or did not answer within the configured timeout."""


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (or an equivalent launcher) with ``WORLD_SIZE > 1``."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise DistributedError(
            f"WORLD_SIZE={os.environ.get('WORLD_SIZE')} is set but {name} is not: launch with torchrun "
            "(e.g. torchrun --nproc_per_node=2 -m agents.cli train ...), which sets RANK, LOCAL_RANK, "
            "WORLD_SIZE, MASTER_ADDR and MASTER_PORT"
        )
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name} must be an integer, got {value!r}") from None


@dataclass
class Distributed:
    """This process's place in the job, and the collectives (no-ops when ``world_size == 1``).

    Args:
        rank: global rank of this process (0 writes logs and checkpoints).
        world_size: number of processes.
        local_rank: rank on this node (picks the GPU).
        device: where collective buffers live (``cuda:<local_rank>`` for NCCL, ``cpu`` for gloo).
        timeout_s: the process group's collective timeout, in seconds.
        owns_group: whether :func:`init_distributed` created the process group (and
            :meth:`shutdown` destroys it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    timeout_s: float = DEFAULT_TIMEOUT_S
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        """Whether there is more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the one that writes logs, sample grids and checkpoints."""
        return self.rank == 0

    def _run(self, what: str, fn: Callable[[], _T]) -> _T:
        try:
            return fn()
        except (RuntimeError, ValueError, ConnectionError) as error:
            if isinstance(error, DistributedError):
                raise
            raise DistributedError(
                f"rank {self.rank} of {self.world_size}: collective '{what}' failed: another process died or "
                f"did not answer within dist_timeout_s={self.timeout_s:g} s ({type(error).__name__}: {error})"
            ) from error

    def shard(self) -> Any:
        """This process's :class:`~diffusion_gym.envs.Shard` of a batch collected together (``None`` alone)."""
        if not self.enabled:
            return None
        from diffusion_gym.envs import Shard

        return Shard(self.rank, self.world_size, self.all_gather_cat)

    def all_gather_cat(self, tensor: Tensor) -> Tensor:
        """Every rank's ``tensor`` concatenated along dim 0 in rank order (first dims may differ).

        The result is on ``tensor``'s device, with its dtype.
        """
        if not self.enabled:
            return tensor
        import torch.distributed as dist

        local = tensor.detach().to(self.device).contiguous()
        size = torch.tensor([local.shape[0]], dtype=torch.long, device=self.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        self._run("all_gather(sizes)", lambda: dist.all_gather(sizes, size))
        counts = [int(s.item()) for s in sizes]
        padded = torch.zeros((max(counts), *local.shape[1:]), dtype=local.dtype, device=self.device)
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        self._run("all_gather", lambda: dist.all_gather(parts, padded))
        return torch.cat([p[:n] for p, n in zip(parts, counts, strict=True)]).to(tensor.device)

    def all_reduce_(self, tensors: Iterable[Tensor], op: str = "sum") -> None:
        """Reduce ``tensors`` in place across ranks (``op``: ``"sum"`` or ``"max"``), in coalesced buckets."""
        if not self.enabled:
            return
        import torch.distributed as dist

        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
        if op not in ops:
            raise ValueError(f"unknown reduce op {op!r}; valid choices: {sorted(ops)}")
        bucket: list[Tensor] = []
        size = 0

        def flush() -> None:
            flat = torch.cat([t.detach().reshape(-1).to(self.device) for t in bucket])
            self._run(f"all_reduce({op})", lambda: dist.all_reduce(flat, op=ops[op]))
            offset = 0
            for t in bucket:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

        for t in tensors:
            if bucket and (t.dtype != bucket[0].dtype or size + t.numel() * t.element_size() > BUCKET_BYTES):
                flush()
                bucket, size = [], 0
            bucket.append(t)
            size += t.numel() * t.element_size()
        if bucket:
            flush()

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` (picklable) on every rank."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        self._run("broadcast_object", lambda: dist.broadcast_object_list(box, src=src, device=self.device))
        return box[0]

    def barrier(self) -> None:
        """Wait for every rank (e.g. while rank 0 writes a checkpoint)."""
        if not self.enabled:
            return
        import torch.distributed as dist

        # A barrier as a tiny all-reduce: it honours the process group's timeout on every backend.
        self._run("barrier", lambda: dist.all_reduce(torch.zeros(1, device=self.device)))

    def shutdown(self) -> None:
        """Destroy the process group if :func:`init_distributed` created it."""
        if not self.owns_group:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        self.owns_group = False


def init_distributed(device: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[Distributed, str]:
    """Join the ``torchrun`` job this process belongs to, if any.

    Args:
        device: the configured device: ``cpu`` (gloo) or ``cuda``/``cuda:N`` (NCCL; every process
            then uses ``cuda:<LOCAL_RANK>``).
        timeout_s: collective timeout; a peer that dies or stops answering makes the others raise
            :class:`DistributedError` after at most this long.

    Returns:
        The :class:`Distributed` handle and the device this process trains on.

    Raises:
        DistributedError: for missing launcher variables, a CUDA device the node does not have, or a
            rendezvous that does not complete within the timeout.
        ValueError: for a timeout that is not positive.
    """
    if not timeout_s > 0:
        raise ValueError(f"dist_timeout_s must be > 0 seconds, got {timeout_s!r}")
    if not launched_by_torchrun():
        return Distributed(timeout_s=timeout_s), device
    import torch.distributed as dist

    rank, world_size, local_rank = _env_int("RANK"), _env_int("WORLD_SIZE"), _env_int("LOCAL_RANK")
    kind = torch.device(device).type
    if kind == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise DistributedError(
                f"rank {rank}: LOCAL_RANK={local_rank} but this node has {count} CUDA device(s): start at most "
                f"{count} processes per node (torchrun --nproc_per_node={count})"
            )
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    elif kind == "cpu":
        backend = "gloo"
    else:
        raise DistributedError(f"multi-process training supports device 'cpu' (gloo) or 'cuda' (NCCL), got {device!r}")
    handle = Distributed(rank, world_size, local_rank, torch.device(device), float(timeout_s))
    if dist.is_initialized():  # the caller set the group up itself: use it, leave it to the caller
        if dist.get_world_size() != world_size or dist.get_rank() != rank:
            raise DistributedError(
                f"an initialised process group (rank {dist.get_rank()} of {dist.get_world_size()}) disagrees with "
                f"RANK={rank}, WORLD_SIZE={world_size}"
            )
        return handle, device
    timeout = datetime.timedelta(seconds=float(timeout_s))
    kwargs: dict[str, Any] = {"device_id": torch.device(device)} if backend == "nccl" else {}
    handle._run(
        "init_process_group",
        lambda: dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout, **kwargs),
    )
    handle.owns_group = True
    return handle, device
