"""Memory-aware micro-batching: halve the micro-batch when a forward/backward runs out of memory.

A PPO-IS update accumulates the gradient of a chunk of (sample, step) pairs over micro-batches of
``train.batch_size`` pairs. The largest size that fits depends on the GPU, the model, bf16,
gradient checkpointing and LoRA, so a configured size can be too large. :class:`MicroBatchSize`
catches the out-of-memory error, frees the failed graph, halves the size, clears the partial
gradient and recomputes the whole chunk: the result is exactly that of a run configured with the
smaller size. The size is kept for the rest of the run (one failure, not one per chunk).
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable
from typing import TypeVar

import torch

__all__ = ["MicroBatchSize"]

T = TypeVar("T")


class MicroBatchSize:
    """A micro-batch size that halves when the device runs out of memory.

    Args:
        size: the configured size (pairs per forward/backward).
        option: the config option that sets it, named in the warnings and errors.
    """

    def __init__(self, size: int, option: str = "train.batch_size") -> None:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"{option} must be an int >= 1, got {size!r}")
        self.size = size
        self.configured = size
        self.option = option

    def run(self, work: Callable[[int], T], reset: Callable[[], None]) -> T:
        """Return ``work(size)``; after an out-of-memory error, ``reset()``, halve the size and retry.

        Args:
            work: computes (and back-propagates) one chunk at a micro-batch size; it must be free of
                side effects that ``reset`` does not undo (e.g. random draws).
            reset: undoes a failed attempt's side effects (zeroes the accumulated gradient).

        Raises:
            torch.OutOfMemoryError: when even one pair per micro-batch does not fit; the message
                says what else saves memory.
        """
        while True:
            failure = None
            try:
                return work(self.size)
            except torch.OutOfMemoryError as error:  # handled below, once the failed graph is released
                failure = str(error).strip().splitlines()[0] if str(error).strip() else "out of memory"
            self._shrink(failure)
            reset()

    def _shrink(self, failure: str) -> None:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if self.size == 1:
            raise torch.OutOfMemoryError(
                f"one pair per micro-batch does not fit in memory ({failure}); {self.option} was "
                f"{self.configured}. Save memory with train.gradient_checkpointing: true, "
                "mixed_precision: bf16 or train.lora_rank > 0, or use a larger device."
            )
        old, self.size = self.size, self.size // 2
        warnings.warn(
            f"out of memory at {old} pairs per micro-batch ({failure}): recomputing the chunk with {self.size} "
            f"and keeping that size; set {self.option}={self.size} to skip the failed attempt",
            RuntimeWarning,
            stacklevel=3,
        )
