"""Several rewards at once: a weighted sum of named rewards, each normalised before it is weighted.

A YAML config writes ``reward: {pickscore: 1.0, ocr: 0.5}``; in Python, :func:`make_reward` takes the
same mapping (``make_reward({"jpeg_compressibility": 1.0, "digit_confidence": 2.0}, normalize="rank")``)
and returns a :class:`WeightedRewards` inside the usual checks.

Normalisation (``normalize=``) puts rewards of different scales on one footing before the weights
apply (a JPEG size in kB and a probability differ by two orders of magnitude):

* ``"none"``: ``Σ w_i r_i``, the raw sum (flow_grpo's multi-reward).
* ``"running"``: ``Σ w_i (r_i − m_i) / s_i`` with the running mean ``m_i`` and standard deviation
  ``s_i`` of reward ``i`` over every training batch so far, this one included (updated before it is
  normalised; ``s_i`` is floored at ``eps``). The statistics are part of the env's checkpointed state.
* ``"rank"``: ``Σ w_i (rank_i / (B − 1) − ½)``: each reward's rank within the batch, mapped to
  ``[−½, ½]`` (ties share their mean rank), so that only the order of the images counts for each
  reward, whatever its scale or outliers.

Every call records each component's raw values (:attr:`WeightedRewards.last`); the training calls
also accumulate them until :meth:`WeightedRewards.pop_means`, which the trainers call once per epoch
to log ``reward/<name>``. In evaluation mode (:meth:`WeightedRewards.train` ``(False)``, as the
trainers' fixed-noise evaluation sets) the statistics are left alone and the raw weighted sum is
returned, so that evaluations are comparable across training.

Under data-parallel training each process normalises its own share of the batch with its own statistics.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

RewardFn = Callable[[Tensor, Any], Tensor]  # as diffusion_gym.rewards.registry's (which imports this module)

__all__ = ["NORMALIZATIONS", "WeightedRewards", "build_weighted_rewards", "evaluation_mode", "weighted_rewards_of"]

NORMALIZATIONS = ("none", "running", "rank")
"""How :class:`WeightedRewards` scales each reward before weighting it."""


def _ranks(values: Tensor) -> Tensor:
    """Each value's rank among ``values`` mapped to ``[−½, ½]``; tied values share their mean rank."""
    n = values.numel()
    if n < 2:
        return torch.zeros_like(values)
    order = values.argsort()
    ranks = torch.empty(n, dtype=torch.float64, device=values.device)
    ranks[order] = torch.arange(n, dtype=torch.float64, device=values.device)
    _, inverse = torch.unique(values, return_inverse=True)
    mean_rank = torch.zeros(n, dtype=torch.float64, device=values.device).index_add_(0, inverse, ranks)
    counts = torch.zeros(n, dtype=torch.float64, device=values.device).index_add_(0, inverse, torch.ones_like(ranks))
    tied = mean_rank[inverse] / counts[inverse]
    return (tied / (n - 1) - 0.5).to(values.dtype)


class _RunningMoments:
    """Count, mean and sum of squared deviations of a stream of batches (Chan et al.'s parallel update)."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: Tensor) -> None:
        v = values.detach().double().flatten()
        n = v.numel()
        if n == 0:
            return
        batch_mean = float(v.mean())
        batch_m2 = float(((v - batch_mean) ** 2).sum())
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else 0.0


class WeightedRewards:
    """``Σ_i w_i · normalise(r_i(images, conditions))`` over named rewards (see the module docstring).

    Args:
        rewards: name → reward function (built, e.g. with :func:`~diffusion_gym.rewards.make_reward`).
        weights: name → weight (the same names; a weight may be negative, to penalise a reward).
        normalize: ``"none"``, ``"running"`` or ``"rank"``.
        eps: the floor of the running standard deviation.

    Raises:
        ValueError: for no rewards, names that differ between ``rewards`` and ``weights``, a
            non-finite weight or an unknown ``normalize``.
    """

    def __init__(
        self, rewards: Mapping[str, RewardFn], weights: Mapping[str, float], normalize: str = "none", eps: float = 1e-6
    ) -> None:
        if not rewards:
            raise ValueError("a weighted reward needs at least one reward, got none")
        if set(rewards) != set(weights):
            raise ValueError(f"rewards {sorted(rewards)} and weights {sorted(weights)} must name the same rewards")
        bad = {name: w for name, w in weights.items() if not isinstance(w, int | float) or not math.isfinite(w)}
        if bad:
            raise ValueError(f"reward weights must be finite numbers, got {bad}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"unknown normalize {normalize!r}; valid choices: {list(NORMALIZATIONS)}")
        self.rewards = dict(rewards)
        self.weights = {name: float(weights[name]) for name in rewards}
        self.normalize = normalize
        self.eps = eps
        self.training = True
        self.moments = {name: _RunningMoments() for name in rewards}
        self.last: dict[str, Tensor] = {}
        """Each component's raw ``(B,)`` values at the last call."""
        self._sums = dict.fromkeys(rewards, 0.0)
        self._counts = dict.fromkeys(rewards, 0)
        self.runs_on_host = all(bool(getattr(fn, "runs_on_host", False)) for fn in self.rewards.values())

    def __repr__(self) -> str:
        terms = " + ".join(f"{w:g}·{name}" for name, w in self.weights.items())
        return f"WeightedRewards({terms}, normalize={self.normalize!r})"

    def train(self, mode: bool = True) -> WeightedRewards:
        """Training mode (normalised, statistics updated) or evaluation mode (raw weighted sum, nothing updated)."""
        self.training = bool(mode)
        return self

    def components(self, images: Tensor, conditions: Any = None) -> dict[str, Tensor]:
        """Each reward's raw ``(B,)`` float32 values on ``images``."""
        return {name: fn(images, conditions).float() for name, fn in self.rewards.items()}

    def _normalised(self, name: str, values: Tensor) -> Tensor:
        if self.normalize == "rank":
            return _ranks(values.detach())
        if self.normalize == "running":
            stats = self.moments[name]
            return (values - stats.mean) / max(stats.std, self.eps)
        return values

    def __call__(self, images: Tensor, conditions: Any = None) -> Tensor:
        """The weighted sum for ``images`` (normalised in training mode, raw in evaluation mode)."""
        parts = self.components(images, conditions)
        self.last = {name: values.detach() for name, values in parts.items()}
        if not self.training:
            return sum(self.weights[name] * values for name, values in parts.items())  # type: ignore[return-value]
        total = torch.zeros(images.shape[0], device=images.device)
        for name, values in parts.items():
            detached = values.detach()
            self._sums[name] += float(detached.double().sum())
            self._counts[name] += detached.numel()
            if self.normalize == "running":
                self.moments[name].update(detached)
            total = total + self.weights[name] * self._normalised(name, values).to(total.device)
        return total

    def pop_means(self) -> dict[str, float]:
        """Each component's mean raw value over the training calls since the last pop (names with none left out)."""
        means = {name: self._sums[name] / self._counts[name] for name in self.rewards if self._counts[name]}
        self._sums = dict.fromkeys(self.rewards, 0.0)
        self._counts = dict.fromkeys(self.rewards, 0)
        return means

    def reward_state_dict(self) -> dict[str, Any]:
        """The running statistics (for exact resumption; part of the env's ``state_dict``)."""
        return {name: [m.count, m.mean, m.m2] for name, m in self.moments.items()}

    def load_reward_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`reward_state_dict`.

        Raises:
            ValueError: when the saved statistics name other rewards.
        """
        if set(state) != set(self.moments):
            raise ValueError(
                f"saved reward statistics are for {sorted(state)}, this reward combines {sorted(self.moments)}"
            )
        for name, (count, mean, m2) in state.items():
            self.moments[name].count, self.moments[name].mean, self.moments[name].m2 = (
                int(count),
                float(mean),
                float(m2),
            )


@contextlib.contextmanager
def evaluation_mode(reward_fn: Any) -> Iterator[None]:
    """Within the block, a reward with ``train(mode)`` (a :class:`WeightedRewards`) is in evaluation mode."""
    train = getattr(reward_fn, "train", None)
    was = getattr(reward_fn, "training", True)
    if callable(train):
        train(False)
    try:
        yield
    finally:
        if callable(train):
            train(was)


def build_weighted_rewards(
    weights: Mapping[str, float],
    make: Callable[..., RewardFn],
    normalize: str = "none",
    eps: float = 1e-6,
    **options: Any,
) -> WeightedRewards:
    """A :class:`WeightedRewards` over registered rewards, each built by ``make(name, **options[name])``.

    Args:
        weights: registered reward name → weight.
        make: the builder of one named reward (:func:`~diffusion_gym.rewards.make_reward`).
        normalize: see :class:`WeightedRewards`.
        eps: see :class:`WeightedRewards`.
        **options: per reward name, the options of its factory (a mapping).

    Raises:
        ValueError: for a name that is not a string, options for a reward the mapping does not name,
            options that are not a mapping, or what :class:`WeightedRewards` refuses.
    """
    names = list(weights)
    not_names = [name for name in names if not isinstance(name, str)]
    if not_names:
        raise ValueError(f"a weighted reward maps registered reward names to weights, got keys {not_names}")
    unknown = sorted(set(options) - set(names))
    if unknown:
        raise ValueError(
            f"options {unknown} name no reward of the weighted sum; valid keys: normalize, eps, or one of {names}"
        )
    for name, value in options.items():
        if not isinstance(value, Mapping):
            raise ValueError(
                f"the options of reward {name!r} must be a mapping of its factory's keywords, got {value!r}"
            )
    rewards = {name: make(name, **dict(options.get(name, {}))) for name in names}
    return WeightedRewards(rewards, weights, normalize=normalize, eps=eps)


def weighted_rewards_of(reward_fn: Any) -> WeightedRewards | None:
    """The :class:`WeightedRewards` ``reward_fn`` is or wraps (a :class:`CheckedReward`'s), else ``None``."""
    inner = getattr(reward_fn, "fn", reward_fn) if not isinstance(reward_fn, WeightedRewards) else reward_fn
    return inner if isinstance(inner, WeightedRewards) else None
