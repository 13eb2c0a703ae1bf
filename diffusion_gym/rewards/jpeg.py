"""JPEG size rewards, measured as ddpo-pytorch does: PIL's JPEG at quality 95, size in kB.

``jpeg_compressibility`` rewards small files, ``jpeg_incompressibility`` large ones. Both are host
rewards (:func:`~diffusion_gym.rewards.host_reward`); the images of a batch are encoded on a shared
thread pool (:func:`set_jpeg_workers`).
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from diffusion_gym.rewards.host import LazyThreadPool, host_reward
from diffusion_gym.rewards.registry import RewardFn

__all__ = [
    "JPEG_QUALITY",
    "JPEG_QUALITY_RANGE",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "jpeg_size_kb",
    "set_jpeg_workers",
]

JPEG_QUALITY = 95
"""The JPEG quality of DDPO's rewards."""
JPEG_QUALITY_RANGE = (1, 100)
"""The qualities the JPEG rewards accept (PIL takes 0-100 and advises against more than 95)."""

_jpeg_pool = LazyThreadPool(min(8, os.cpu_count() or 1), "diffusion_gym-jpeg")


def set_jpeg_workers(num_workers: int) -> None:
    """Set the number of threads that encode JPEGs (default: ``min(8, cpu_count)``).

    The current pool, if any, is shut down (after finishing its work) and a new one of the new size
    is created on the next call of :func:`jpeg_size_kb`.

    Args:
        num_workers: threads in the pool; 1 encodes on the calling thread.

    Raises:
        ValueError: if ``num_workers`` < 1.
    """
    if int(num_workers) < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    _jpeg_pool.resize(int(num_workers))


def _encoded_jpeg_bytes(pixels: np.ndarray, quality: int) -> int:
    """Size in bytes of one uint8 image (``(H, W)`` grey or ``(H, W, 3)`` RGB) saved as JPEG."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.tell()


def jpeg_size_kb(images: Tensor, quality: int = JPEG_QUALITY) -> Tensor:
    """Size in kB (bytes / 1000) of each image saved by PIL as JPEG, as in ddpo-pytorch.

    Each image is quantised with ``(x * 255).round().clamp(0, 255)`` (in float32), converted to a PIL
    image (mode ``"L"`` for 1 channel, ``"RGB"`` for 3) and saved with ``quality`` into memory. The
    images of a batch are encoded on a shared thread pool (see :func:`set_jpeg_workers`); the
    results are in batch order.

    Args:
        images: ``(B, C, H, W)`` images in ``[0, 1]``, ``C`` = 1 or 3, on any device.
        quality: JPEG quality (95 in DDPO).

    Returns:
        ``(B,)`` float32 sizes in kB on ``images.device`` (not differentiable).

    Raises:
        ValueError: for a shape other than ``(B, 1 or 3, H, W)``.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (B, 1 or 3, H, W), got {tuple(images.shape)}")
    pixels = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    if pixels.shape[1] == 1:
        arrays = [np.ascontiguousarray(p[0]) for p in pixels]  # (H, W) -> mode "L"
    else:
        arrays = [np.ascontiguousarray(p.transpose(1, 2, 0)) for p in pixels]  # (H, W, 3) -> "RGB"
    if len(arrays) <= 1 or _jpeg_pool.workers <= 1:
        sizes = [_encoded_jpeg_bytes(a, quality) for a in arrays]
    else:
        sizes = list(_jpeg_pool.get().map(_encoded_jpeg_bytes, arrays, [quality] * len(arrays)))
    return torch.tensor([s / 1000 for s in sizes], dtype=torch.float32, device=images.device)


def _checked_quality(quality: Any) -> int:
    """``quality`` as an int, if it is an integer in :data:`JPEG_QUALITY_RANGE` (bools are not).

    Raises:
        ValueError: for anything else, naming the value and the valid range.
    """
    low, high = JPEG_QUALITY_RANGE
    if isinstance(quality, (int, np.integer)) and not isinstance(quality, (bool, np.bool_)) and low <= quality <= high:
        return int(quality)
    raise ValueError(f"JPEG quality must be an integer in [{low}, {high}], got {quality!r}")


def _jpeg_reward(sign: float, name: str, quality: int) -> RewardFn:
    """``sign ×`` JPEG size in kB, as a host reward named ``name``."""
    quality = _checked_quality(quality)

    def reward(images: Tensor, conditions: Any = None) -> Tensor:
        return sign * jpeg_size_kb(images, quality)

    reward.__name__ = reward.__qualname__ = name
    return host_reward(reward)


def jpeg_incompressibility(quality: int = JPEG_QUALITY) -> RewardFn:
    """Reward = +JPEG size in kB (larger files score higher); conditions are ignored.

    Args:
        quality: JPEG quality, an integer in ``[1, 100]`` (95 in DDPO).

    Raises:
        ValueError: if ``quality`` is not an integer in ``[1, 100]``.
    """
    return _jpeg_reward(1.0, "jpeg_incompressibility_reward", quality)


def jpeg_compressibility(quality: int = JPEG_QUALITY) -> RewardFn:
    """Reward = −JPEG size in kB (smaller files score higher); conditions are ignored.

    Args:
        quality: JPEG quality, an integer in ``[1, 100]`` (95 in DDPO).

    Raises:
        ValueError: if ``quality`` is not an integer in ``[1, 100]``.
    """
    return _jpeg_reward(-1.0, "jpeg_compressibility_reward", quality)
