"""Reference image sources: the clean images that windowed episodes start from.

A windowed episode (HRF, HRF-D) starts from a reference image noised to the start step. A
:class:`ReferenceSource` draws ``n`` clean references with their conditions:

* :class:`DigitsReferences` (``"digits"``) — scikit-learn's digits at the embedded model's size,
  with their labels as conditions;
* :class:`FolderReferences` (a directory path) — image files; class subfolders named ``0``, ``1``, …
  give the conditions;
* :class:`TensorReferences` — a tensor of images in ``[0, 1]`` (and optional conditions);
* :class:`ModelReferences` (``"model"``) — samples of the *current* model from pure noise, as the
  authors' code does (the env passes its denoiser);
* :class:`CaptionedFolderReferences` (a directory path, text-to-image models) — image files with
  their captions (a ``metadata.jsonl`` of ``{"file_name", "text"}`` rows, Hugging Face's
  ``imagefolder`` convention, or a ``<name>.txt`` next to each image); the captions are the prompts.

References come out as clean *states* ``x_0`` of the model, shaped ``(n, *sample_shape)`` like its
samples: images in ``[-1, 1]`` for a pixel model; for a latent model, images encoded by the family's
``encode_images`` (the VAE), which the env passes as ``encode``.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
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
    """``(n, *sample_shape)`` clean states: images in ``[-1, 1]`` (pixel models) or latents."""
    conditions: Tensor
    """``(n,)`` int64 condition ids (class ids, 0 for an unconditional model, or prompt ids)."""


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


Encoder = Callable[[Tensor], Tensor]
"""Images in ``[0, 1]`` at the model's image shape -> clean states (a family's ``encode_images``)."""


def to_model_range(images: Tensor) -> Tensor:
    """A pixel model's states of images in ``[0, 1]``: ``2·images − 1``."""
    return images * 2 - 1


def _fit(images: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """Resize/convert images in ``[0, 1]`` to ``shape = (C, H, W)`` (still in ``[0, 1]``)."""
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
    return images.clamp(0, 1)


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
        sample_shape: ``(C, H, W)`` of the model's images; images are converted/resized to it.
        conditions: ``(N,)`` integer condition ids (default: all 0).
        num_classes: the model's number of classes: conditions must lie in ``[0, num_classes - 1]``
            (``None``: not checked beyond ``>= 0``).
        encode: images in ``[0, 1]`` -> states (default: ``2·images − 1``, a pixel model's states).
    """

    def __init__(
        self,
        images: Tensor,
        sample_shape: tuple[int, int, int],
        conditions: Tensor | np.ndarray | None = None,
        num_classes: int | None = None,
        encode: Encoder | None = None,
    ) -> None:
        if images.ndim != 4 or len(images) == 0:
            raise ValueError(f"references must be a non-empty (N, C, H, W) tensor, got shape {tuple(images.shape)}")
        if not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1:
            raise ValueError("reference images must be finite and lie in [0, 1]")
        if conditions is None:
            conditions = torch.zeros(len(images), dtype=torch.long)
        self.conditions = _check_conditions(conditions, len(images), num_classes)
        self.images = (encode or to_model_range)(_fit(images.float(), sample_shape))

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


def image_files(folder: Path) -> list[Path]:
    """The image files under ``folder`` (recursively, sorted), or a ``ValueError`` when there are none."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {folder}")
    return files


def read_images(files: Sequence[Path], shape: tuple[int, int, int]) -> Tensor:
    """Image files as a ``(N, C, H, W)`` float tensor in ``[0, 1]`` at ``shape`` (grey or RGB, bicubic resize)."""
    from PIL import Image

    c, h, w = shape
    images = []
    for path in files:
        with Image.open(path) as im:
            im = im.convert("L" if c == 1 else "RGB").resize((w, h), Image.Resampling.BICUBIC)
            array = np.asarray(im, dtype=np.float32) / 255.0
        images.append(torch.from_numpy(array).reshape(h, w, -1).permute(2, 0, 1))
    return torch.stack(images)


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
        folder = Path(folder)
        files = image_files(folder)
        conditions = [int(p.parent.name) if p.parent.name.isdigit() and p.parent != folder else 0 for p in files]
        if num_classes is not None and max(conditions) >= num_classes:
            bad = sorted({str(p.parent) for p, cond in zip(files, conditions, strict=True) if cond >= num_classes})
            raise ValueError(
                f"reference folder {folder} has class subfolders {bad} outside the model's classes "
                f"[0, {num_classes - 1}]: name class subfolders 0 … {num_classes - 1}"
            )
        super().__init__(read_images(files, sample_shape), sample_shape, torch.tensor(conditions), num_classes)
        self.files = files


def read_captions(folder: Path, files: Sequence[Path]) -> list[str]:
    """The caption of each image file: from ``folder/metadata.jsonl`` or from a ``.txt`` next to the image.

    Raises:
        ValueError: naming the first image without a caption.
    """
    captions: dict[Path, str] = {}
    metadata = folder / "metadata.jsonl"
    if metadata.is_file():
        for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                row = json.loads(line)
                if not isinstance(row, dict) or "file_name" not in row or "text" not in row:
                    raise ValueError(f'{metadata} line {number}: expected {{"file_name": ..., "text": ...}}')
                captions[(folder / row["file_name"]).resolve()] = str(row["text"])
    found = []
    for path in files:
        caption = captions.get(path.resolve())
        sidecar = path.with_suffix(".txt")
        if caption is None and sidecar.is_file():
            caption = sidecar.read_text(encoding="utf-8").strip()
        if caption is None:
            raise ValueError(
                f"reference image {path} has no caption: list it in {metadata} as "
                f'{{"file_name": "{path.relative_to(folder)}", "text": "<prompt>"}} or write {sidecar.name} next to it'
            )
        found.append(caption)
    return found


class CaptionedFolderReferences(TensorReferences):
    """Captioned image files of a folder (text-to-image models): the captions are the prompts.

    Args:
        folder: the directory (images found recursively; captions as :func:`read_captions` reads them).
        image_shape: ``(C, H, W)`` of the model's images.
        prompt_id: the env's prompt id of a caption (registers it).
        encode: images in ``[0, 1]`` -> the model's clean states (the VAE).
    """

    def __init__(
        self, folder: str | Path, image_shape: tuple[int, int, int], prompt_id: Callable[[str], int], encode: Encoder
    ) -> None:
        folder = Path(folder)
        files = image_files(folder)
        ids = torch.tensor([prompt_id(caption) for caption in read_captions(folder, files)])
        super().__init__(read_images(files, image_shape), image_shape, ids, encode=encode)
        self.files = files


class ModelReferences(ReferenceSource):
    """Samples of the current model from pure noise (the authors' code draws references this way).

    Args:
        sampler: ``sampler(n, condition_ids, generator) -> states`` (images in ``[-1, 1]`` or latents);
            the env builds it from its denoiser, so the references follow the policy as it trains.
        num_classes: number of class ids to draw from (``None``: unconditional, condition 0).
        draw: ``draw(n, rng) -> condition ids`` instead of uniform class ids (the env's condition set).
    """

    def __init__(
        self,
        sampler: Callable[[int, Tensor | None, torch.Generator], Tensor],
        num_classes: int | None,
        draw: Callable[[int, np.random.Generator], Tensor] | None = None,
    ) -> None:
        self.sampler = sampler
        self.num_classes = num_classes
        self.draw = draw

    def sample(self, n: int, rng: np.random.Generator, device: str | torch.device = "cpu") -> References:
        """See :meth:`ReferenceSource.sample`."""
        if self.draw is not None:
            conditions = self.draw(n, rng)
        elif self.num_classes is None:
            conditions = torch.zeros(n, dtype=torch.long)
        else:
            conditions = torch.from_numpy(rng.integers(0, self.num_classes, size=n))
        generator = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
        conditions = conditions.to(device)
        conditional = self.num_classes is not None or self.draw is not None
        images = self.sampler(n, conditions if conditional else None, generator)
        return References(images.to(device), conditions)


def make_references(
    spec: str | Path | Tensor | ReferenceSource,
    sample_shape: tuple[int, int, int],
    model_sampler: Callable[[int, Tensor | None, torch.Generator], Tensor] | None = None,
    num_classes: int | None = None,
    *,
    encode: Encoder | None = None,
    prompt_id: Callable[[str], int] | None = None,
    draw: Callable[[int, np.random.Generator], Tensor] | None = None,
    **kwargs: Any,
) -> ReferenceSource:
    """Build a reference source.

    Args:
        spec: ``"digits"``, ``"model"``, a folder path, a tensor of images in ``[0, 1]`` or a
            :class:`ReferenceSource` (returned as is).
        sample_shape: ``(C, H, W)`` of the model's images.
        model_sampler: needed for ``"model"``.
        num_classes: the model's number of classes (``None``: unconditional); the class ids of a folder
            or of a tensor's ``conditions`` must lie in ``[0, num_classes - 1]``.
        encode: images in ``[0, 1]`` -> clean states (a latent model's VAE; default ``2·images − 1``).
        prompt_id: a text-to-image model's prompt ids: a folder is read as captioned images
            (:class:`CaptionedFolderReferences`) and a tensor's ``conditions`` may be prompts.
        draw: ``draw(n, rng) -> condition ids`` of ``"model"`` references (default: uniform class ids).
        **kwargs: passed to :class:`TensorReferences` for a tensor (e.g. ``conditions=``).

    Raises:
        ValueError: for an unknown name or a missing folder (naming the valid choices), class ids
            outside the model's classes, or ``"digits"`` for a text-to-image model.
    """
    if isinstance(spec, ReferenceSource):
        return spec
    if isinstance(spec, Tensor):
        conditions = kwargs.pop("conditions", None)
        if prompt_id is not None and conditions is not None and not isinstance(conditions, Tensor | np.ndarray):
            conditions = torch.tensor([prompt_id(prompt) for prompt in conditions])
        return TensorReferences(spec, sample_shape, conditions, num_classes=num_classes, encode=encode, **kwargs)
    if spec == "digits":
        if prompt_id is not None:
            raise ValueError(
                "references='digits' are labelled digit images for the embedded digits model; a text-to-image model "
                "takes 'model' or a folder of captioned images"
            )
        return DigitsReferences(sample_shape)
    if spec == "model":
        if model_sampler is None:
            raise ValueError("references='model' needs a model sampler (the env provides one)")
        return ModelReferences(model_sampler, num_classes, draw)
    if isinstance(spec, str | Path) and Path(spec).expanduser().is_dir():
        folder = Path(spec).expanduser()
        if prompt_id is not None:
            return CaptionedFolderReferences(folder, sample_shape, prompt_id, encode or to_model_range)
        return FolderReferences(folder, sample_shape, num_classes)
    raise ValueError(
        f"unknown references {spec!r}; valid choices: {list(REFERENCE_NAMES)}, an existing image folder, "
        "a tensor of images in [0, 1], or a ReferenceSource"
    )
