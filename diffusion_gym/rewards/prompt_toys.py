"""Prompt-dependent toy rewards: the image a prompt's colour or brightness word asks for.

Text-to-image fine-tuning has no cheap, checkable reward that depends on the prompt; these are (the
embedded digits model's ``digit_confidence`` is their class-id counterpart). They exist so that a run
on a tiny model can show, in minutes on a CPU, that the policy learns what *each prompt* asks for,
not one image for every prompt:

* :func:`prompt_color` — on the red–blue axis: how much redder than blue the image is (mean red minus
  mean blue) for a prompt with a red word, how much bluer for a blue word; 0 for other prompts.
* :func:`prompt_brightness` — how far the image's mean brightness lies above mid-grey for a prompt
  with a bright word, below it for a dark word; 0 for other prompts.

Both are antisymmetric: the two kinds of prompt ask for opposite changes of one image statistic, so
a change of the model that ignores the prompt raises the reward of one kind as much as it lowers the
other's. Over a batch balanced between the two kinds, the mean reward gain is therefore exactly the
prompt-dependent part of what the model learnt.

On ``random:sd-tiny`` only the colour toy is learnable in CPU minutes: a random ``AutoencoderKL``
decoder ends in a GroupNorm that removes the mean of its features, so the decoded images' brightness
barely depends on the latent (gradient norm 0.007 per unit latent, per-sample std 0.006), while the
channel balance does (the output convolution weighs the channels differently). A trained VAE (Stable
Diffusion's) passes brightness, so ``prompt_brightness`` suits real models.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from diffusion_gym.rewards.registry import RewardFn

BRIGHT_WORDS = ("bright", "light", "white", "sunny", "day")
"""Words that make a prompt ask for a bright image."""
DARK_WORDS = ("dark", "black", "night", "shadow", "shadowy")
"""Words that make a prompt ask for a dark image."""
RED_WORDS = ("red", "warm", "orange", "crimson")
"""Words that make a prompt ask for a red image."""
BLUE_WORDS = ("blue", "cool", "cold", "navy")
"""Words that make a prompt ask for a blue image."""


def _words(prompt: str) -> set[str]:
    return set(re.findall(r"[a-z]+", prompt.lower()))


def _prompts(name: str, conditions: Any, batch: int) -> Sequence[str]:
    """``conditions`` if they are one prompt per image, else a ``ValueError`` naming the reward."""
    if isinstance(conditions, str) or not isinstance(conditions, Sequence) or len(conditions) != batch:
        raise ValueError(
            f"reward {name!r} needs one prompt per image (a text-to-image env), got {type(conditions).__name__}"
        )
    return conditions


def prompt_sign(prompt: str, plus: Sequence[str] = BRIGHT_WORDS, minus: Sequence[str] = DARK_WORDS) -> int:
    """+1 if ``prompt`` has a word of ``plus``, −1 if it has one of ``minus``, 0 if neither (or both)."""
    words = _words(prompt)
    return int(bool(words & set(plus))) - int(bool(words & set(minus)))


def antisymmetric_reward(
    name: str, statistic: Callable[[Tensor], Tensor], plus: Sequence[str], minus: Sequence[str]
) -> RewardFn:
    """The reward ``sign(prompt) · statistic(image)``: +1 for a prompt with a ``plus`` word, −1 for a ``minus`` word.

    Args:
        name: the reward's name (for error messages).
        statistic: ``(B, C, H, W)`` images in ``[0, 1]`` -> ``(B,)`` values (centred, so that the two
            kinds of prompt ask for opposite changes).
        plus: words (lower case) of the prompts that ask for a higher statistic.
        minus: words of the prompts that ask for a lower one.
    """
    plus, minus = tuple(plus), tuple(minus)

    def reward(images: Tensor, conditions: Any = None) -> Tensor:
        prompts = _prompts(name, conditions, len(images))
        signs = torch.tensor([prompt_sign(p, plus, minus) for p in prompts], dtype=torch.float32)
        return signs.to(images.device) * statistic(images.float())

    reward.__name__ = f"{name}_reward"
    return reward


def _brightness(images: Tensor) -> Tensor:
    return images.mean(dim=(1, 2, 3)) - 0.5


def _red_minus_blue(images: Tensor) -> Tensor:
    if images.shape[1] != 3:
        raise ValueError(f"reward 'prompt_color' needs RGB images, got {images.shape[1]} channel(s)")
    channels = images.mean(dim=(2, 3))
    return channels[:, 0] - channels[:, 2]


def prompt_brightness(bright_words: Sequence[str] = BRIGHT_WORDS, dark_words: Sequence[str] = DARK_WORDS) -> RewardFn:
    """The reward ``sign(prompt) · (mean brightness − 0.5)``, in ``[−0.5, 0.5]`` (differentiable in the images).

    Args:
        bright_words: words (lower case) whose presence asks for a bright image.
        dark_words: words whose presence asks for a dark image.
    """
    return antisymmetric_reward("prompt_brightness", _brightness, bright_words, dark_words)


def prompt_color(red_words: Sequence[str] = RED_WORDS, blue_words: Sequence[str] = BLUE_WORDS) -> RewardFn:
    """The reward ``sign(prompt) · (mean red − mean blue)``, in ``[−1, 1]`` (differentiable in the images).

    Args:
        red_words: words (lower case) whose presence asks for a red image.
        blue_words: words whose presence asks for a blue image.
    """
    return antisymmetric_reward("prompt_color", _red_minus_blue, red_words, blue_words)
