"""The ``digit_confidence`` reward of the embedded digits model.

The probability that the shipped :class:`~diffusion_gym.digits.DigitClassifier` gives to the class
each image was conditioned on; needs class-id conditions.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffusion_gym.rewards.registry import RewardFn

__all__ = ["digit_confidence"]


def _class_ids(conditions: Any, batch: int, num_classes: int, device: torch.device) -> Tensor:
    error = (
        "reward 'digit_confidence' needs class-id conditions: a (B,) integer tensor (or list of ints) of "
        f"digits 0..{num_classes - 1}, one per image"
    )
    if conditions is None:
        raise ValueError(f"{error}; got None (unconditional sampling)")
    if isinstance(conditions, Tensor):
        ids = conditions
    elif isinstance(conditions, Sequence) and not isinstance(conditions, str):
        if not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in conditions):
            raise ValueError(f"{error}; got a list of {sorted({type(c).__name__ for c in conditions})}")
        ids = torch.tensor(list(conditions), dtype=torch.long)
    elif isinstance(conditions, np.ndarray):
        ids = torch.from_numpy(conditions)
    else:
        raise ValueError(f"{error}; got {type(conditions).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{error}; got dtype {ids.dtype}")
    if tuple(ids.shape) != (batch,):
        raise ValueError(f"{error}; got shape {tuple(ids.shape)} for {batch} images")
    ids = ids.to(device=device, dtype=torch.long)
    if batch and (int(ids.min()) < 0 or int(ids.max()) >= num_classes):
        raise ValueError(f"{error}; got values in [{int(ids.min())}, {int(ids.max())}]")
    return ids


def digit_confidence(path: str | os.PathLike[str] | None = None, *, differentiable: bool = False) -> RewardFn:
    """Reward = probability the digit classifier gives to the conditioned class.

    Uses :func:`diffusion_gym.digits.load_digit_classifier` (the shipped classifier, or the one
    saved at ``path``), loaded once and moved to the images' device when needed.

    Args:
        path: directory of a saved :class:`~diffusion_gym.digits.DigitClassifier`; default: shipped.
        differentiable: keep the autograd graph (default: computed under ``torch.no_grad()``).

    Returns:
        The reward function; its ``classifier`` attribute is the model. It raises ``ValueError``
        when the conditions are not one class id in ``0..9`` per image.

    Raises:
        FileNotFoundError: when the classifier is missing.
    """
    from diffusion_gym.digits import load_digit_classifier

    classifier = load_digit_classifier(path)
    classifier.requires_grad_(False)
    num_classes = int(classifier.config.num_classes)

    def digit_confidence_reward(images: Tensor, conditions: Any = None) -> Tensor:
        nonlocal classifier
        ids = _class_ids(conditions, images.shape[0], num_classes, images.device)
        if classifier.device != images.device:
            classifier = classifier.to(images.device)
            digit_confidence_reward.classifier = classifier  # type: ignore[attr-defined]
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            probs = classifier(images).float().softmax(dim=-1)
            return probs.gather(1, ids[:, None]).squeeze(1)

    digit_confidence_reward.classifier = classifier  # type: ignore[attr-defined]
    return digit_confidence_reward
