"""The reward registry: build rewards by name, and check what any reward takes and returns.

:func:`register_reward` adds a factory under a name, :func:`make_reward` builds a registered reward
or wraps a user callable in a :class:`CheckedReward`, which validates the images and the output.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["CheckedReward", "RewardFn", "available_rewards", "make_reward", "register_reward"]

RewardFn = Callable[[Tensor, Any], Tensor]
"""``reward(images (B, C, H, W) in [0, 1], conditions) -> (B,) float32 tensor on images.device``."""

_REGISTRY: dict[str, Callable[..., RewardFn]] = {}

# How far outside [0, 1] the images may stray (float rounding) before the checked wrapper complains.
_RANGE_TOLERANCE = 1e-3


def register_reward(name: str, factory: Callable[..., RewardFn], *, overwrite: bool = False) -> None:
    """Register a reward factory under a name, for :func:`make_reward`.

    Args:
        name: the reward's name (e.g. ``"jpeg_compressibility"``).
        factory: called with :func:`make_reward`'s keyword arguments; returns a :data:`RewardFn`.
        overwrite: replace an existing registration of the same name instead of failing.

    Raises:
        ValueError: if ``name`` is empty or already registered (and ``overwrite`` is false), or
            ``factory`` is not callable.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"reward name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise ValueError(f"reward factory for {name!r} must be callable, got {type(factory).__name__}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"reward {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = factory


def available_rewards() -> list[str]:
    """Names of the registered rewards, sorted."""
    return sorted(_REGISTRY)


class CheckedReward:
    """A reward function wrapped so that its inputs and output are validated.

    Checks that the images are ``(B, 1 or 3, H, W)`` in ``[0, 1]`` and that the reward returned a
    finite ``(B,)`` tensor, then returns it as float32 on ``images.device`` (keeping any autograd
    graph). Built by :func:`make_reward`; other attributes of the wrapped function (e.g. ``scorer``)
    are reachable through the wrapper.

    Args:
        fn: the reward function.
        name: its name, used in error messages.
    """

    def __init__(self, fn: RewardFn, name: str) -> None:
        self.fn = fn
        self.name = name

    def __getattr__(self, item: str) -> Any:
        if item in ("fn", "name"):  # not set yet (e.g. during unpickling)
            raise AttributeError(item)
        return getattr(self.fn, item)

    def __repr__(self) -> str:
        return f"CheckedReward({self.name!r})"

    def __call__(self, images: Tensor, conditions: Any = None) -> Tensor:
        """Compute and validate the rewards of a batch.

        Args:
            images: ``(B, C, H, W)`` float images in ``[0, 1]``, ``C`` = 1 or 3.
            conditions: class ids, prompts or ``None``, passed through.

        Returns:
            ``(B,)`` float32 rewards on ``images.device``.

        Raises:
            ValueError: for malformed images, or when the reward's output is not a finite ``(B,)``
                tensor.
        """
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"reward {self.name!r}: expected images of shape (B, 1 or 3, H, W), got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"reward {self.name!r}: expected float images in [0, 1], got dtype {images.dtype}")
        batch = images.shape[0]
        if images.numel():
            low, high = torch.stack([images.detach().amin(), images.detach().amax()]).float().tolist()
            if math.isnan(low) or math.isnan(high):  # NaN propagates through amin/amax; a diverged chain
                raise ValueError(f"reward {self.name!r}: the images contain NaN values (did the sampling diverge?)")
            if low < -_RANGE_TOLERANCE or high > 1.0 + _RANGE_TOLERANCE:
                raise ValueError(
                    f"reward {self.name!r}: images must be in [0, 1] but span [{low:.4g}, {high:.4g}] "
                    "(convert model outputs in [-1, 1] with (x + 1) / 2 and clamp)"
                )
        out = self.fn(images, conditions)
        if not isinstance(out, Tensor):
            try:
                out = torch.as_tensor(np.asarray(out))
            except Exception as error:  # noqa: BLE001 - reported below with the reward's name
                raise ValueError(
                    f"reward {self.name!r} returned a {type(out).__name__}, expected a tensor of shape ({batch},)"
                ) from error
        if tuple(out.shape) != (batch,):
            raise ValueError(
                f"reward {self.name!r} returned shape {tuple(out.shape)}, expected ({batch},) (one reward per image)"
            )
        if not (out.is_floating_point() or out.dtype in (torch.int8, torch.int16, torch.int32, torch.int64)):
            raise ValueError(f"reward {self.name!r} returned dtype {out.dtype}, expected a real number per image")
        out = out.to(device=images.device, dtype=torch.float32)
        finite = torch.isfinite(out.detach())
        if not bool(finite.all()):
            bad = (~finite).nonzero().flatten().tolist()
            values = out.detach()[~finite].tolist()
            raise ValueError(f"reward {self.name!r} returned non-finite values {values} at batch indices {bad}")
        return out


def make_reward(spec: str | Mapping[str, float] | RewardFn, **kwargs: Any) -> RewardFn:
    """Build a reward function from a registered name or a weighting of names, or wrap a user callable.

    Args:
        spec: a name from :func:`available_rewards`; a mapping of names to weights, for their weighted
            sum (:class:`~diffusion_gym.rewards.multi.WeightedRewards`); or a callable
            ``(images, conditions) -> (B,)``.
        **kwargs: passed to the registered reward's factory (names only); with a mapping,
            ``normalize`` (``"none"``, ``"running"``, ``"rank"``), ``eps``, and per reward name the
            options of its factory (``make_reward({"a": 1, "b": 2}, normalize="rank", b={"quality": 50})``).

    Returns:
        A :class:`CheckedReward` around the reward, which validates images and outputs.

    Raises:
        ValueError: for an unknown name (the message lists the valid choices), for keyword arguments
            given with a callable, or for a spec that is neither a string, a mapping nor a callable.
    """
    if isinstance(spec, CheckedReward):
        if kwargs:
            raise ValueError("keyword arguments are only used with a registered reward name, not a callable")
        return spec
    if isinstance(spec, str):
        if spec not in _REGISTRY:
            raise ValueError(f"unknown reward {spec!r}; valid choices: {available_rewards()}")
        return CheckedReward(_REGISTRY[spec](**kwargs), spec)
    if isinstance(spec, Mapping):
        from diffusion_gym.rewards.multi import build_weighted_rewards

        combined = build_weighted_rewards(spec, make_reward, **kwargs)
        return CheckedReward(combined, " + ".join(f"{w:g}*{name}" for name, w in combined.weights.items()))
    if callable(spec):
        if kwargs:
            raise ValueError(
                f"keyword arguments {sorted(kwargs)} are only used with a registered reward name, not a callable"
            )
        name = getattr(spec, "__qualname__", None) or getattr(spec, "__name__", None) or type(spec).__name__
        return CheckedReward(spec, name)
    raise ValueError(
        f"reward must be a registered name, a mapping of names to weights or a callable, got "
        f"{type(spec).__name__}; valid names: {available_rewards()}"
    )
