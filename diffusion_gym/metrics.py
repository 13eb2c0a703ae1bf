"""Sample-quality and diversity metrics: Inception Score, Vendi score, reward mean ± standard error.

All functions are pure: they take class probabilities, features or images in ``[0, 1]`` and return
plain numbers. The class probabilities and features come from InceptionV3 / CLIP at full size, and
offline from the embedded digit classifier (:func:`classifier_outputs`).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class MeanStd(NamedTuple):
    """A metric's value over splits (or samples): mean and spread."""

    mean: float
    std: float


def inception_score(probs: Tensor, splits: int = 10) -> MeanStd:
    """Inception Score of class probabilities, torch-fidelity's convention.

    The ``N`` rows are cut, in order, into ``splits`` consecutive parts; each part scores
    ``exp(mean_i KL(p(y|x_i) ‖ p(y)))`` with ``p(y)`` the part's mean; the result is the mean and the
    (unbiased) standard deviation over parts. Confident predictions spread uniformly over ``C``
    classes score ``C``; a single class scores 1.

    Args:
        probs: ``(N, C)`` class probabilities (rows sum to 1).
        splits: number of parts (10 in the paper and torch-fidelity).

    Raises:
        ValueError: if ``probs`` is not 2-D, has fewer rows than ``splits``, or is not a distribution.
    """
    if probs.ndim != 2 or probs.shape[0] < splits or splits < 1:
        raise ValueError(f"need (N, C) probabilities with N >= splits={splits}, got shape {tuple(probs.shape)}")
    probs = probs.double()
    if (probs < 0).any() or not torch.allclose(probs.sum(1), torch.ones(len(probs), dtype=probs.dtype), atol=1e-4):
        raise ValueError("probs must be non-negative rows that sum to 1 (apply softmax to logits first)")
    n = probs.shape[0]
    scores = []
    for i in range(splits):
        part = probs[i * n // splits : (i + 1) * n // splits]
        marginal = part.mean(0, keepdim=True)
        kl = torch.xlogy(part, part) - torch.xlogy(part, marginal)
        scores.append(kl.sum(1).mean().exp())
    values = torch.stack(scores)
    return MeanStd(values.mean().item(), values.std().item() if splits > 1 else 0.0)


def vendi_score(features: Tensor) -> float:
    """Vendi score with the cosine-similarity kernel: ``exp(H(eig(K / n)))``.

    ``K_ij = cos(f_i, f_j)``; ``H`` is the Shannon entropy of the eigenvalues of ``K / n`` (which sum
    to 1). n identical samples score 1, n mutually orthogonal samples score n: the "effective number
    of distinct samples".

    Args:
        features: ``(N, D)`` feature vectors (flattened pixels, embeddings…); zero rows are invalid.

    Raises:
        ValueError: on a bad shape or a zero-norm row.
    """
    if features.ndim != 2 or features.shape[0] < 1:
        raise ValueError(f"need (N, D) features, got shape {tuple(features.shape)}")
    x = features.double()
    norms = x.norm(dim=1, keepdim=True)
    if (norms == 0).any():
        raise ValueError("a feature vector has zero norm: the cosine kernel is undefined for it")
    x = x / norms
    n = x.shape[0]
    # The non-zero eigenvalues of X Xᵀ/n equal those of Xᵀ X/n: use the smaller Gram matrix.
    gram = x @ x.T if n <= x.shape[1] else x.T @ x
    eig = torch.linalg.eigvalsh(gram / n).clamp(min=0)
    eig = eig / eig.sum()
    entropy = -torch.xlogy(eig, eig).sum()
    return entropy.exp().item()


def pixel_features(images: Tensor, size: int | None = 32) -> Tensor:
    """Flattened pixels of images in ``[0, 1]`` (resized to ``size``×``size`` when given), for Vendi."""
    if images.ndim != 4:
        raise ValueError(f"expected images (B, C, H, W), got shape {tuple(images.shape)}")
    images = images.float()
    if size is not None and images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return images.flatten(1)


def group_cosine_diversity(features: Tensor, groups: Tensor) -> Tensor:
    """Each sample's mean cosine distance to the *other* members of its group.

    ``d_i = mean_{j ≠ i, groups_j = groups_i} (1 − cos(f_i, f_j))``; 0 for a sample alone in its
    group. DRIFT's intra-group diversity.

    Args:
        features: ``(B, D)`` features.
        groups: ``(B,)`` integer group ids.

    Returns:
        ``(B,)`` distances.
    """
    if features.ndim != 2 or groups.shape != features.shape[:1]:
        raise ValueError(f"need (B, D) features and (B,) groups, got {tuple(features.shape)} and {tuple(groups.shape)}")
    f = F.normalize(features.float(), dim=1)
    same = groups.view(-1, 1) == groups.view(1, -1)
    same.fill_diagonal_(False)
    distance = (1 - f @ f.T) * same
    return distance.sum(1) / same.sum(1).clamp(min=1)


def pixel_vendi(images: Tensor, size: int | None = 32) -> float:
    """Vendi score of images in ``[0, 1]`` on their (resized) pixels."""
    return vendi_score(pixel_features(images, size))


def grouped_vendi(features: Tensor, keys: Sequence[Hashable]) -> float:
    """The Vendi score of each group's rows of ``features`` (rows with equal ``keys``), averaged over the groups.

    Groups of one row are left out; ``nan`` when no group has two rows. The diversity *within* a
    condition (a prompt, a class): a model that draws one image per prompt scores 1 however different
    its prompts' images are.
    """
    if len(keys) != features.shape[0]:
        raise ValueError(f"need one key per feature row, got {len(keys)} keys for {features.shape[0]} rows")
    rows: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        rows.setdefault(key, []).append(i)
    blocks = [features[index] for index in rows.values() if len(index) > 1]
    return sum(vendi_score(block) for block in blocks) / len(blocks) if blocks else float("nan")


def mean_and_standard_error(values: Tensor | Iterable[float]) -> MeanStd:
    """Mean and standard error of the mean (``std(ddof=1) / sqrt(n)``) of a 1-D sample.

    Returned as ``MeanStd(mean, std=standard error)``.
    """
    v = torch.as_tensor(values if isinstance(values, Tensor) else list(values), dtype=torch.float64).flatten()
    if v.numel() == 0:
        raise ValueError("need at least one value")
    se = v.std().item() / math.sqrt(v.numel()) if v.numel() > 1 else float("nan")
    return MeanStd(v.mean().item(), se)


class ClassifierOutputs(NamedTuple):
    """What a classifier says about a batch of images."""

    probs: Tensor
    """``(N, C)`` class probabilities."""
    features: Tensor
    """``(N, D)`` penultimate features (the embedding for the Vendi score)."""


@torch.no_grad()
def classifier_outputs(classifier: torch.nn.Module, images: Tensor, batch_size: int = 256) -> ClassifierOutputs:
    """Class probabilities and features of images in ``[0, 1]`` from a classifier.

    The classifier must have ``features(images)`` and a ``head`` layer on top of them, as
    :class:`diffusion_gym.digits.DigitClassifier` does.
    """
    probs, feats = [], []
    for chunk in images.split(batch_size):
        f = classifier.features(chunk)
        feats.append(f.float().cpu())
        probs.append(classifier.head(f).float().softmax(-1).cpu())
    return ClassifierOutputs(torch.cat(probs), torch.cat(feats))
