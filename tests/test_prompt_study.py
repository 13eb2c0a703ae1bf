"""The prompt-following study (``make paper-t2i``): its config, its report's arithmetic, and a tiny end-to-end run."""

import json
import math

import pytest

from agents.cli import main
from agents.paper import load_study
from agents.ppo_is.config import ConfigError
from agents.prompt_report import (
    Guards,
    Run,
    at_crossing,
    best_and_runner_up,
    first_reach,
    summarize,
    write_prompt_report,
)

GRPO_CONFIG = "envs_configs/digits-t2i_grpo_prompt_match.yaml"
GUARDS = Guards(data_ink_margin_p90=10.0, margin_factor=2.0, diversity_floor=0.7)


def _row(epoch: int, accuracy: float, vendi: float = 1.0, margin: float = 5.0, digit_only: float = 1.0) -> dict:
    return {
        "epoch": epoch,
        "episodes": 64 * epoch,
        "train_seconds": 3.0 * epoch,
        "n_images": 240.0,
        "accuracy": accuracy,
        "weight_accuracy": accuracy,
        "digit_only": digit_only,
        "abs_margin_mean": margin,
        "vendi_embedding": vendi,
    }


def test_first_reach_needs_the_target_and_every_guard():
    run = Run("m", 0, [
        _row(0, 0.60),
        _row(10, 0.90, vendi=0.60),  # diversity below 70% of the base's
        _row(20, 0.91, margin=25.0),  # |margin| above 2 x 10
        _row(30, 0.92, digit_only=0.95),  # digit-only below the base's
        _row(40, 0.84),  # guards held, below the target
        _row(50, 0.86),
    ])  # fmt: skip
    assert GUARDS.failed(run.rows[1], run.rows[0]) == ["diversity"]
    assert GUARDS.failed(run.rows[2], run.rows[0]) == ["ink margin"]
    assert GUARDS.failed(run.rows[3], run.rows[0]) == ["digit-only"]
    assert first_reach(run, 0.85, GUARDS) == {"episodes": 3200.0, "seconds": 150.0}
    assert first_reach(run, 0.95, GUARDS) is None


def test_diversity_at_a_crossing_is_interpolated_between_evaluations():
    run = Run("m", 0, [_row(0, 0.60, vendi=1.2), _row(10, 0.70, vendi=1.0), _row(20, 0.90, vendi=0.8)])
    assert at_crossing(run, 0.80, "vendi_embedding") == pytest.approx(0.9)  # halfway from 0.70 to 0.90
    assert at_crossing(run, 0.55, "vendi_embedding") == pytest.approx(1.2)  # the base is already there
    assert at_crossing(run, 0.95, "vendi_embedding") is None
    hacked = Run("m", 0, [_row(0, 0.60, vendi=1.2), _row(10, 0.90, vendi=1.5, margin=30.0), _row(20, 0.95)])
    assert at_crossing(hacked, 0.80, "vendi_embedding") == pytest.approx(1.4)
    assert at_crossing(hacked, 0.80, "vendi_embedding", GUARDS) is None  # the crossing's evaluation is hacked


def _curves() -> list[Run]:
    """``fast`` reaches 0.85 at epoch 10 on every seed, ``slow`` at epoch 20 on two seeds; ``slow`` keeps more Vendi."""
    runs = []
    for seed in range(3):
        fast = [_row(0, 0.6), _row(10, 0.86 + 0.01 * seed, vendi=0.9), _row(20, 0.9, vendi=0.8)]
        last = 0.88 if seed < 2 else 0.80
        slow = [_row(0, 0.6), _row(10, 0.7, vendi=1.1), _row(20, last, vendi=1.0 + 0.01 * seed)]
        runs += [Run("fast", seed, fast), Run("slow", seed, slow)]
    return runs


def test_summary_and_verdicts_are_computed_from_the_curves(tmp_path):
    runs = _curves()
    summary = summarize(runs, 0.85, [0.8], GUARDS)
    assert summary["fast"]["reached"] == 3 and summary["slow"]["reached"] == 2
    assert summary["fast"]["reach_episodes"][:2] == (640.0, 0.0)
    assert summary["slow"]["reach_seconds"][0] == 60.0
    fast_at = summary["fast"]["vendi_at"]["0.8"]
    assert fast_at[2] == 3 and fast_at[0] == pytest.approx(1.0 - 0.1 * (0.2 / 0.26 + 0.2 / 0.27 + 0.2 / 0.28) / 3)
    assert summary["slow"]["vendi_at"]["0.8"][2] == 3  # the third seed ends exactly at 0.80
    assert summary["slow"]["crossed"]["0.8"] == 3
    acc = summary["slow"]["final"]["accuracy"]
    assert acc[0] == pytest.approx((0.88 + 0.88 + 0.80) / 3) and acc[1] == pytest.approx(math.sqrt(0.0064 / 3 / 3) * 1)
    path = write_prompt_report(runs, tmp_path, title="t", header=["h"], target=0.85, levels=[0.8], guards=GUARDS)
    report = path.read_text()
    verdict = "first to 85% with guards held: fast (3/3 seeds, mean 640 ± 0 episodes); then slow (2/3 seeds, mean 1280"
    assert f"- **Equal episodes**: {verdict} ± 0 episodes)." in report
    assert "- **Diversity** at 80% accuracy: most diversity slow" in report
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    written = json.loads((tmp_path / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert written["methods"]["slow"]["reached"] == 2 and written["methods"]["slow"]["reach_episodes"][1] is not None


def test_the_committed_study_config_is_the_benchmark():
    study = load_study("envs_configs/paper_t2i.yaml")
    assert set(study.methods) == {"grpo", "grpo-fast", "mixgrpo", "hrf", "hrf-d", "drift", "vard"}
    assert {m.algo for m in study.methods.values()} == {"grpo", "vard"}
    assert len(study.seeds) >= 3 and study.prompt_following is not None
    assert study.injection is None and study.jobs == 1


def test_a_prompt_study_refuses_an_injection_stage(tmp_path):
    path = tmp_path / "study.yaml"
    config = {
        "out_dir": str(tmp_path / "runs"), "report_dir": str(tmp_path / "report"), "base_model": "embedded:digits-t2i",
        "rewards": ["prompt_match_smooth"], "methods": {"grpo": {"config": GRPO_CONFIG, "algo": "grpo"}},
        "prompt_following": {"data_ink_margin_p90": 11.25}, "injection": {"method": "grpo"},
    }  # fmt: skip
    path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="a prompt_following study has no injection stage"):
        load_study(path)


def test_a_tiny_prompt_study_trains_grpo_and_vard_and_reports(tmp_path):
    """Both algorithms train in-process on the embedded text-to-image model; the report reads their eval.jsonl."""
    tiny = ["num_epochs=2", "sample.num_envs=16", "sample.num_steps=4", "eval.every=1", "eval.num_samples=20",
            "eval.num_steps=4", "save_every=2"]  # fmt: skip
    config = {
        "out_dir": str(tmp_path / "runs"), "report_dir": str(tmp_path / "report"), "title": "tiny",
        "base_model": "embedded:digits-t2i", "seeds": [0], "rewards": ["prompt_match_smooth"],
        "methods": {
            "grpo": {"config": GRPO_CONFIG, "algo": "grpo"},
            "vard": {"config": "envs_configs/digits-t2i_vard_prompt_match.yaml", "algo": "vard"},
        },
        "overrides": tiny, "method_overrides": {"vard": ["value.warmup_steps=10", "value.steps_per_epoch=5"]},
        "injection": None, "prompt_following": {"target": 0.9, "levels": [0.8], "data_ink_margin_p90": 11.25},
    }  # fmt: skip
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps(config))
    assert main(["paper", "--config", str(path)]) == 0
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())["methods"]
    assert list(summary) == ["grpo", "vard"] and all(s["episodes"] == 32 for s in summary.values())
    vard_run = tmp_path / "runs" / "runs" / "vard__prompt_match_smooth__seed0"
    curve = [json.loads(line) for line in (vard_run / "eval.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in curve] == [0, 1, 2] and curve[0]["n_images"] == 20
    assert "## Diversity at matched accuracy" in (tmp_path / "report" / "report.md").read_text()
    assert not (tmp_path / "runs" / "eval").exists()  # no evaluation stage


def test_best_and_runner_up_gives_no_se_for_a_single_seed():
    """Two seeds each: the difference in SE; one seed: no SE is claimed (a single run has no spread)."""
    two = best_and_runner_up({"a": (1.0, 0.1, 2), "b": (0.5, 0.1, 2)})
    assert two.startswith("a (1.000 ± 0.100, 2 seeds), ahead of b by 0.500 (3.5 SE: a difference)")
    one = best_and_runner_up({"a": (1.0, float("nan"), 1), "b": (0.5, float("nan"), 1)})
    assert one.endswith("ahead of b by 0.500 (no SE: a method has one seed)")
    assert "SE: a difference" not in one
