"""Studies beyond the paper: VARD methods, rows of earlier studies (``compare_with``), other methods' columns."""

import json
import shutil
from pathlib import Path

import pytest

from agents.cli import main
from agents.paper import _train_command, load_comparisons, load_study
from agents.ppo_is.config import ConfigError
from agents.report import Study, load_results, merge_results, write_report

REWARDS = ("jpeg_compressibility", "jpeg_incompressibility")


def _drift_fixtures(tmp_path: Path) -> str:
    """The DRIFT configs' template: the real files if they exist, else PPO-IS placeholders in ``tmp_path``."""
    real = "envs_configs/digits_drift_{reward}.yaml"
    if all(Path(real.format(reward=r)).is_file() for r in REWARDS):
        return real
    for r in REWARDS:
        shutil.copy(f"envs_configs/digits_ddpo_{r}.yaml", tmp_path / f"digits_drift_{r}.yaml")
    return str(tmp_path / "digits_drift_{reward}.yaml")


def test_beyond_study_validates_with_the_paper_budget(tmp_path):
    text = Path("envs_configs/paper_digits_beyond.yaml").read_text()
    config = tmp_path / "beyond.yaml"
    config.write_text(text.replace("envs_configs/digits_drift_{reward}.yaml", _drift_fixtures(tmp_path)))
    study, paper = load_study(config), load_study("envs_configs/paper_digits.yaml")
    assert {m: s.algo for m, s in study.methods.items()} == {"vard": "vard", "drift": "ppo-is"}
    assert study.methods["vard"].config == "envs_configs/digits_vard_{reward}.yaml"
    assert study.compare_with == ["docs/results/paper_digits/evaluations.json"] and study.jobs == 2
    assert (study.seeds, study.rewards, study.overrides) == (paper.seeds, paper.rewards, paper.overrides)
    assert study.evaluation == paper.evaluation and study.injection.method == "vard"
    cmd = _train_command(study, "vard", REWARDS[0], 1, tmp_path / "run")
    assert cmd[cmd.index("--algo") + 1] == "vard" and "envs_configs/digits_vard_jpeg_compressibility.yaml" in cmd
    assert "seed=1" in cmd and "num_epochs=12" in cmd


def _study_yaml(tmp_path: Path, methods: str, extra: str = "") -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(
        f"out_dir: {tmp_path / 'runs'}\nreport_dir: {tmp_path / 'report'}\nseeds: [0]\n"
        f"rewards: [jpeg_compressibility]\nmethods: {methods}\ninjection: null\n{extra}"
    )
    return path


def test_study_method_algo_errors(tmp_path):
    vard = "'envs_configs/digits_vard_{reward}.yaml'"
    with pytest.raises(ConfigError, match=r"methods\.vard\.algo: Input should be 'ppo-is', 'vard' or 'grpo'"):
        load_study(_study_yaml(tmp_path, f"{{vard: {{config: {vard}, algo: vardd}}}}"))
    with pytest.raises(
        ConfigError, match=r"(?s)methods\.vard \(algo ppo-is\):.*the config says 'vard'.*use --algo vard"
    ):
        load_study(_study_yaml(tmp_path, f"{{vard: {vard}}}"))
    ddpo = "'envs_configs/digits_ddpo_{reward}.yaml'"
    with pytest.raises(
        ConfigError, match=r"(?s)methods\.d \(algo vard\):.*the config says 'ppo-is'.*use --algo ppo-is"
    ):
        load_study(_study_yaml(tmp_path, f"{{d: {{config: {ddpo}, algo: vard}}}}"))
    with pytest.raises(ConfigError, match="compare_with: nowhere.json does not exist"):
        load_study(_study_yaml(tmp_path, f"{{d: {ddpo}}}", "compare_with: [nowhere.json]\n"))


def _evaluation(method, seed=None, reward=-0.5, vendi=3.0, **settings):
    task = None if method == "base" else "jpeg_compressibility"
    return {
        "label": method if method == "base" else f"{method}__{task}__seed{seed}",
        "method": method,
        **({"task": task, "seed": seed} if task else {}),
        "settings": {
            "num_samples": 10,
            "seed": 2024,
            "num_steps": 4,
            "eta": 1.0,
            "scheduler": "ddim",
            "batch_size": 10,
            "pixel_size": 32,
            "is_splits": 10,
            "metric_nets": "auto",
            "rewards": list(REWARDS),
            **settings,
        },
        "initial_noise_digest": "abc",
        "rewards": {r: {"mean": reward, "se": 0.01} for r in REWARDS},
        "inception_score": {"mean": 9.0, "std": 0.1, "network": "digit-classifier"},
        "vendi_pixel": vendi,
        "vendi_embedding": {"value": vendi + 1, "network": "digit-classifier"},
    }


def test_compare_with_adds_rows_and_checks_compatibility(tmp_path):
    ddpo = "'envs_configs/digits_ddpo_{reward}.yaml'"
    earlier = tmp_path / "earlier.json"
    rows = [_evaluation("base"), *(_evaluation("ddpo", s, -0.40 - 0.01 * s, 2.0) for s in range(3))]
    rows += [_evaluation("hrf-d", s, -0.41, 2.9) for s in range(3)]
    earlier.write_text(json.dumps(rows))
    study = load_study(_study_yaml(tmp_path, f"{{d: {ddpo}}}", f"compare_with: [{earlier}]\n"))
    own = [_evaluation("base"), *(_evaluation("vard", s, -0.45, 2.7) for s in range(3))]
    own[0]["rewards"]["jpeg_compressibility"]["mean"] = -0.49  # this study's base wins over the earlier one's
    compared = load_comparisons(study, own[0], "eval/base.json")
    assert len(compared) == 7 and all(c["compared_from"] == str(earlier) for c in compared)
    merged = merge_results(own, compared)
    assert [r["method"] for r in merged].count("base") == 1 and len(merged) == 10
    table = Study(merged).table("reward", 4)
    assert table[0] == ["task", "Base", "DDPO", "HRF-D", "vard"] and table[1][1].startswith("-0.4900")
    assert table[1][4].startswith("-0.4500") and "(n=3)" in table[1][4]
    for i, r in enumerate(own):
        (tmp_path / f"own{i}.json").write_text(json.dumps(r))
    text = write_report(list(tmp_path.glob("own*.json")), tmp_path / "report", extra=compared).read_text()
    assert "| task | Base | DDPO | HRF-D | vard |" in text and "DDPO raises the reward over Base | yes" in text
    assert "Embedding projection skipped" in text and (tmp_path / "report" / "fig5_reward_vs_vendi.png").is_file()
    assert len(Study(load_results(list(tmp_path.glob("own*.json")))).methods) == 1

    for field, value, text in (
        ("num_steps", 40, "settings.num_steps is 40 there but 4"),
        ("metric_nets", "inception", "settings.metric_nets is 'inception' there but 'auto'"),
    ):
        bad = [_evaluation("base", **{field: value})]
        earlier.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=f"compare_with: {earlier}: evaluation 'base' is not comparable: {text}"):
            load_comparisons(study, own[0], "eval/base.json")
    bad = _evaluation("ddpo", 0)
    bad["initial_noise_digest"] = "def"
    earlier.write_text(json.dumps([bad]))
    with pytest.raises(ValueError, match="initial_noise_digest is 'def' there but 'abc' in this study's base"):
        load_comparisons(study, own[0], "eval/base.json")
    del bad["rewards"]["jpeg_compressibility"]
    bad["initial_noise_digest"] = "abc"
    earlier.write_text(json.dumps([bad]))
    with pytest.raises(ValueError, match="rewards is \\['jpeg_incompressibility'\\] there"):
        load_comparisons(study, own[0], "eval/base.json")


def test_study_with_a_vard_method_end_to_end_on_a_tiny_budget(tmp_path, tiny_vard):
    """VARD trains in-process, is evaluated and gets its row; an earlier study's rows join through compare_with."""
    overrides = "[" + ", ".join(tiny_vard) + "]"
    methods = '{vard: {config: "envs_configs/digits_vard_{reward}.yaml", algo: vard}}'
    evaluation = "evaluation: {num_samples: 10, num_steps: 4, batch_size: 10}\n"
    config = _study_yaml(tmp_path, methods, f"overrides: {overrides}\n{evaluation}")
    assert main(["paper", "--config", str(config)]) == 0
    evaluations = json.loads((tmp_path / "report" / "evaluations.json").read_text())
    assert [e["method"] for e in evaluations] == ["base", "vard"]
    assert len({e["initial_noise_digest"] for e in evaluations}) == 1
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| task | Base | vard |" in report and "| train | 1 |" in report
    assert "Embedding projection of Base vs vard" in report  # no DDPO here: VARD's arrays stand in

    # an "earlier study": this one's evaluations relabelled as DDPO (same settings and noise, by construction)
    earlier = tmp_path / "earlier.json"
    ddpo = {**evaluations[1], "method": "ddpo", "label": "ddpo__jpeg_compressibility__seed0"}
    earlier.write_text(json.dumps([evaluations[0], ddpo]))
    config.write_text(config.read_text() + f"compare_with: [{earlier}]\n")
    assert main(["paper", "--config", str(config), "--stages", "train,report"]) == 0
    timings = json.loads((tmp_path / "runs" / "timings.json").read_text())
    assert [t["stage"] for t in timings].count("train") == 1  # the finished VARD run was skipped
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| task | Base | DDPO | vard |" in report and f"`{earlier}` (1 evaluations)" in report
    assert "Embedding projection of Base vs vard (no per-sample arrays of DDPO here)" in report
    evaluations = json.loads((tmp_path / "report" / "evaluations.json").read_text())
    assert [(e["method"], e.get("compared_from")) for e in evaluations] == [
        ("base", None),
        ("vard", None),
        ("ddpo", str(earlier)),
    ]
    earlier.write_text(json.dumps([{**ddpo, "initial_noise_digest": "0"}]))
    assert main(["paper", "--config", str(config), "--stages", "report"]) == 2
