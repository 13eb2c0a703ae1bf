"""Optional dependencies: a feature that needs one says which ``pip install`` extra provides it.

The core (the env, the math, JPEG rewards, the PPO-IS and VARD trainers) needs none of them:

| extra | package | what needs it |
|---|---|---|
| ``lora`` | peft | LoRA adapters (``train.lora_rank > 0``) |
| ``clip`` | open_clip_torch | the CLIP image encoder: ``laion_aesthetic``, CLIP metrics |
| ``sb3`` | stable-baselines3 | ``agents.sb3`` (the Stable-Baselines3 adapter) |
| ``text`` | transformers | text-conditioned latent models (``diffusion_gym.families``: SD 1.x/2.x, SDXL) |
| ``ocr`` | rapidocr, onnxruntime, opencv-python-headless | the ``ocr`` reward (PP-OCR models in the wheel) |
| ``faces`` | yuface | the ``face_confidence`` reward (YuNet, weights in the wheel) |
| ``quality`` | brisque, scikit-image | the ``brisque`` reward (the LIVE-trained SVR in the wheel) |
| ``all`` | all of the above | |
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingExtraError", "require"]


class MissingExtraError(ImportError):
    """An optional package is not installed; the message names the ``pip install`` extra that provides it."""


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module``, or raise :class:`MissingExtraError` naming the extra that installs it.

    Args:
        module: the module to import (e.g. ``"peft"``).
        extra: the ``diffusion-gym`` extra that installs it (e.g. ``"lora"``).
        feature: what needs it, for the message.

    Raises:
        MissingExtraError: when the package is not installed (other import errors propagate).
    """
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name not in (top, module):
            raise
        raise MissingExtraError(
            f"{feature} needs the optional package {top!r}, which is not installed: "
            f"pip install 'diffusion-gym[{extra}]' (or 'diffusion-gym[all]')"
        ) from None
