"""Advantages for DDPO-style policy gradients: rewards standardised within groups, then clipped.

* HRF windows: the ``n`` trajectories started from one reference image form a group (the env's
  ``info["group"]``); each reward is standardised by its group's mean and std (paper §4.2).
* DDPO (full window, pure noise): per condition, with :class:`PerConditionStatTracker` — a rolling
  buffer of recent rewards per class/prompt, as ddpo-pytorch's per-prompt stat tracker — falling back
  to the batch statistics until a condition has ``min_count`` rewards.
* Global fallback: the batch mean and std.

Advantages are clipped to ``±clip`` (5 in ddpo-pytorch).
"""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
from torch import Tensor

ADVANTAGE_MODES = ("auto", "group", "condition", "global")
_EPS = 1e-6


def global_standardize(rewards: Tensor) -> Tensor:
    """``(r − mean) / (std + eps)`` over the whole batch (population std)."""
    return (rewards - rewards.mean()) / (rewards.std(unbiased=False) + _EPS)


ADVANTAGE_STDS = ("group", "group-sample", "batch")


def group_standardize(rewards: Tensor, groups: Tensor, std: str = "group") -> Tensor:
    """Centre each reward on its group's mean and divide by a std; singleton groups use the batch stats.

    Args:
        rewards: ``(N,)`` rewards.
        groups: ``(N,)`` integer group ids (e.g. the reference image, or the prompt of a GRPO group).
        std: ``"group"``: each group's population std (HRF, GRPO); ``"group-sample"``: each group's
            sample std (``n − 1``, the HRF authors' ``x.std()``: advantages √((n − 1)/n) as large);
            ``"batch"``: the whole batch's (Flow-GRPO's ``global_std``: groups whose rewards barely
            differ get small advantages).
    """
    if std not in ADVANTAGE_STDS:
        raise ValueError(f"unknown advantage std {std!r}; valid choices: {list(ADVANTAGE_STDS)}")
    _, inverse, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    n_groups = counts.numel()
    total = torch.zeros(n_groups, dtype=rewards.dtype, device=rewards.device).index_add_(0, inverse, rewards)
    mean = total / counts
    sq = torch.zeros_like(total).index_add_(0, inverse, (rewards - mean[inverse]) ** 2)
    if std == "batch":
        scale = rewards.std(unbiased=False).expand_as(rewards)
    else:
        ddof = 1 if std == "group-sample" else 0
        scale = (sq / (counts - ddof).clamp(min=1)).sqrt()[inverse]
    per_group = (rewards - mean[inverse]) / (scale + _EPS)
    singleton = counts[inverse] < 2
    return torch.where(singleton, global_standardize(rewards), per_group)


class PerConditionStatTracker:
    """Rolling per-condition reward statistics (ddpo-pytorch's per-prompt stat tracker).

    Args:
        buffer_size: rewards kept per condition.
        min_count: below this many rewards for a condition, use the batch's statistics.
    """

    def __init__(self, buffer_size: int = 32, min_count: int = 16) -> None:
        if buffer_size < 1 or not 1 <= min_count <= buffer_size:
            raise ValueError(
                f"need 1 <= min_count <= buffer_size, got min_count={min_count}, buffer_size={buffer_size}"
            )
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[int, deque[float]] = {}

    def update(self, conditions: Tensor, rewards: Tensor) -> Tensor:
        """Add the batch's rewards and return their advantages."""
        r = rewards.detach().double().cpu()
        c = conditions.detach().cpu().tolist()
        batch_mean, batch_std = r.mean(), r.std(unbiased=False)
        out = torch.empty_like(r)
        for key in sorted(set(c)):
            idx = torch.tensor([i for i, ci in enumerate(c) if ci == key])
            buffer = self.buffers.setdefault(int(key), deque(maxlen=self.buffer_size))
            buffer.extend(r[idx].tolist())
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                values = torch.tensor(list(buffer), dtype=torch.float64)
                mean, std = values.mean(), values.std(unbiased=False)
            out[idx] = (r[idx] - mean) / (std + _EPS)
        return out.to(device=rewards.device, dtype=rewards.dtype)

    def state_dict(self) -> dict[str, Any]:
        """The buffers, for checkpoints."""
        return {"buffers": {k: list(v) for k, v in self.buffers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.buffers = {int(k): deque(v, maxlen=self.buffer_size) for k, v in state["buffers"].items()}


def compute_advantages(
    rewards: Tensor,
    groups: Tensor,
    conditions: Tensor,
    mode: str = "auto",
    tracker: PerConditionStatTracker | None = None,
    clip: float | Tensor = 5.0,
    std: str = "group",
) -> Tensor:
    """Advantages of a batch of trajectories.

    Args:
        rewards: ``(N,)`` final rewards.
        groups: ``(N,)`` reference ids (``-1`` for trajectories from pure noise).
        conditions: ``(N,)`` class ids.
        mode: ``"group"`` (per reference), ``"condition"`` (per condition, tracked), ``"global"``, or
            ``"auto"``: group when the trajectories come from references, else condition when a
            tracker is given, else global.
        tracker: the per-condition tracker (needed by ``"condition"``).
        clip: clip the advantages to ``[−clip, clip]`` (a tensor: one bound per trajectory).
        std: the ``"group"`` mode's divisor (:func:`group_standardize`).
    """
    if mode not in ADVANTAGE_MODES:
        raise ValueError(f"unknown advantage mode {mode!r}; valid choices: {list(ADVANTAGE_MODES)}")
    if mode == "auto":
        mode = "group" if bool((groups >= 0).all()) else ("condition" if tracker is not None else "global")
    if mode == "group":
        adv = group_standardize(rewards, groups, std)
    elif mode == "condition":
        if tracker is None:
            raise ValueError("advantage mode 'condition' needs a PerConditionStatTracker")
        adv = tracker.update(conditions, rewards)
    else:
        adv = global_standardize(rewards)
    return adv.clamp(-clip, clip)
