"""The embedded text-to-image task's prompt language and its prompt-following rewards, on the real digits."""

from __future__ import annotations

import pytest
import torch

from diffusion_gym.digit_prompts import (
    HELDOUT_PROMPTS,
    HELDOUT_TEMPLATES,
    NUMBER_WORDS,
    TRAIN_PROMPTS,
    TRAIN_TEMPLATES,
    VOCABULARY,
    DigitPrompt,
    parse_prompt,
)
from diffusion_gym.digits import ink, ink_medians, load_digits_dataset
from diffusion_gym.prompts import make_prompts
from diffusion_gym.rewards import make_reward
from diffusion_gym.rewards.prompt_match import prompt_attributes


def test_every_prompt_reads_back_as_what_it_says():
    for templates in (TRAIN_TEMPLATES, HELDOUT_TEMPLATES):
        for template in templates:
            for digit in range(10):
                for weight in ("bold", "thin") if "{weight}" in template else (None,):
                    asked = DigitPrompt(digit, weight)
                    assert parse_prompt(asked.render(template)) == asked
    assert len(TRAIN_PROMPTS) == 130 and len(HELDOUT_PROMPTS) == 80
    assert not set(TRAIN_PROMPTS) & set(HELDOUT_PROMPTS)  # held-out phrasings are never training captions
    assert {w for p in HELDOUT_PROMPTS for w in p.split()} <= set(VOCABULARY)  # but use known words only
    assert make_prompts("digits").prompts == TRAIN_PROMPTS
    assert make_prompts("digits-heldout").prompts == HELDOUT_PROMPTS


@pytest.mark.parametrize(
    ("prompt", "message"),
    [("a cat", "got none"), ("3 or 4", r"got \[3, 4\]"), ("a bold thin 3", "got both"), ("three 4", r"\[3, 4\]")],
)
def test_prompts_that_are_not_digit_prompts_are_named(prompt, message):
    with pytest.raises(ValueError, match=message):
        parse_prompt(prompt)


def test_bold_and_thin_split_every_digit_at_its_median_ink():
    images, labels = load_digits_dataset()
    medians = ink_medians()
    bold = ink(images) > medians[labels]
    for digit in range(10):
        assert 0.4 < float(bold[labels == digit].float().mean()) < 0.6
    assert torch.allclose(ink(images.repeat(1, 3, 1, 1)), ink(images))  # grey or RGB alike
    big = torch.nn.functional.interpolate(images[:8], size=(32, 32), mode="bilinear", align_corners=False)
    assert (ink(big) - ink(images[:8])).abs().max() < 2.0  # measured at 16×16 whatever the size


def test_the_rewards_score_real_digits_for_their_own_prompts():
    images, labels = load_digits_dataset()
    images, labels = images[:200], labels[:200]
    bold = ink(images) > ink_medians()[labels]
    right = [f"a {'bold' if b else 'thin'} {d}" for d, b in zip(labels.tolist(), bold.tolist(), strict=True)]
    wrong_weight = [f"a {'thin' if b else 'bold'} {d}" for d, b in zip(labels.tolist(), bold.tolist(), strict=True)]
    wrong_digit = [f"the number {NUMBER_WORDS[(d + 1) % 10]}" for d in labels.tolist()]
    match = make_reward("prompt_match")
    assert float(match(images, right).mean()) > 0.97
    assert float(match(images, wrong_weight).mean()) < 0.03
    assert float(match(images, wrong_digit).mean()) < 0.03
    smooth = make_reward("prompt_match_smooth")
    assert bool((smooth(images, right) > smooth(images, wrong_weight)).float().mean() > 0.95)
    parts = prompt_attributes(images, right)
    assert bool(parts.digit_ok.float().mean() > 0.97) and bool(parts.weight_ok.all())
    with pytest.raises(ValueError, match="one prompt per image"):
        match(images, "a 3")
