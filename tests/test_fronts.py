"""Fronts: diversity at matched reward along training, on hand-computed curves."""

import math

import pytest

from agents.fronts import front_lines, matched, reward_levels
from agents.prompt_report import Run


def _run(method, seed, rewards, vendi):
    rows = [
        {"epoch": 4 * i, "episodes": 256 * i, "reward_mean": r, "vendi_pixels": v}
        for i, (r, v) in enumerate(zip(rewards, vendi, strict=True))
    ]
    return Run(method, seed, rows)


RUNS = [
    _run("a", 0, [0.0, 0.2, 0.4], [2.0, 1.8, 1.4]),
    _run("a", 1, [0.0, 0.1, 0.3], [2.0, 1.9, 1.5]),
    _run("b", 0, [0.0, 0.4, 0.8], [2.0, 1.0, 0.6]),
    _run("b", 1, [0.0, 0.2, 0.6], [2.0, 1.6, 1.2]),
]


def test_levels_lie_below_every_methods_best_seed_mean():
    # seed means: a reaches (0.4 + 0.3) / 2 = 0.35, b 0.7: the levels split [0, 0.35]
    assert reward_levels(RUNS) == pytest.approx([0.0875, 0.175, 0.2625])
    flat = [*RUNS, _run("c", 0, [0.0, -0.1, -0.2], [2.0, 2.0, 2.0])]
    assert reward_levels(flat) == []  # c never rises above the base: nothing is matched


def test_diversity_is_interpolated_where_each_seed_crosses_the_level():
    at = matched(RUNS, [0.2, 0.35], ["vendi_pixels"])
    # a: seed 0 reaches 0.2 exactly at its 2nd evaluation (1.8); seed 1 half-way between 0.1 and 0.3 (1.7)
    mean, se, n = at["a"]["at"]["vendi_pixels"][0.2]
    assert (mean, se, n) == pytest.approx((1.75, 0.05, 2))
    # b: seed 0 half-way between 0 and 0.4 (1.5), seed 1 at 0.2 exactly (1.6)
    assert at["b"]["at"]["vendi_pixels"][0.2] == pytest.approx((1.55, 0.05, 2))
    # 0.35: a's seed 1 never gets there; seed 0 three quarters of the way from 0.2 to 0.4
    mean, se, n = at["a"]["at"]["vendi_pixels"][0.35]
    assert (mean, n) == pytest.approx((1.5, 1)) and math.isnan(se)


def test_front_section_states_computed_verdicts_and_draws_the_plot(tmp_path):
    lines = "\n".join(front_lines(RUNS, {"vendi_pixels": "Vendi (pixels)"}, tmp_path))
    # at 0.175: a's seed 0 is 7/8 of the way to its 2nd evaluation, 2.0 − 0.875·0.2 = 1.825; seed 1 3/8 of the
    # way from 0.1 to 0.3, 1.9 − 0.375·0.4 = 1.75: mean 1.7875, SE 0.0375; b: 1.5625 and 1.65, SE 0.04375
    assert "at reward 0.1750, most Vendi (pixels): a (1.788 ± 0.038, 2 seeds), ahead of b by 0.181 (3.1 SE" in lines
    assert "| a | 1.913 ± 0.000 (2/2) | 1.788 ± 0.038 (2/2) | 1.625 ± 0.050 (2/2) |" in lines
    assert (tmp_path / "fronts.png").is_file() and "![Fronts](fronts.png)" in lines


def test_a_pair_of_methods_is_compared_cell_by_cell_at_matched_reward():
    from agents.fronts import pair_lines

    summary = matched(RUNS, [0.2, 0.35], ["vendi_pixels"])
    text = "\n".join(pair_lines(summary, [0.2, 0.35], {"vendi_pixels": "Vendi (pixels)"}, "a", "b"))
    # at 0.2: a 1.75 ± 0.05, b 1.55 ± 0.05: +0.2 ± 0.0707 (2.8 SE); at 0.35 a has one seed: no comparison
    assert "| Vendi (pixels) | +0.200 ± 0.071 (+2.8 SE) | – |" in text
    assert "of 1 matched comparisons, a keeps more by 2 SE or more in 1, b in 0; 0 lie within 2 SE." in text


def test_a_pair_is_matched_on_the_range_both_of_its_methods_reach(tmp_path):
    # c barely rises (best seed mean 0.04): it sets the study's levels, not those of the pair a, b
    slow = _run("c", 0, [0.0, 0.02, 0.04], [2.0, 2.0, 2.0])
    lines = "\n".join(front_lines([*RUNS, slow], {"vendi_pixels": "Vendi (pixels)"}, tmp_path, pairs=[("a", "b")]))
    assert "| method | at reward 0.0100 | at reward 0.0200 | at reward 0.0300 |" in lines  # the study's levels
    # the pair's: a quarter, half and three quarters of a's 0.35 (as test_levels_lie_below_every_methods_best_seed_mean)
    assert "| metric | at reward 0.0875 | at reward 0.1750 | at reward 0.2625 |" in lines
    # at 0.175: a 1.7875 ± 0.0375, b 1.5625 and 1.65 (1.60625 ± 0.04375): +0.181 ± 0.058 (+3.1 SE)
    assert "+0.181 ± 0.058 (+3.1 SE)" in lines
