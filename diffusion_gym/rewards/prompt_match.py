"""Prompt-following rewards of the embedded text-to-image model, GenEval-style: does the image do what the prompt says?

A prompt of :mod:`diffusion_gym.digit_prompts` asks for a digit and maybe a stroke weight. The shipped
digit classifier reads the digit; the weight is measured: the image's ink (sum of grey levels at
16×16) minus its digit's median ink in the training data, its *ink margin*, positive for bold.

* ``prompt_match`` — 1 when every attribute the prompt asks for holds (the classifier's top class is
  the digit, and the margin has the asked sign), else 0: the benchmark's accuracy.
* ``prompt_match_smooth`` — the same, smoothed for training: ``p(digit) · σ(±margin / scale)``
  (``p`` the classifier's probability of the prompted digit, ``+`` for bold, ``−`` for thin, the
  factor 1 when no weight is asked). It rises with the evidence, so the policy gradient has a slope
  where the 0/1 reward is flat.

:func:`prompt_attributes` returns the parts (digit correct, weight correct, margin) for metrics.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffusion_gym.digit_prompts import parse_prompt
from diffusion_gym.rewards.registry import RewardFn

__all__ = ["PromptAttributes", "prompt_attributes", "prompt_match", "prompt_match_smooth"]

INK_SCALE = 4.0
"""The smooth reward's ink scale: σ(margin / 4) is 0.94 at the data's 90th-percentile margin (+11)."""


@dataclass
class PromptAttributes:
    """Per image: what the prompt asked and what the image shows."""

    digit: Tensor
    """``(B,)`` the prompted digit."""
    weight: Tensor
    """``(B,)`` the prompted weight: +1 bold, −1 thin, 0 none."""
    digit_prob: Tensor
    """``(B,)`` the classifier's probability of the prompted digit."""
    digit_ok: Tensor
    """``(B,)`` bool: the classifier's top class is the prompted digit."""
    margin: Tensor
    """``(B,)`` ink minus the prompted digit's median ink (positive: bolder than the median)."""
    weight_ok: Tensor
    """``(B,)`` bool: bold asked and margin > 0, or thin asked and margin ≤ 0 (the data's median split); True
    when no weight is asked."""

    @property
    def match(self) -> Tensor:
        """``(B,)`` bool: every asked attribute holds."""
        return self.digit_ok & self.weight_ok


def _prompts(conditions: Any, batch: int) -> list[str]:
    if isinstance(conditions, str) or not isinstance(conditions, Sequence) or len(conditions) != batch:
        raise ValueError(
            f"prompt-following rewards need one prompt per image (a list of {batch} strings), got {conditions!r:.80}"
        )
    return list(conditions)


class _Scorer:
    """The classifier and the ink medians, loaded once, moved to the images' device when needed."""

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        from diffusion_gym.digits import ink_medians, load_digit_classifier

        self.classifier = load_digit_classifier(path).requires_grad_(False)
        self.medians = ink_medians()

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: Sequence[str]) -> PromptAttributes:
        from diffusion_gym.digits import ink

        if self.classifier.device != images.device:
            self.classifier, self.medians = self.classifier.to(images.device), self.medians.to(images.device)
        parsed = [parse_prompt(p) for p in _prompts(prompts, images.shape[0])]
        digit = torch.tensor([p.digit for p in parsed], device=images.device)
        weight = torch.tensor([{"bold": 1, "thin": -1, None: 0}[p.weight] for p in parsed], device=images.device)
        probs = self.classifier(images).float().softmax(dim=-1)
        margin = ink(images) - self.medians[digit]
        return PromptAttributes(
            digit=digit,
            weight=weight,
            digit_prob=probs.gather(1, digit[:, None]).squeeze(1),
            digit_ok=probs.argmax(dim=-1) == digit,
            margin=margin,
            weight_ok=(weight == 0) | ((weight > 0) & (margin > 0)) | ((weight < 0) & (margin <= 0)),
        )


def prompt_attributes(
    images: Tensor, prompts: Sequence[str], path: str | os.PathLike[str] | None = None
) -> PromptAttributes:
    """What each image shows of what its prompt asks (loads the classifier: for repeated calls use a reward)."""
    return _Scorer(path)(images, prompts)


def prompt_match(path: str | os.PathLike[str] | None = None) -> RewardFn:
    """Reward = 1 when the image satisfies every attribute its prompt asks for, else 0.

    Args:
        path: directory of a saved :class:`~diffusion_gym.digits.DigitClassifier`; default: the shipped one.

    Returns:
        The reward ``(images, prompts) -> (B,)``; its ``scorer`` attribute gives the per-attribute
        parts (:class:`PromptAttributes`). It raises ``ValueError`` for conditions that are not one
        digit prompt per image.
    """
    scorer = _Scorer(path)

    def prompt_match_reward(images: Tensor, conditions: Any = None) -> Tensor:
        return scorer(images, conditions).match.float()

    prompt_match_reward.scorer = scorer  # type: ignore[attr-defined]
    return prompt_match_reward


def prompt_match_smooth(path: str | os.PathLike[str] | None = None, ink_scale: float = INK_SCALE) -> RewardFn:
    """Reward = ``p(prompted digit) · σ(±ink margin / ink_scale)`` (the weight factor is 1 when none is asked).

    Args:
        path: directory of a saved digit classifier; default: the shipped one.
        ink_scale: grey levels of ink margin per unit of the sigmoid's argument.

    Raises:
        ValueError: for a non-positive ``ink_scale``.
    """
    if not ink_scale > 0:
        raise ValueError(f"ink_scale must be > 0, got {ink_scale!r}")
    scorer = _Scorer(path)

    def prompt_match_smooth_reward(images: Tensor, conditions: Any = None) -> Tensor:
        parts = scorer(images, conditions)
        weight = torch.where(
            parts.weight == 0, torch.ones_like(parts.margin), torch.sigmoid(parts.weight * parts.margin / ink_scale)
        )
        return parts.digit_prob * weight

    prompt_match_smooth_reward.scorer = scorer  # type: ignore[attr-defined]
    return prompt_match_smooth_reward
