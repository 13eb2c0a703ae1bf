"""Rewards whose models ship inside their packages: OCR, face detection and no-reference quality.

Each works offline as soon as its extra is installed (the weights are in the wheels), which makes them
real rewards and real hacking guards on a laptop:

``ocr`` (extra ``ocr``: ``rapidocr`` with ``onnxruntime``; PP-OCR detection and recognition models)
    Text rendering: ``1 − min(d, n) / n``, with ``d`` the Levenshtein distance between the text read
    in the image and the target text (``n`` characters), both lower-cased with spaces removed (as
    Flow-GRPO's OCR reward). The target is the prompt's text between double quotes (``'a sign that
    says "OPEN"'``), or ``target=`` for every image.
``face_confidence`` (extra ``faces``: ``yuface``, libfacedetection's YuNet compiled with its weights)
    The highest confidence in ``[0, 1]`` of a face found in the image, 0 when none is: for a face
    model (CelebA-HQ) a guard that fine-tuning has not turned the faces into something else.
``brisque`` (extra ``quality``: the ``brisque`` package's LIVE-trained SVR)
    Minus the BRISQUE score (Mittal et al., 2012: natural-scene statistics of the mean-subtracted,
    contrast-normalised pixels, regressed on human quality ratings), so that higher is better: the
    scikit-image astronaut photograph (512²) scores −10.8 sharp and −63.4 after a Gaussian blur of σ = 2.

All three are host rewards (:func:`~diffusion_gym.rewards.host_reward`): they read 8-bit images on
the CPU, ``round(x · 255)`` of the images in ``[0, 1]``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from diffusion_gym.extras import require
from diffusion_gym.rewards.host import host_reward
from diffusion_gym.rewards.registry import RewardFn

__all__ = ["brisque", "edit_similarity", "face_confidence", "ocr", "quoted_text", "to_uint8"]


def to_uint8(images: Tensor, min_side: int = 0) -> list[np.ndarray]:
    """Images in ``[0, 1]`` as ``H × W × 3`` uint8 RGB arrays, upscaled (nearest) to at least ``min_side`` pixels."""
    x = images.detach().float().cpu().clamp(0, 1)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    side = min(x.shape[-2:])
    if min_side and side < min_side:
        factor = -(-min_side // side)
        x = x.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    return list((x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())


def quoted_text(prompt: str) -> str | None:
    """The text between the first pair of double quotes in ``prompt`` (``None`` when there is none)."""
    found = re.search(r'"([^"]*)"', prompt)
    return found.group(1) if found else None


def _levenshtein(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def edit_similarity(read: str, target: str) -> float:
    """``1 − min(d, n) / n`` of the Levenshtein distance ``d``, case and spaces ignored (1: the target exactly).

    Raises:
        ValueError: for an empty target.
    """
    read, target = read.lower().replace(" ", ""), target.lower().replace(" ", "")
    if not target:
        raise ValueError("the OCR target text is empty: quote a non-empty text in the prompt")
    return 1.0 - min(_levenshtein(read, target), len(target)) / len(target)


def ocr(target: str | None = None, min_side: int = 64, threads: int = 1) -> RewardFn:
    """Factory of the ``ocr`` reward (see the module docstring).

    Args:
        target: the text every image should show (``None``: each prompt's quoted text).
        min_side: smaller images are upscaled to this many pixels before reading.
        threads: ONNX Runtime threads of the OCR models.
    """
    rapidocr = require("rapidocr", "ocr", "the ocr reward")
    engine = rapidocr.RapidOCR(
        params={
            "Global.log_level": "error",
            "Global.use_cls": False,
            "Det.limit_type": "max",
            "Det.limit_side_len": 960,
            "EngineConfig.onnxruntime.intra_op_num_threads": threads,
        }
    )

    def targets(conditions: Any, n: int) -> list[str]:
        if target is not None:
            return [target] * n
        if not isinstance(conditions, Sequence) or isinstance(conditions, str):
            raise ValueError("the ocr reward needs prompts with a quoted text, or target= for every image")
        texts = [quoted_text(str(p)) for p in conditions]
        missing = [p for p, t in zip(conditions, texts, strict=True) if t is None]
        if missing:
            raise ValueError(f"the ocr reward reads the prompt's text between double quotes; none in {missing[0]!r}")
        return [t for t in texts if t is not None]

    @host_reward
    def reward(images: Tensor, conditions: Any = None) -> Tensor:
        wanted = targets(conditions, images.shape[0])
        scores = []
        for array, text in zip(to_uint8(images, min_side), wanted, strict=True):
            result = engine(np.ascontiguousarray(array))
            read = "".join(result.txts) if result.txts else ""
            scores.append(edit_similarity(read, text))
        return torch.tensor(scores, dtype=torch.float32)

    reward.read = lambda images: [  # type: ignore[attr-defined]
        "".join(engine(np.ascontiguousarray(a)).txts or ()) for a in to_uint8(images, min_side)
    ]
    return reward


def face_confidence(min_side: int = 128, threshold: float = 0.5) -> RewardFn:
    """Factory of the ``face_confidence`` reward (see the module docstring).

    Args:
        min_side: smaller images are upscaled to this many pixels before detection.
        threshold: detections below this confidence (in ``[0, 1]``) count as no face.
    """
    yuface = require("yuface", "faces", "the face_confidence reward")

    @host_reward
    def reward(images: Tensor, conditions: Any = None) -> Tensor:
        scores = []
        for array in to_uint8(images, min_side):
            confidences, _, _ = yuface.detect(np.ascontiguousarray(array[..., ::-1]), conf=threshold)  # BGR
            scores.append(float(np.max(confidences)) / 100 if len(confidences) else 0.0)
        return torch.tensor(scores, dtype=torch.float32)

    return reward


def brisque(min_side: int = 64) -> RewardFn:
    """Factory of the ``brisque`` reward, minus the BRISQUE score (see the module docstring).

    Args:
        min_side: smaller images are upscaled to this many pixels (the features need two scales of 7×7 windows).
    """
    package = require("brisque", "quality", "the brisque reward")

    class _Brisque(package.BRISQUE):  # type: ignore[misc,name-defined]
        """The package's scorer; its features come back as one-element arrays under NumPy 2, flattened here."""

        def calculate_brisque_features(self, *args: Any, **kwargs: Any) -> np.ndarray:
            features = super().calculate_brisque_features(*args, **kwargs)
            return np.array([np.ravel(f)[0] for f in features], dtype=np.float64)

    scorer = _Brisque(url=False)

    @host_reward
    def reward(images: Tensor, conditions: Any = None) -> Tensor:
        return torch.tensor([-float(scorer.score(a)) for a in to_uint8(images, min_side)], dtype=torch.float32)

    return reward
