"""Reference image sources: the clean images that windowed episodes start from.

A windowed episode (HRF, HRF-D) starts from a reference image noised to the start step. A
:class:`ReferenceSource` draws ``n`` clean references with their conditions:

* :class:`DigitsReferences` (``"digits"``) — scikit-learn's digits at the embedded model's size,
  with their labels as conditions;
* :class:`FolderReferences` (a directory path) — image files; class subfolders named ``0``, ``1``, …
  give the conditions;
* :class:`TensorReferences` — a tensor of images in ``[0, 1]`` (and optional conditions);
* :class:`ModelReferences` (``"model"``) — samples of the *current* model from pure noise, as the
  authors' code does (the env passes its denoiser).

Images come out in model space, ``[-1, 1]``, shaped ``(n, C, H, W)`` like the model's samples.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
REFERENCE_NAMES = ("digits", "model")


class References(NamedTuple):
    """A draw of reference images."""

    images: Tensor
    """``(n, C, H, W)`` clean images in ``[-1, 1]``."""
    conditions: Tensor
    """``(n,)`` int64 conditions (class ids; 0 for an unconditional model)."""


class ReferenceSource(ABC):
    """Draws clean reference images for windowed episodes."""

    @abstractmethod
    def sample(self, n: int, rng: np.random.Generator, device: str | torch.device = "cpu") -> References:
        """Draw ``n`` references.

        Args:
            n: number of images.
            rng: the env's random generator (draws are reproducible from the env seed).
            device: where to put the tensors.
        """


def _fit(images: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """Resize/convert images in ``[0, 1]`` to ``shape = (C, H, W)`` and map them to ``[-1, 1]``."""
    c, h, w = shape
    if images.shape[1] != c:
        if c == 1:
            images = images.mean(1, keepdim=True)
        elif images.shape[1] == 1:
            images = images.expand(-1, c, -1, -1)
        else:
            raise ValueError(f"cannot convert {images.shape[1]}-channel references to {c} channels")
    if images.shape[-2:] != (h, w):
        images = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return images.clamp(0, 1) * 2 - 1


def _check_conditions(conditions: Tensor | np.ndarray, n: int, num_classes: int | None) -> Tensor:
    """``conditions`` as an int64 tensor of ``n`` class ids, or a ``ValueError`` naming what is wrong."""
    conditions = torch.as_tensor(conditions)
    if conditions.shape != (n,):
        raise ValueError(f"conditions must have shape ({n},), got {tuple(conditions.shape)}")
    if conditions.is_floating_point() or conditions.is_complex() or conditions.dtype == torch.bool:
        raise ValueError(f"conditions must be integer class ids, got dtype {conditions.dtype}")
    high = None if num_classes is None else num_classes - 1
    bad = (conditions < 0) if high is None else (conditions < 0) | (conditions > high)
    if n and bool(bad.any()):
        valid = "non-negative class ids" if high is None else f"class ids in [0, {high}]"
        raise ValueError(f"conditions must be {valid}, got {sorted(set(conditions[bad].tolist()))}")
    return conditions.long()


class TensorReferences(ReferenceSource):
    """References drawn (uniformly, with replacement) from a tensor of images in ``[0, 1]``.

    Args:
        images: ``(N, C, H, W)`` images in ``[0, 1]``.
        sample_shape: ``(C, H, W)`` of the model; images are converted/resized to it.
        conditions: ``(N,)`` integer class ids (default: all 0).
        num_classes: the model's number of classes: conditions must lie in ``[0, num_classes - 1]``
            (``None``: not checked beyond ``>= 0``).
    """

    def __init__(
        self,
        images: Tensor,
        sample_shape: tuple[int, int, int],
        conditions: Tensor | np.ndarray | None = None,
        num_classes: int | None = None,
    ) -> None:
        if images.ndim != 4 or len(images) == 0:
            raise ValueError(f"references must be a non-empty (N, C, H, W) tensor, got shape {tuple(images.shape)}")
        if not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1:
            raise ValueError("reference images must be finite and lie in [0, 1]")
        if conditions is None:
            conditions = torch.zeros(len(images), dtype=torch.long)
        self.conditions = _check_conditions(conditions, len(images), num_classes)
        self.images = _fit(images.float(), sample_shape)

    def sample(self, n: int, rng: np.random.Generator, device: str | torch.device = "cpu") -> References:
        """See :meth:`ReferenceSource.sample`."""
        idx = torch.from_numpy(rng.integers(0, len(self.images), size=n))
        return References(self.images[idx].to(device), self.conditions[idx].to(device))


class DigitsReferences(TensorReferences):
    """scikit-learn's bundled digits, labelled, at the model's sample shape."""

    def __init__(self, sample_shape: tuple[int, int, int]) -> None:
        from .digits import load_digits_dataset

        images, labels = load_digits_dataset(size=sample_shape[-1])
        super().__init__(images, sample_shape, labels)


class FolderReferences(TensorReferences):
    """Image files of a folder (recursively), loaded once.

    Files in subfolders named by an integer (``0/``, ``1/``, …) get that class id as condition;
    other files get condition 0.

    Args:
        folder: the directory.
        sample_shape: ``(C, H, W)`` of the model.
        num_classes: the model's number of classes: a class subfolder outside ``[0, num_classes - 1]``
            is refused (naming the folder) before any image is read (``None``: not checked).
    """

    def __init__(self, folder: str | Path, sample_shape: tuple[int, int, int], num_classes: int | None = None) -> None:
        from PIL import Image

        folder = Path(folder)
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {folder}")
        conditions = [int(p.parent.name) if p.parent.name.isdigit() and p.parent != folder else 0 for p in files]
        if num_classes is not None and max(conditions) >= num_classes:
            bad = sorted({str(p.parent) for p, cond in zip(files, conditions, strict=True) if cond >= num_classes})
            raise ValueError(
                f"reference folder {folder} has class subfolders {bad} outside the model's classes "
                f"[0, {num_classes - 1}]: name class subfolders 0 … {num_classes - 1}"
            )
        c, h, w = sample_shape
        images = []
        for path in files:
            with Image.open(path) as im:
                im = im.convert("L" if c == 1 else "RGB").resize((w, h), Image.Resampling.BICUBIC)
                array = np.asarray(im, dtype=np.float32) / 255.0
            images.append(torch.from_numpy(array).reshape(h, w, -1).permute(2, 0, 1))
        super().__init__(torch.stack(images), sample_shape, torch.tensor(conditions), num_classes)
        self.files = files


class ModelReferences(ReferenceSource):
    """Samples of the current model from pure noise (the authors' code draws references this way).

    Args:
        sampler: ``sampler(n, conditions, generator) -> images`` in ``[-1, 1]``; the env builds it from
            its denoiser, so the references follow the policy as it trains.
        num_classes: number of conditions to draw from (``None``: unconditional, condition 0).
    """

    def __init__(
        self, sampler: Callable[[int, Tensor | None, torch.Generator], Tensor], num_classes: int | None
    ) -> None:
        self.sampler = sampler
        self.num_classes = num_classes

    def sample(self, n: int, rng: np.random.Generator, device: str | torch.device = "cpu") -> References:
        """See :meth:`ReferenceSource.sample`."""
        if self.num_classes is None:
            conditions = torch.zeros(n, dtype=torch.long)
        else:
            conditions = torch.from_numpy(rng.integers(0, self.num_classes, size=n))
        generator = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
        conditions = conditions.to(device)
        images = self.sampler(n, conditions if self.num_classes is not None else None, generator)
        return References(images.to(device), conditions)


def make_references(
    spec: str | Path | Tensor | ReferenceSource,
    sample_shape: tuple[int, int, int],
    model_sampler: Callable[[int, Tensor | None, torch.Generator], Tensor] | None = None,
    num_classes: int | None = None,
    **kwargs: Any,
) -> ReferenceSource:
    """Build a reference source.

    Args:
        spec: ``"digits"``, ``"model"``, a folder path, a tensor of images in ``[0, 1]`` or a
            :class:`ReferenceSource` (returned as is).
        sample_shape: ``(C, H, W)`` of the model.
        model_sampler: needed for ``"model"``.
        num_classes: the model's number of classes (``None``: unconditional); the class ids of a folder
            or of a tensor's ``conditions`` must lie in ``[0, num_classes - 1]``.
        **kwargs: passed to :class:`TensorReferences` for a tensor (e.g. ``conditions=``).

    Raises:
        ValueError: for an unknown name or a missing folder (naming the valid choices), or class ids
            outside the model's classes.
    """
    if isinstance(spec, ReferenceSource):
        return spec
    if isinstance(spec, Tensor):
        return TensorReferences(spec, sample_shape, num_classes=num_classes, **kwargs)
    if spec == "digits":
        return DigitsReferences(sample_shape)
    if spec == "model":
        if model_sampler is None:
            raise ValueError("references='model' needs a model sampler (the env provides one)")
        return ModelReferences(model_sampler, num_classes)
    if isinstance(spec, str | Path) and Path(spec).expanduser().is_dir():
        return FolderReferences(Path(spec).expanduser(), sample_shape, num_classes)
    raise ValueError(
        f"unknown references {spec!r}; valid choices: {list(REFERENCE_NAMES)}, an existing image folder, "
        "a tensor of images in [0, 1], or a ReferenceSource"
    )
