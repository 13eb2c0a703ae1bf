"""Host rewards, and scoring rewards in the background while the device keeps working.

A *host reward* (:func:`host_reward`) computes on the CPU whatever device its images are on, as the
JPEG rewards do. :func:`reward_async` scores such a reward of CUDA images on one background thread
and returns a future, so that the caller can queue the next GPU work meanwhile.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor

from diffusion_gym.rewards.registry import RewardFn

__all__ = ["host_reward", "reward_async", "runs_on_host"]


class LazyThreadPool:
    """A thread pool started at its first use, resizable, and forgotten in a forked child.

    A forked child inherits the pool object but not its threads, so it starts a fresh pool there.

    Args:
        workers: threads in the pool.
        name: the threads' name prefix.
    """

    def __init__(self, workers: int, name: str) -> None:
        self.workers, self.name = workers, name
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._pool, self._lock = None, threading.Lock()

    def get(self) -> ThreadPoolExecutor:
        """The pool, started now if it is not running."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix=self.name)
            return self._pool

    def resize(self, workers: int) -> None:
        """Use ``workers`` threads from the next :meth:`get` on (the old pool finishes its work first)."""
        with self._lock:
            old, self._pool, self.workers = self._pool, None, workers
        if old is not None:
            old.shutdown(wait=True)


_reward_worker = LazyThreadPool(1, "diffusion_gym-reward")  # one thread: batches are scored in submission order


def host_reward(fn: RewardFn) -> RewardFn:
    """Mark ``fn`` as a *host reward*: it computes on the CPU, whatever device the images are on.

    The JPEG rewards are host rewards. :func:`reward_async` runs host rewards of GPU images on a
    background thread, so that the GPU keeps working (e.g. on the next batch of episodes) while the CPU scores the last
    one. Mark a custom reward the same way when it only needs the images on the host (a compressor,
    an external program); rewards that run a network on the images' device should stay unmarked.

    Args:
        fn: the reward function; its attribute ``runs_on_host`` is set to ``True``.

    Returns:
        ``fn`` itself (usable as a decorator).
    """
    fn.runs_on_host = True  # type: ignore[attr-defined]
    return fn


def runs_on_host(reward_fn: RewardFn) -> bool:
    """Whether ``reward_fn`` (or the function a :class:`CheckedReward` wraps) is a :func:`host_reward`."""
    return bool(getattr(reward_fn, "runs_on_host", False))


def _host_snapshot(value: Any) -> Any:
    """A host copy of a tensor that the caller may overwrite next.

    CUDA tensors are copied into pinned memory without blocking (ordered on the current stream);
    CPU tensors are cloned; anything else (prompts, ``None``) is returned as is.
    """
    if not isinstance(value, Tensor):
        return value
    value = value.detach()
    if value.device.type != "cuda":
        return value.clone()
    host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
    return host.copy_(value, non_blocking=True)


def reward_async(
    reward_fn: RewardFn, images: Tensor, conditions: Any = None, background: bool | None = None
) -> Future[Tensor]:
    """Start ``reward_fn(images, conditions)`` and return its future, without waiting for the device.

    With ``background``, the reward is scored on a background thread: CUDA images and class ids are
    first copied into pinned host memory without blocking, and the thread waits for that copy alone
    (a CUDA event), so the caller can go on queueing GPU work, e.g. the next batch's denoising steps,
    while the CPU encodes. The caller may overwrite ``images`` at once. The rewards are those of a
    direct call; the result lies on the host. Otherwise the reward is computed now, on the caller's
    thread, and the returned future is already done.

    By default (``background=None``) only a host reward (:func:`runs_on_host`) of CUDA images goes
    to the background: a reward network would compete for the GPU anyway, and with CPU images a
    second torch thread slows the rollout's OpenMP (see "Background rewards" in ``docs/design_notes.md``).

    Args:
        reward_fn: a reward function (see :data:`RewardFn`).
        images: ``(B, C, H, W)`` images in ``[0, 1]``.
        conditions: class ids, prompts or ``None``.
        background: score on the background thread (``None``: a host reward of CUDA images).

    Returns:
        A future of the ``(B,)`` float32 rewards; ``result()`` re-raises any error of the reward.
    """
    if background is None:
        background = runs_on_host(reward_fn) and images.device.type == "cuda"
    if not background:
        future: Future[Tensor] = Future()
        try:
            future.set_result(reward_fn(images, conditions))
        except Exception as error:  # noqa: BLE001 - delivered by result(), as from the background
            future.set_exception(error)
        return future
    devices = {v.device for v in (images, conditions) if isinstance(v, Tensor) and v.device.type == "cuda"}
    images, conditions = _host_snapshot(images), _host_snapshot(conditions)
    events = []
    for device in devices:  # the copies were queued on each device's current stream
        events.append(torch.cuda.Event())
        events[-1].record(torch.cuda.current_stream(device))

    def score() -> Tensor:
        for event in events:
            event.synchronize()  # this thread waits for the copies; the caller's stream keeps running
        return reward_fn(images, conditions)

    return _reward_worker.get().submit(score)
