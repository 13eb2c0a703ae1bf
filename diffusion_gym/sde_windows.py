"""SDE windows: which steps of a flow-matching chain are stochastic actions, batch by batch.

A flow model's sampler is an ODE; Flow-GRPO makes a step a Gaussian policy by sampling it as an SDE
with the same marginals (:mod:`diffusion_gym.sampling`). Its cost-cutting variants keep most steps
ODE steps and make only a small window of consecutive steps SDE steps: only those are actions an
agent stores and trains on (one backward pass each), while every episode still runs the whole
chain. A *start* window (:mod:`diffusion_gym.windows`, HRF) chooses where an episode begins; an
*SDE* window chooses, at the start of each batch, which of its steps are stochastic:

* :class:`FixedSdeWindow` (``(a, b)``): always the steps ``[a, b)`` (Flow-GRPO-Fast with a fixed window).
* :class:`RandomSdeWindow` (``"random"``): each batch draws a window of ``size`` steps whose first
  step is uniform in ``[low, high − size]`` (Flow-GRPO-Fast's ``sde_window_size`` and
  ``sde_window_range``; its default range is the first half of the chain).
* :class:`SlidingSdeWindow` (``"sliding"``): MixGRPO's window of ``size`` steps that starts at ``low``
  and moves ``stride`` steps later every ``every`` batches, back to ``low`` once it would pass ``high``
  (the noisy early steps first, then progressively later ones as training goes on).

Windows count steps **from the batch's start step**: with a full window (pure noise) ``(0, 2)`` is
the chain's first two steps; with an HRF start at step ``k0`` it is ``k0`` and ``k0 + 1``, so a start
window and an SDE window compose (the SDE steps are cut at the chain's end). Every SDE step keeps
its noise level ``a`` whichever window holds it, so a stored step's log-probability is the same
under the all-SDE schedule the agents recompute it with.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "SDE_WINDOW_NAMES",
    "FixedSdeWindow",
    "RandomSdeWindow",
    "SdeWindow",
    "SlidingSdeWindow",
    "make_sde_window",
]

SDE_WINDOW_NAMES = ("random", "sliding")


def _check_int(name: str, value: Any, minimum: int) -> int:
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


class SdeWindow(ABC):
    """Chooses, per batch, the steps ``[a, b)`` (counted from the batch's start step) that are SDE steps."""

    def __init__(self) -> None:
        self.batches = 0
        self.num_steps: int | None = None

    def bind(self, num_steps: int) -> None:
        """Check the window against a chain of ``num_steps`` steps (the env calls this)."""
        self.num_steps = num_steps

    def next_window(self, rng: np.random.Generator) -> tuple[int, int]:
        """The next batch's window ``(a, b)``, and count the batch."""
        if self.num_steps is None:
            raise RuntimeError(f"{type(self).__name__} is not bound to an env: call bind(num_steps) first")
        window = self._window(rng)
        self.batches += 1
        return window

    @abstractmethod
    def _window(self, rng: np.random.Generator) -> tuple[int, int]: ...

    def restart(self) -> None:
        """Back to the first batch (a seeded ``reset``)."""
        self.batches = 0

    def state_dict(self) -> dict[str, Any]:
        """The batch counter, for checkpoints."""
        return {"batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.batches = int(state["batches"])

    @abstractmethod
    def describe(self) -> str:
        """One line for logs."""


class FixedSdeWindow(SdeWindow):
    """The same steps ``[a, b)`` in every batch.

    Raises:
        ValueError: unless ``0 <= a < b`` (and, once bound, ``b <= K``).
    """

    def __init__(self, a: int, b: int) -> None:
        super().__init__()
        if not all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in (a, b)) or not 0 <= a < b:
            raise ValueError(f"sde_window must be step indices (a, b) with 0 <= a < b, got {(a, b)!r}")
        self.a, self.b = int(a), int(b)

    def bind(self, num_steps: int) -> None:
        """Check that the window fits the chain."""
        if self.b > num_steps:
            raise ValueError(
                f"sde_window must be step indices (a, b) with 0 <= a < b <= {num_steps}, got {(self.a, self.b)}"
            )
        super().bind(num_steps)

    def _window(self, rng: np.random.Generator) -> tuple[int, int]:
        return self.a, self.b

    def describe(self) -> str:
        """``SDE steps [a, b)``."""
        return f"SDE steps [{self.a}, {self.b})"


class _RangedSdeWindow(SdeWindow):
    """A window of ``size`` steps inside ``[low, high)`` (default ``high``: set by the subclass at bind)."""

    def __init__(self, size: int, low: int, high: int | None) -> None:
        super().__init__()
        self.size = _check_int("sde window size", size, 1)
        self.low = _check_int("sde window low", low, 0)
        self.high = None if high is None else _check_int("sde window high", high, 1)
        self._high = self.high

    def _default_high(self, num_steps: int) -> int:
        return num_steps

    def bind(self, num_steps: int) -> None:
        """Resolve the range and check that the window fits in it."""
        high = self._default_high(num_steps) if self.high is None else self.high
        if not self.low + self.size <= high <= num_steps:
            raise ValueError(
                f"an SDE window of size {self.size} needs low + size <= high <= {num_steps} (the chain's steps), "
                f"got low={self.low}, high={high}"
            )
        self._high = high
        super().bind(num_steps)

    @property
    def last_start(self) -> int:
        """The largest first step a window may have."""
        assert self._high is not None
        return self._high - self.size


class RandomSdeWindow(_RangedSdeWindow):
    """Flow-GRPO-Fast: each batch, ``size`` consecutive steps starting uniformly in ``[low, high − size]``.

    Args:
        size: SDE steps per episode (Flow-GRPO-Fast: 2 or 3).
        low: the first step a window may start at.
        high: the window ends at or before this step (default: half the chain, Flow-GRPO's
            ``sde_window_range = (0, num_steps // 2)``).
    """

    def __init__(self, size: int = 2, low: int = 0, high: int | None = None) -> None:
        super().__init__(size, low, high)

    def _default_high(self, num_steps: int) -> int:
        return max(num_steps // 2, self.low + self.size)

    def _window(self, rng: np.random.Generator) -> tuple[int, int]:
        a = int(rng.integers(self.low, self.last_start + 1))
        return a, a + self.size

    def describe(self) -> str:
        """``random SDE window …``."""
        return f"random SDE window of {self.size} steps in [{self.low}, {self._high})"


class SlidingSdeWindow(_RangedSdeWindow):
    """MixGRPO: ``size`` steps from ``low``, moved ``stride`` steps later every ``every`` batches, wrapping.

    Batch ``n`` uses the steps from ``low + (n // every · stride) mod (last_start − low + 1)``.

    Args:
        size: SDE steps per episode (MixGRPO: 4 of 25).
        stride: steps the window moves at each shift (MixGRPO: 1).
        every: batches between shifts (MixGRPO's shift interval, in batches: its iterations ×
            ``sample.num_batches_per_epoch``).
        low: where the window starts (and restarts).
        high: the window ends at or before this step (default: the chain's end).
    """

    def __init__(self, size: int = 4, stride: int = 1, every: int = 1, low: int = 0, high: int | None = None) -> None:
        super().__init__(size, low, high)
        self.stride = _check_int("sde window stride", stride, 1)
        self.every = _check_int("sde window every", every, 1)

    def _window(self, rng: np.random.Generator) -> tuple[int, int]:
        positions = self.last_start - self.low + 1
        a = self.low + ((self.batches // self.every) * self.stride) % positions
        return a, a + self.size

    def describe(self) -> str:
        """``sliding SDE window …``."""
        return (
            f"sliding SDE window of {self.size} steps in [{self.low}, {self._high}), "
            f"+{self.stride} every {self.every} batch(es)"
        )


def make_sde_window(spec: str | Sequence[int] | SdeWindow | None, **kwargs: Any) -> SdeWindow | None:
    """Build an SDE window from ``(a, b)``, ``"random"``, ``"sliding"``, a built window, or ``None`` (none).

    Args:
        spec: the window.
        **kwargs: the options of ``"random"`` (``size``, ``low``, ``high``) or ``"sliding"`` (also
            ``stride``, ``every``).

    Raises:
        ValueError: for an unknown name, a bad option, or options for a window that takes none.
    """
    if spec is None or isinstance(spec, SdeWindow):
        if kwargs:
            raise ValueError(f"sde_window_kwargs {sorted(kwargs)} need a named SDE window: {list(SDE_WINDOW_NAMES)}")
        return spec
    if isinstance(spec, str):
        classes = {"random": RandomSdeWindow, "sliding": SlidingSdeWindow}
        if spec not in classes:
            raise ValueError(
                f"unknown sde_window {spec!r}; valid choices: {list(SDE_WINDOW_NAMES)}, step indices [a, b], or null"
            )
        try:
            return classes[spec](**kwargs)
        except TypeError as error:
            raise ValueError(f"bad sde_window_kwargs for {spec!r}: {error}") from None
    values = list(spec)
    if len(values) != 2:
        raise ValueError(f"sde_window must be step indices (a, b), 'random', 'sliding' or null, got {spec!r}")
    if kwargs:
        raise ValueError(f"sde_window_kwargs {sorted(kwargs)} need a named SDE window: {list(SDE_WINDOW_NAMES)}")
    return FixedSdeWindow(*values)
