"""A prompt-dependent toy reward: bright images for "bright" prompts, dark images for "dark" ones.

Text-to-image fine-tuning has no cheap, checkable reward that depends on the prompt; this one is
(the embedded digits model's ``digit_confidence`` is its class-id counterpart). It exists so that a
run on a tiny random Stable Diffusion can show, in minutes on a CPU, that the policy learns what
*each prompt* asks for, not one image for every prompt: the reward of an image is how far its mean
brightness lies above mid-grey (0.5) for a prompt with a bright word, below it for a prompt with a
dark word, and 0 for other prompts.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from diffusion_gym.rewards.registry import RewardFn

BRIGHT_WORDS = ("bright", "light", "white", "sunny", "day")
"""Words that make a prompt ask for a bright image."""
DARK_WORDS = ("dark", "black", "night", "shadow", "shadowy")
"""Words that make a prompt ask for a dark image."""


def prompt_sign(prompt: str, bright: Sequence[str] = BRIGHT_WORDS, dark: Sequence[str] = DARK_WORDS) -> int:
    """+1 if ``prompt`` has a bright word, −1 if it has a dark word, 0 if neither (or both)."""
    words = set(re.findall(r"[a-z]+", prompt.lower()))
    has_bright, has_dark = bool(words & set(bright)), bool(words & set(dark))
    return int(has_bright) - int(has_dark)


def prompt_brightness(bright_words: Sequence[str] = BRIGHT_WORDS, dark_words: Sequence[str] = DARK_WORDS) -> RewardFn:
    """The reward ``sign(prompt) · (mean brightness − 0.5)``, in ``[−0.5, 0.5]`` (differentiable in the images).

    Args:
        bright_words: words (lower case) whose presence asks for a bright image.
        dark_words: words whose presence asks for a dark image.

    Raises:
        ValueError: (when called) for conditions that are not one prompt per image.
    """
    bright, dark = tuple(bright_words), tuple(dark_words)

    def prompt_brightness_reward(images: Tensor, conditions: Any = None) -> Tensor:
        if isinstance(conditions, str) or not isinstance(conditions, Sequence) or len(conditions) != len(images):
            raise ValueError(
                "reward 'prompt_brightness' needs one prompt per image (a text-to-image env), got "
                f"{type(conditions).__name__}"
            )
        signs = torch.tensor([prompt_sign(p, bright, dark) for p in conditions], dtype=torch.float32)
        return signs.to(images.device) * (images.float().mean(dim=(1, 2, 3)) - 0.5)

    return prompt_brightness_reward
