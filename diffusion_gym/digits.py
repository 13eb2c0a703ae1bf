"""The embedded offline world: the UCI hand-written digits and a small digit classifier.

The 1,797 images of scikit-learn's ``load_digits`` (8×8, intensities 0–16; the test set of the UCI
optdigits data), shipped as ``assets/digits/digits.npz`` (see the README there for their source and
licence; scikit-learn is not needed), are upsampled to 16×16 and used to train the embedded
class-conditional DDPM (``"embedded:digits"``). The
:class:`DigitClassifier` is the offline stand-in for InceptionV3: its class probabilities give an
Inception Score and its penultimate features an embedding for the Vendi score.

Both models are trained by the scripts in ``scripts/`` and shipped in ``diffusion_gym/assets/``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
CLASSIFIER_DIR = ASSETS_DIR / "digits-classifier"
DIGITS_ARRAY = ASSETS_DIR / "digits" / "digits.npz"
"""The shipped digits: ``images`` ``(1797, 8, 8)`` uint8 in 0–16 and ``labels`` ``(1797,)`` uint8."""
DIGITS_SIZE = 16
NUM_CLASSES = 10


def load_digits_dataset(size: int = DIGITS_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Load the shipped digits (:data:`DIGITS_ARRAY`, scikit-learn's ``load_digits``) as a tensor of images.

    Args:
        size: side of the returned images; the 8×8 originals are upsampled bilinearly.

    Returns:
        ``(images, labels)``: images ``(1797, 1, size, size)`` float32 in ``[0, 1]`` and labels
        ``(1797,)`` int64 in ``0..9``.

    Raises:
        FileNotFoundError: when the array is missing from the installation.
    """
    if not DIGITS_ARRAY.is_file():
        raise FileNotFoundError(
            f"the digits array {DIGITS_ARRAY} is missing: reinstall diffusion-gym, or rebuild it with "
            "`python scripts/make_digits_asset.py` (needs scikit-learn)"
        )
    with np.load(DIGITS_ARRAY, allow_pickle=False) as data:
        pixels, labels = data["images"], data["labels"]
    images = torch.from_numpy(pixels.astype(np.float32) / 16.0).unsqueeze(1)
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images.clamp(0.0, 1.0), torch.from_numpy(labels.astype(np.int64))


def ink(images: torch.Tensor) -> torch.Tensor:
    """``(B,)`` ink of images in ``[0, 1]`` (``(B, 1 or 3, H, W)``, any size): the sum of the grey levels at 16×16.

    Images of another size are resized to 16×16 first, so the ink of a digit does not depend on the
    resolution it was drawn at.
    """
    grey = images.float().mean(dim=1, keepdim=True) if images.shape[1] == 3 else images.float()
    if grey.shape[-2:] != (DIGITS_SIZE, DIGITS_SIZE):
        grey = F.interpolate(
            grey, size=(DIGITS_SIZE, DIGITS_SIZE), mode="bilinear", align_corners=False, antialias=True
        )
    return grey.sum(dim=(1, 2, 3))


def ink_medians() -> torch.Tensor:
    """``(10,)`` the median ink of each digit's training images (the split of :func:`split_indices`).

    An image of digit ``d`` is *bold* when its ink is above ``ink_medians()[d]``, *thin* below it.
    """
    images, labels = load_digits_dataset()
    train, _ = split_indices(len(labels))
    ink_train, labels_train = ink(images[train]), labels[train]
    return torch.stack([ink_train[labels_train == d].median() for d in range(NUM_CLASSES)])


def split_indices(n: int, test_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A fixed, reproducible train/held-out split of ``range(n)``.

    Args:
        n: number of items.
        test_fraction: share of the items held out.
        seed: seed of the permutation.

    Returns:
        ``(train_indices, test_indices)``, both sorted.
    """
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


class DigitClassifier(ModelMixin, ConfigMixin):
    """A small CNN that classifies 16×16 grey digits.

    Takes images in ``[0, 1]`` (any size and 1 or 3 channels; they are converted to grey and
    resized to ``image_size``) and returns logits over the 10 digits. :meth:`features` returns the
    penultimate embedding used by the embedding Vendi score. Saved and loaded with diffusers'
    ``save_pretrained`` / ``from_pretrained`` (safetensors + ``config.json``).

    Args:
        image_size: side of the images the network sees.
        channels: output channels of the two convolution stages.
        feature_dim: width of the penultimate (feature) layer.
        num_classes: number of classes.
        dropout: dropout before the last layer during training.
    """

    @register_to_config
    def __init__(
        self,
        image_size: int = DIGITS_SIZE,
        channels: tuple[int, int] = (32, 64),
        feature_dim: int = 128,
        num_classes: int = NUM_CLASSES,
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        c1, c2 = channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.BatchNorm2d(c1),
            nn.SiLU(),
            nn.Conv2d(c1, c1, 3, padding=1),
            nn.BatchNorm2d(c1),
            nn.SiLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.BatchNorm2d(c2),
            nn.SiLU(),
            nn.Conv2d(c2, c2, 3, padding=1),
            nn.BatchNorm2d(c2),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(c2 * 4, feature_dim),
            nn.SiLU(),
        )
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_classes)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images of shape (B, 1 or 3, H, W) in [0, 1], got {tuple(images.shape)}")
        images = images.to(device=self.head.weight.device, dtype=self.head.weight.dtype)
        if images.shape[1] == 3:
            images = images.mean(dim=1, keepdim=True)
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return images * 2.0 - 1.0

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(B, feature_dim)`` of images in ``[0, 1]``."""
        return self.body(self._prepare(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, num_classes)`` of images in ``[0, 1]``."""
        return self.head(self.drop(self.features(images)))


def load_digit_classifier(path: str | Path | None = None, device: str | torch.device = "cpu") -> DigitClassifier:
    """Load the shipped digit classifier (or one saved at ``path``), in eval mode.

    Args:
        path: a directory written by ``DigitClassifier.save_pretrained``; default: the shipped one.
        device: where to put it.

    Raises:
        FileNotFoundError: when the directory or its weights are missing.
    """
    path = Path(path) if path is not None else CLASSIFIER_DIR
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"digit classifier not found: {path / 'config.json'} is missing. Train it with "
            "`python scripts/train_digits_classifier.py` or pass the directory it wrote."
        )
    return DigitClassifier.from_pretrained(path).to(device).eval()
