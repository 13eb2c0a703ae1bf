"""Window strategies: at which step index an episode of ``DiffusionDenoise-v0`` starts.

Step indices run from 0 (the noisiest step, pure noise) to K − 1 (the last step). A window
strategy answers, at the start of each batch of episodes, "from which step index ``k_0``?":

* :class:`FullWindow` (``"full"``) — DDPO: ``k_0 = 0`` from pure noise, no reference image.
* :class:`PredefinedWindows` (``"hrf"``, ``"hrf-baseline"``, ``"hrf-early"``, ``"hrf-later"``, or
  any list of clusters) — HRF: a list of clusters ``[(a, b), …]`` of step indices, each used for a
  number of *iterations*; in an iteration, ``k_0 ~ U{a..b}`` from the current cluster.
* :class:`DynamicWindow` (``"hrf-d"``) — HRF-D: at the start of each iteration, probe candidate
  steps with the current policy and pick the one with the largest reward gain, penalised by the
  loss of diversity (see its docstring for the exact objective and the sign convention).

An *iteration* is ``batches_per_iteration`` batches (default 1): a training epoch that collects
several batches sets it to that number (the paper's "samples per iteration" / batch size). The
strategy counts batches itself, so the env needs no call from the trainer; its counters are in
:meth:`WindowStrategy.state_dict` for checkpoints.

Windows live in the env (``window=`` argument) because a native vector env's autoreset does not
pass through Gymnasium wrappers; :class:`WindowWrapper` sets one on an existing env.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

# The paper's clusters (step indices of a 40-step chain) and iterations per cluster.
PRESETS: dict[str, tuple[list[tuple[int, int]], list[int]]] = {
    "hrf": ([(8, 12), (18, 22), (28, 32)], [8, 8, 8]),
    "hrf-baseline": ([(8, 12), (18, 22), (28, 32)], [8, 8, 8]),
    "hrf-early": ([(3, 7), (18, 22), (28, 32)], [8, 8, 8]),
    "hrf-later": ([(8, 12), (28, 32)], [8, 8]),
    # Tables 4–5 of the paper (full-size runs):
    "hrf-aesthetic": ([(3, 7), (18, 22), (28, 32)], [8, 8, 8]),
    "hrf-compressibility": ([(8, 12), (18, 24), (28, 36)], [8, 8, 8]),
}
WINDOW_NAMES = ("full", *PRESETS, "hrf-d")


@dataclass
class ProbeResult:
    """What a probe from one candidate start step returns (see :class:`DynamicWindow`)."""

    rewards: Tensor
    """``(n,)`` rewards of the references denoised from the candidate step."""
    images: Tensor
    """``(n, C, H, W)`` the denoised references ``x̃_{k→0}``."""


Probe = Callable[[int], ProbeResult]
"""``probe(k)``: noise the probe references to step index ``k`` and denoise them deterministically."""


class WindowStrategy(ABC):
    """Chooses the start step index of each batch of episodes.

    Args:
        batches_per_iteration: how many batches make one iteration (an HRF "iteration").
    """

    #: Whether episodes start from a noised reference image (False: from pure noise).
    uses_references: bool = True
    #: Whether :meth:`start_steps` needs a probe (HRF-D).
    needs_probe: bool = False

    def __init__(self, batches_per_iteration: int = 1) -> None:
        if not isinstance(batches_per_iteration, int) or batches_per_iteration < 1:
            raise ValueError(f"batches_per_iteration must be an int >= 1, got {batches_per_iteration!r}")
        self.batches_per_iteration = batches_per_iteration
        self.batches = 0
        self.num_steps: int | None = None

    @property
    def iteration(self) -> int:
        """The current iteration (0-based)."""
        return self.batches // self.batches_per_iteration

    def bind(self, num_steps: int) -> None:
        """Check the strategy against a chain of ``num_steps`` steps (called by the env)."""
        self.num_steps = num_steps

    def next_batch(
        self, n: int, rng: np.random.Generator, probe: Probe | None = None, count: bool = True
    ) -> np.ndarray:
        """Start step indices for the next batch of ``n`` episodes (and count the batch).

        Args:
            n: number of start steps to draw (1 when the batch shares one start step).
            rng: the env's random generator.
            probe: for strategies that probe the policy (HRF-D).
            count: count a batch (``False`` when the env counts batches itself with
                :meth:`count_batch`, e.g. per-sample starts).

        Returns:
            ``(n,)`` int64 step indices in ``[0, K − 1]``.
        """
        if self.num_steps is None:
            raise RuntimeError(f"{type(self).__name__} is not bound to an env: call bind(num_steps) first")
        steps = np.asarray(self._start_steps(n, rng, probe), dtype=np.int64)
        if count:
            self.count_batch()
        return steps

    def restart(self) -> None:
        """Go back to iteration 0 (the env calls this on a seeded ``reset``)."""
        self.batches = 0

    def count_batch(self) -> None:
        """Count one batch (iterations advance every ``batches_per_iteration`` batches)."""
        self.batches += 1

    @abstractmethod
    def _start_steps(self, n: int, rng: np.random.Generator, probe: Probe | None) -> np.ndarray: ...

    def state_dict(self) -> dict[str, Any]:
        """Counters to restore with :meth:`load_state_dict` (for checkpoints)."""
        return {"batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counters of :meth:`state_dict`."""
        self.batches = int(state["batches"])

    def describe(self) -> str:
        """A short human-readable description (the trainers' start-up summary shows it)."""
        return type(self).__name__


class FullWindow(WindowStrategy):
    """DDPO: every episode starts at step index 0 from pure noise."""

    uses_references = False

    def _start_steps(self, n: int, rng: np.random.Generator, probe: Probe | None) -> np.ndarray:
        return np.zeros(n, dtype=np.int64)

    def describe(self) -> str:
        """See :meth:`WindowStrategy.describe`."""
        return "full (DDPO: from pure noise)"


class PredefinedWindows(WindowStrategy):
    """HRF: clusters of step indices, each used for a number of iterations.

    In iteration ``i``, the current cluster is the one whose share of the cumulative iteration
    counts holds ``i``; start steps are drawn uniformly from ``{a, …, b}`` (``end_inclusive=True``, the
    default) or from ``{a, …, b − 1}`` (``False``: the HRF authors' ``torch.arange(a, b)``). After the
    last cluster the schedule starts again from the first (``cycle=True``, default) or stays in the last.

    Args:
        clusters: ``[(a, b), …]`` with ``0 ≤ a ≤ b < K`` (step indices, 0 = noisiest); half-open
            clusters need ``a < b ≤ K``.
        iterations: iterations per cluster (same length, each ≥ 1); default 8 each, as in the paper.
        cycle: start over after the last cluster (else stay in it).
        batches_per_iteration: see :class:`WindowStrategy`.
        end_inclusive: draw ``b`` too (the project's default) or not (the authors' code).
    """

    def __init__(
        self,
        clusters: Sequence[Sequence[int]],
        iterations: Sequence[int] | None = None,
        cycle: bool = True,
        batches_per_iteration: int = 1,
        end_inclusive: bool = True,
    ) -> None:
        super().__init__(batches_per_iteration)
        self.clusters = _validate_clusters(clusters)
        self.end_inclusive = bool(end_inclusive)
        empty = [c for c in self.clusters if not self.end_inclusive and c[0] == c[1]]
        if empty:
            raise ValueError(f"half-open clusters (end_inclusive=False) need a < b; {empty[0]} holds no step")
        iterations = [8] * len(self.clusters) if iterations is None else list(iterations)
        if len(iterations) != len(self.clusters) or not all(isinstance(i, int) and i >= 1 for i in iterations):
            raise ValueError(
                f"iterations must list one int >= 1 per cluster ({len(self.clusters)} clusters), got {iterations!r}"
            )
        self.iterations = iterations
        self.cycle = cycle

    def bind(self, num_steps: int) -> None:
        """Check that every cluster's steps lie in ``[0, num_steps − 1]``."""
        for a, b in self.clusters:
            if b - (not self.end_inclusive) >= num_steps:
                raise ValueError(
                    f"cluster {(a, b)} does not fit a chain of {num_steps} steps: step indices must lie in "
                    f"[0, {num_steps - 1}] (clusters {self.clusters})"
                )
        super().bind(num_steps)

    def cluster_index(self, iteration: int | None = None) -> int:
        """Index of the cluster used in ``iteration`` (default: the current one)."""
        i = self.iteration if iteration is None else iteration
        total = sum(self.iterations)
        if self.cycle:
            i %= total
        bounds = np.cumsum(self.iterations)
        return int(min(np.searchsorted(bounds, i, side="right"), len(self.clusters) - 1))

    @property
    def current_cluster(self) -> tuple[int, int]:
        """The ``(a, b)`` cluster of the current iteration."""
        return self.clusters[self.cluster_index()]

    def _start_steps(self, n: int, rng: np.random.Generator, probe: Probe | None) -> np.ndarray:
        a, b = self.current_cluster
        return rng.integers(a, b + int(self.end_inclusive), size=n)

    def describe(self) -> str:
        """See :meth:`WindowStrategy.describe`."""
        ends = "" if self.end_inclusive else " (half-open: b excluded)"
        return f"predefined windows {self.clusters}{ends} × {self.iterations} iterations"


class DynamicWindow(WindowStrategy):
    """HRF-D: pick the start step by probing the current policy, once per iteration.

    For each candidate step index ``k`` (every ``stride``-th index from ``first`` to K − 1), the
    probe noises the probe references to ``k`` and denoises them *deterministically* (DDIM, eta = 0)
    with the current policy to ``x̃_{k→0}``, then scores them: ``R_k`` (mean reward) and
    ``D_k = mean_i D_cos(x_ref_i, x̃_{k→0,i})`` (cosine distance to the references). With the next
    candidate ``k⁺`` (and ``R_K`` = the reward of the references themselves, no step taken)::

        gain_k   = R_k − R_{k⁺}        # reward gained by letting the policy act from k instead of k⁺
        score_k  = norm(gain_k) − β · norm(D_k)
        k_0      = argmax_k score_k

    ``norm`` is min-max normalisation over the candidates (a constant term normalises to 0).

    Sign convention: the paper writes ``R_t − R_{t+1}`` on its own time axis, where ``t + 1`` is
    the *noisier* step; on our step-index axis (0 = noisiest) the "reward gained by starting here"
    is ``R_k − R_{k⁺}`` with ``k⁺`` the *less noisy* neighbour, which is what is computed by
    default. ``paper_sign=True`` flips the difference (``R_{k⁺} − R_k``) for ablations.

    Args:
        beta: weight of the diversity penalty (paper: 1.0).
        stride: candidate spacing in step indices (default 2).
        first: first candidate step index.
        last: last candidate step index (default K − 1): bounds how late an episode may start, i.e.
            guarantees at least ``K − last`` steps to train.
        paper_sign: use the literal paper difference instead (see above).
        batches_per_iteration: see :class:`WindowStrategy`; probes run once per iteration.
    """

    needs_probe = True

    def __init__(
        self,
        beta: float = 1.0,
        stride: int = 2,
        first: int = 0,
        last: int | None = None,
        paper_sign: bool = False,
        batches_per_iteration: int = 1,
    ) -> None:
        super().__init__(batches_per_iteration)
        if last is not None and (not isinstance(last, int) or last < first):
            raise ValueError(f"last must be an int >= first ({first}), got {last!r}")
        self.last = last
        if not (isinstance(beta, int | float) and math.isfinite(beta) and beta >= 0):
            raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
        if not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride must be an int >= 1, got {stride!r}")
        if not isinstance(first, int) or first < 0:
            raise ValueError(f"first must be an int >= 0, got {first!r}")
        self.beta, self.stride, self.first, self.paper_sign = float(beta), stride, first, paper_sign
        self.chosen: int | None = None
        self._chosen_iteration: int | None = None
        self.last_scores: dict[str, list[float]] = {}

    def bind(self, num_steps: int) -> None:
        """Check that the first candidate lies in the chain."""
        if self.first >= num_steps:
            raise ValueError(f"first candidate {self.first} is outside a chain of {num_steps} steps")
        if self.last is not None and self.last >= num_steps:
            raise ValueError(f"last candidate {self.last} is outside a chain of {num_steps} steps")
        super().bind(num_steps)

    @property
    def candidates(self) -> list[int]:
        """The candidate step indices."""
        assert self.num_steps is not None
        last = self.num_steps - 1 if self.last is None else self.last
        return list(range(self.first, last + 1, self.stride))

    def select(self, rewards: Sequence[float], distances: Sequence[float], reference_reward: float) -> int:
        """The objective: index into :attr:`candidates` of the best start step.

        Args:
            rewards: ``R_k`` for each candidate, in candidate order.
            distances: ``D_k`` for each candidate.
            reference_reward: ``R_K``, the mean reward of the references themselves.
        """
        r = np.asarray(list(rewards) + [reference_reward], dtype=np.float64)
        gain = r[:-1] - r[1:]
        if self.paper_sign:
            gain = -gain
        d = np.asarray(distances, dtype=np.float64)
        score = _minmax(gain) - self.beta * _minmax(d)
        self.last_scores = {
            "reward": r[:-1].tolist(),
            "reference_reward": float(r[-1]),
            "gain": gain.tolist(),
            "distance": d.tolist(),
            "score": score.tolist(),
        }
        return int(np.argmax(score))

    def _start_steps(self, n: int, rng: np.random.Generator, probe: Probe | None) -> np.ndarray:
        if self.chosen is None or self._chosen_iteration != self.iteration:
            if probe is None:
                raise RuntimeError("the hrf-d window needs a probe (the env passes one built from its denoiser)")
            rewards, distances = [], []
            reference = probe(self.num_steps)  # k = K: no step taken, the references themselves
            ref_flat = reference.images.flatten(1).double()
            for k in self.candidates:
                result = probe(k)
                rewards.append(result.rewards.double().mean().item())
                cos = torch.nn.functional.cosine_similarity(result.images.flatten(1).double(), ref_flat, dim=1)
                distances.append((1 - cos).mean().item())
            self.chosen = self.candidates[self.select(rewards, distances, reference.rewards.double().mean().item())]
            self._chosen_iteration = self.iteration
        return np.full(n, self.chosen, dtype=np.int64)

    def restart(self) -> None:
        """See :meth:`WindowStrategy.restart`; also forget the current choice."""
        super().restart()
        self.chosen = self._chosen_iteration = None

    def state_dict(self) -> dict[str, Any]:
        """See :meth:`WindowStrategy.state_dict`; also the current choice."""
        return {**super().state_dict(), "chosen": self.chosen, "chosen_iteration": self._chosen_iteration}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """See :meth:`WindowStrategy.load_state_dict`."""
        super().load_state_dict(state)
        self.chosen, self._chosen_iteration = state.get("chosen"), state.get("chosen_iteration")

    def describe(self) -> str:
        """See :meth:`WindowStrategy.describe`."""
        return f"dynamic (HRF-D, beta={self.beta}, stride={self.stride})"


def _minmax(v: np.ndarray) -> np.ndarray:
    span = v.max() - v.min()
    return np.zeros_like(v) if span == 0 else (v - v.min()) / span


def _validate_clusters(clusters: Any) -> list[tuple[int, int]]:
    example = "e.g. [(8, 12), (18, 22), (28, 32)]"
    if isinstance(clusters, str | bytes) or not isinstance(clusters, Sequence) or len(clusters) == 0:
        raise ValueError(f"clusters must be a non-empty list of (a, b) step-index pairs ({example}), got {clusters!r}")
    out = []
    for c in clusters:
        ok = isinstance(c, Sequence) and not isinstance(c, str) and len(c) == 2
        ok = ok and all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in c)
        if not ok or not 0 <= c[0] <= c[1]:
            raise ValueError(f"malformed cluster {c!r} in {clusters!r}: each must be (a, b) ints with 0 <= a <= b")
        out.append((int(c[0]), int(c[1])))
    return out


def make_window(spec: str | Sequence[Sequence[int]] | WindowStrategy, **kwargs: Any) -> WindowStrategy:
    """Build a window strategy from a name, a cluster list or an instance.

    Args:
        spec: ``"full"``, a preset name (``"hrf"``, ``"hrf-baseline"``, ``"hrf-early"``,
            ``"hrf-later"``, ``"hrf-aesthetic"``, ``"hrf-compressibility"``), ``"hrf-d"``, a list of
            ``(a, b)`` clusters, or a :class:`WindowStrategy` (returned as is).
        **kwargs: passed to the strategy (e.g. ``iterations=``, ``beta=``, ``stride=``,
            ``batches_per_iteration=``).

    Raises:
        ValueError: for an unknown name or a malformed cluster list (naming the valid choices).
    """
    if isinstance(spec, WindowStrategy):
        if kwargs:
            raise ValueError(f"window options {sorted(kwargs)} cannot be applied to a WindowStrategy instance")
        return spec
    if isinstance(spec, str):
        if spec == "full":
            return FullWindow(**kwargs)
        if spec == "hrf-d":
            return DynamicWindow(**kwargs)
        if spec in PRESETS:
            clusters, iterations = PRESETS[spec]
            return PredefinedWindows(clusters, **{"iterations": iterations, **kwargs})
        raise ValueError(f"unknown window {spec!r}; valid choices: {list(WINDOW_NAMES)} or a list of (a, b) clusters")
    return PredefinedWindows(spec, **kwargs)


class WindowWrapper(gym.Wrapper):
    """Set the window strategy of a ``DiffusionDenoise`` env (single or its core) from the outside.

    ``WindowWrapper(gym.make("DiffusionDenoise-v0"), "hrf-early")`` is the same as
    ``gym.make("DiffusionDenoise-v0", window="hrf-early")``. The strategy is installed in the
    unwrapped env (where resets happen), so it also applies to resets that bypass wrappers.

    Args:
        env: a ``DiffusionDenoise-v0`` env, possibly wrapped.
        window: see :func:`make_window`.
        **kwargs: window options.
    """

    def __init__(self, env: gym.Env, window: str | Sequence[Sequence[int]] | WindowStrategy, **kwargs: Any) -> None:
        super().__init__(env)
        base = env.unwrapped
        if not hasattr(base, "set_window"):
            raise TypeError(f"WindowWrapper needs a DiffusionDenoise env, got {type(base).__name__}")
        base.set_window(make_window(window, **kwargs))

    @property
    def window(self) -> WindowStrategy:
        """The installed strategy."""
        return self.env.unwrapped.window
