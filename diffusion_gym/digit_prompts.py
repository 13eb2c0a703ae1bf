"""The prompt language of the embedded text-to-image model: a digit and, optionally, its stroke weight.

A prompt names a digit (``"3"``, ``"three"``) and may ask for a stroke weight (``"bold"`` or
``"thin"``): ``"a bold 3"``, ``"the number three in thin strokes"``. The weight of a digit image is
its *ink*, the sum of its grey levels: an image is bold when its ink is above the median ink of its
digit's training images, thin below it, so every digit has as many bold as thin examples.

Two sets of phrasings (templates):

* :data:`TRAIN_TEMPLATES` — the model's training captions are written with these, and RL training
  draws its prompts from them (built-in prompt set ``"digits"``);
* :data:`HELDOUT_TEMPLATES` — never in a caption: evaluation uses them (``"digits-heldout"``) to
  measure whether fine-tuning taught the *attributes* or only the training sentences. They recombine
  the training vocabulary in new orders, so the word-level tokenizer knows every word.

``"digits-thin"`` and ``"digits-heldout-thin"`` are their thin-stroke subsets (the held-out one with
the digit-only phrasings): the one-attribute task of ``make paper-t2i``.

:func:`parse_prompt` reads a prompt back into its attributes; rewards and metrics use it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
"""The digits' names, by value."""
WEIGHTS = ("bold", "thin")
"""The stroke weights a prompt may ask for."""
TRAIN_TEMPLATES = (
    "{numeral}",
    "{word}",
    "a handwritten {word}",
    "the number {word}",
    "the digit {numeral}",
    "a {weight} {numeral}",
    "a {weight} {word}",
    "a {weight} handwritten {word}",
    "the number {word} in {weight} strokes",
)
"""Phrasings of the training captions and RL training prompts (with ``{weight}``: weighted ones)."""
HELDOUT_TEMPLATES = (
    "a handwritten {numeral}",
    "the digit {word}",
    "the {weight} number {word}",
    "a {weight} digit {numeral}",
    "{word} in {weight} strokes",
)
"""Phrasings used for evaluation only."""
VOCABULARY = tuple(
    sorted(
        {w for t in TRAIN_TEMPLATES + HELDOUT_TEMPLATES for w in re.findall(r"[a-z]+", re.sub(r"\{\w+\}", "", t))}
        | set(NUMBER_WORDS)
        | set(WEIGHTS)
        | {str(d) for d in range(10)}
    )
)
"""Every word the prompts use (the embedded model's tokenizer merges each into one token)."""


@dataclass(frozen=True)
class DigitPrompt:
    """What a prompt asks for."""

    digit: int
    """The digit, 0–9."""
    weight: str | None = None
    """``"bold"``, ``"thin"`` or ``None`` (any weight)."""

    def render(self, template: str) -> str:
        """The prompt ``template`` says for these attributes."""
        return template.format(numeral=str(self.digit), word=NUMBER_WORDS[self.digit], weight=self.weight or "")


def _weighted(template: str) -> bool:
    return "{weight}" in template


def make_digit_prompts(
    templates: tuple[str, ...], weights: tuple[str, ...] = WEIGHTS, digit_only: bool = True
) -> tuple[str, ...]:
    """Every prompt the templates say: each digit with each template (weighted ones with each of ``weights``).

    Args:
        templates: phrasings (:data:`TRAIN_TEMPLATES`, :data:`HELDOUT_TEMPLATES`).
        weights: the stroke weights of the weighted templates' prompts.
        digit_only: include the templates without a weight.
    """
    prompts = []
    for template in templates:
        if not _weighted(template) and not digit_only:
            continue
        for digit in range(10):
            options = weights if _weighted(template) else (None,)
            prompts += [DigitPrompt(digit, weight).render(template) for weight in options]
    return tuple(prompts)


TRAIN_PROMPTS = make_digit_prompts(TRAIN_TEMPLATES)
"""The built-in ``"digits"`` prompts: every training phrasing of every digit and weight (130)."""
HELDOUT_PROMPTS = make_digit_prompts(HELDOUT_TEMPLATES)
"""The built-in ``"digits-heldout"`` prompts (80)."""
THIN_PROMPTS = make_digit_prompts(TRAIN_TEMPLATES, ("thin",), digit_only=False)
"""The built-in ``"digits-thin"`` prompts: the training phrasings that ask for thin strokes (40)."""
HELDOUT_THIN_PROMPTS = make_digit_prompts(HELDOUT_TEMPLATES, ("thin",))
"""The built-in ``"digits-heldout-thin"`` prompts: the held-out thin and digit-only phrasings (50)."""

_NUMERAL = re.compile(r"(?<![\w])([0-9])(?![\w])")
_WORDS = {word: value for value, word in enumerate(NUMBER_WORDS)}


def parse_prompt(prompt: str) -> DigitPrompt:
    """The attributes a prompt asks for: the one digit it names and the weight word, if any.

    Raises:
        ValueError: when the prompt names no digit, several digits, or both weights.
    """
    text = prompt.lower()
    digits = {int(m) for m in _NUMERAL.findall(text)} | {_WORDS[w] for w in re.findall(r"[a-z]+", text) if w in _WORDS}
    weights = {w for w in re.findall(r"[a-z]+", text) if w in WEIGHTS}
    if len(digits) != 1:
        found = sorted(digits) if digits else "none"
        raise ValueError(f"a digit prompt names exactly one digit (0-9 or zero-nine), got {found} in {prompt!r}")
    if len(weights) > 1:
        raise ValueError(f"a digit prompt asks for at most one weight {list(WEIGHTS)}, got both in {prompt!r}")
    return DigitPrompt(digits.pop(), weights.pop() if weights else None)
