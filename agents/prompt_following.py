"""Prompt-following evaluation of a text-to-image model on the digit prompts: accuracy and diversity per prompt.

:func:`evaluate_prompt_following` samples ``n`` images per prompt from fixed noise (image ``j`` of
every prompt, and of every model compared, starts from the same noise) and reports, GenEval-style:

* ``accuracy`` — the fraction of images that satisfy every attribute their prompt asks for
  (:func:`~diffusion_gym.rewards.prompt_match.prompt_attributes`), and per kind of prompt:
  ``digit_only`` (no weight asked) and ``weighted``; ``digit_accuracy`` and ``weight_accuracy``
  (the weight part over the weighted prompts);
* the hacking guards: ``abs_margin_mean`` (mean |ink margin| of the weighted prompts' images, to
  compare with the data's), ``ink_margin_p90`` (90th percentile of the margin of bold-prompted
  images);
* diversity within a prompt: the Vendi score of the classifier embeddings and of the pixels of each
  prompt's ``n`` images, averaged over the prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from diffusion_gym import metrics, sampling
from diffusion_gym.families.base import ModelFamily
from diffusion_gym.rewards.prompt_match import _Scorer

__all__ = ["data_ink_margins", "evaluate_prompt_following", "prompt_following_metrics", "sample_prompts"]


@torch.no_grad()
def sample_prompts(
    family: ModelFamily,
    prompts: Sequence[str],
    n: int,
    *,
    guidance_scale: float | None = None,
    num_steps: int = 20,
    eta: float = 0.0,
    seed: int = 0,
    network: Any = None,
) -> Tensor:
    """``(len(prompts) · n, 3, H, W)`` images in ``[0, 1]``: ``n`` per prompt, prompt-major, from fixed noise."""
    schedule = sampling.make_schedule(family.scheduler, num_steps, eta, family.device)
    cond = family.encode_conditions(list(prompts)).repeat_interleave(n)
    noise = sampling.initial_noise(n, family.sample_shape, seed).repeat(len(prompts), 1, 1, 1).to(family.device)
    chain = sampling.GeneratorNoise(torch.Generator().manual_seed(seed + 1)) if eta > 0 else None
    x = sampling.denoise_chain(family.chain_denoiser(guidance_scale, network), noise, schedule, cond, noise=chain)
    return family.decode(x)


def data_ink_margins() -> Tensor:
    """The ink margins of the shipped digits (ink minus their digit's training median)."""
    from diffusion_gym.digits import ink, ink_medians, load_digits_dataset

    images, labels = load_digits_dataset()
    return ink(images) - ink_medians()[labels]


def prompt_following_metrics(scorer: _Scorer, images: Tensor, prompts: Sequence[str]) -> dict[str, float]:
    """Prompt-following accuracy, hacking guards and within-prompt diversity of ``images`` (one prompt each).

    The images may come in any order; the diversity is over the images that share a prompt.
    """
    parts = scorer(images, list(prompts))
    weighted = parts.weight != 0
    bold = parts.weight > 0
    features = scorer.classifier.features(images).float()

    def frac(mask: Tensor, rows: Tensor | None = None) -> float:
        chosen = mask if rows is None else mask[rows]
        return float(chosen.float().mean()) if chosen.numel() else float("nan")

    return {
        "n_images": float(images.shape[0]),
        "accuracy": frac(parts.match),
        "digit_only": frac(parts.match, ~weighted),
        "weighted": frac(parts.match, weighted),
        "digit_accuracy": frac(parts.digit_ok),
        "weight_accuracy": frac(parts.weight_ok, weighted),
        "abs_margin_mean": float(parts.margin[weighted].abs().mean()) if bool(weighted.any()) else float("nan"),
        "ink_margin_p90": float(torch.quantile(parts.margin[bold], 0.9)) if bool(bold.any()) else float("nan"),
        "vendi_embedding": metrics.grouped_vendi(features, prompts),
        "vendi_pixels": metrics.grouped_vendi(metrics.pixel_features(images), prompts),
    }


def evaluate_prompt_following(
    family: ModelFamily, prompts: Sequence[str], n: int, *, scorer: _Scorer | None = None, **sample_options: Any
) -> dict[str, float]:
    """:func:`prompt_following_metrics` of ``n`` images per prompt sampled by :func:`sample_prompts`.

    Args:
        family: the model.
        prompts: digit prompts (:mod:`diffusion_gym.digit_prompts`).
        n: images per prompt (>= 2 for the diversity).
        scorer: a loaded prompt scorer (default: the shipped classifier).
        **sample_options: :func:`sample_prompts`'s (``guidance_scale``, ``num_steps``, ``eta``, ``seed``, ``network``).
    """
    scorer = scorer if scorer is not None else _Scorer(None)
    images = sample_prompts(family, prompts, n, **sample_options)
    return prompt_following_metrics(scorer, images, [p for p in prompts for _ in range(n)])
