"""Studies beyond the paper: VARD methods, rows of earlier studies (``compare_with``), other methods' columns."""

import json
import math
import shutil
from pathlib import Path

import pytest
import yaml

from agents.algorithms import load_run_config
from agents.cli import main
from agents.paper import _train_command, load_comparisons, load_study, planned_runs
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
    assert {m: s.algo for m, s in study.methods.items()} == {
        "hrf-early": "ppo-is",
        "hrf-later": "ppo-is",
        "vard": "vard",
        "drift": "ppo-is",
        "ddpo": "ppo-is",
    }
    assert study.methods["vard"].config == "envs_configs/digits_vard_{reward}.yaml"
    assert study.compare_with == ["docs/results/paper_digits/evaluations.json"] and study.jobs == 2
    assert (study.seeds, study.rewards, study.overrides) == (paper.seeds, paper.rewards, paper.overrides)
    assert study.evaluation == paper.evaluation and study.injection.method == "vard"
    assert study.method_overrides["drift"] == paper.method_overrides["ddpo"]  # DRIFT = DDPO + its options
    # DDPO re-run exactly as make paper runs it, the reference of DRIFT's fronts
    assert study.methods["ddpo"] == paper.methods["ddpo"]
    assert study.method_overrides["ddpo"] == paper.method_overrides["ddpo"]
    assert [tuple(p) for p in study.front_pairs] == [("drift", "ddpo")]
    cmd = _train_command(study, "vard", REWARDS[0], 1, tmp_path / "run")
    assert cmd[cmd.index("--algo") + 1] == "vard" and "envs_configs/digits_vard_jpeg_compressibility.yaml" in cmd
    assert "seed=1" in cmd and "num_epochs=8" in cmd and "eval.metric_nets=auto" in cmd
    sweep = study.sweep  # VARD's beta, tuned on seeds the tables do not report
    assert (sweep.method, sweep.key, sweep.reward) == ("vard", "train.kl_coef", "jpeg_compressibility")
    assert load_study(config).methods["vard"] and not set(sweep.seeds) & set(study.seeds)
    default = load_run_config(study.methods["vard"].config.format(reward=REWARDS[0]), algo="vard").train.kl_coef
    assert default in sweep.values


def _study_yaml(tmp_path: Path, methods: str, extra: str = "") -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(
        f"out_dir: {tmp_path / 'runs'}\nreport_dir: {tmp_path / 'report'}\nseeds: [0]\n"
        f"rewards: [jpeg_compressibility]\nmethods: {methods}\ninjection: null\n{extra}"
    )
    return path


def test_study_method_algo_errors(tmp_path):
    vard = "'envs_configs/digits_vard_{reward}.yaml'"
    with pytest.raises(ConfigError, match=r"front_pairs names unknown methods \['hrf'\]; methods: \['vard'\]"):
        load_study(_study_yaml(tmp_path, f"{{vard: {{config: {vard}, algo: vard}}}}", "front_pairs: [[vard, hrf]]\n"))
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
    assert "## Fronts" not in report  # evaluated before and after its one epoch only: no front

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


def test_a_sweep_is_validated_and_its_runs_get_the_value(tmp_path):
    vard = '{vard: {config: "envs_configs/digits_vard_{reward}.yaml", algo: vard}}'
    sweep = "sweep: {method: vard, key: train.kl_coef, values: [0.03, 1], reward: jpeg_compressibility, seeds: [7]}\n"
    study = load_study(_study_yaml(tmp_path, vard, sweep))
    runs = planned_runs(study, tmp_path)
    assert list(runs) == [
        ("vard", "jpeg_compressibility", 0),
        ("vard@kl_coef=0.03", "jpeg_compressibility", 7),
        ("vard@kl_coef=1", "jpeg_compressibility", 7),
    ]
    cmd = _train_command(study, "vard@kl_coef=0.03", "jpeg_compressibility", 7, tmp_path / "run")
    assert "train.kl_coef=0.03" in cmd and "seed=7" in cmd and cmd[cmd.index("--algo") + 1] == "vard"
    with pytest.raises(ConfigError, match=r"sweep\.method 'ddpo' / sweep\.reward .* must be one of the methods"):
        load_study(_study_yaml(tmp_path, vard, sweep.replace("method: vard", "method: ddpo")))
    with pytest.raises(ConfigError, match=r"(?s)sweep vard@kl_coeff=0.03: .*kl_coeff: Extra inputs"):
        load_study(_study_yaml(tmp_path, vard, sweep.replace("train.kl_coef", "train.kl_coeff")))


def test_kept_is_the_gain_in_se_over_seeds_and_the_share_of_base_is():
    def scored(method, seed, reward, inception):
        e = _evaluation(method, seed, reward)
        return {**e, "inception_score": {"mean": inception, "std": 0.1}, "class_agreement": 0.9}

    base = {**scored("base", None, -0.5, 10.0), "rewards": {"jpeg_compressibility": {"mean": -0.5, "se": 0.003}}}
    runs = [scored("vard", 0, -0.49, 8.0), scored("vard", 1, -0.47, 9.0)]
    k = Study([base, *runs]).kept("jpeg_compressibility", runs)
    # gain: mean(-0.49, -0.47) + 0.5 = 0.02; SE over the two seeds: std(ddof=1) / sqrt 2 = 0.01
    assert k["gain"] == pytest.approx(0.02) and k["gain_se"] == pytest.approx(0.01) and k["z"] == pytest.approx(2.0)
    assert k["is_kept"] == pytest.approx(0.85) and k["is_kept_se"] == pytest.approx(0.05)
    assert k["class_agreement"] == pytest.approx(0.9) and k["n"] == 2
    one = Study([base, runs[0]]).kept("jpeg_compressibility", runs[:1])  # one run: both sample SEs combined
    assert one["gain_se"] == pytest.approx(math.hypot(0.003, 0.01)) and math.isnan(one["is_kept_se"])


def test_study_with_a_sweep_end_to_end_on_a_tiny_budget(tmp_path, tiny_vard):
    """Sweep runs are trained and evaluated, stay out of the method tables and get their own table and plot."""
    overrides = "[" + ", ".join([*tiny_vard, "num_epochs=2", "save_every=2", "eval.metric_nets=auto"]) + "]"
    methods = '{vard: {config: "envs_configs/digits_vard_{reward}.yaml", algo: vard}}'
    extra = (
        f"overrides: {overrides}\nevaluation: {{num_samples: 10, num_steps: 4, batch_size: 10}}\n"
        "sweep: {method: vard, key: train.kl_coef, values: [0, 10], reward: jpeg_compressibility, seeds: [3]}\n"
    )
    assert main(["paper", "--config", str(_study_yaml(tmp_path, methods, extra))]) == 0
    evaluations = json.loads((tmp_path / "report" / "evaluations.json").read_text())
    sweeps = {e["method"]: e.get("sweep") for e in evaluations if "sweep" in e}
    assert sweeps == {
        "vard@kl_coef=0": {"method": "vard", "key": "train.kl_coef", "value": 0.0},
        "vard@kl_coef=10": {"method": "vard", "key": "train.kl_coef", "value": 10.0},
    }
    for e in evaluations:  # each sweep run trained with its value, on the sweep's seed
        if "sweep" in e:
            config = yaml.safe_load(Path(e["model"], "config.yaml").read_text())
            assert (config["train"]["kl_coef"], config["seed"]) == (e["sweep"]["value"], 3)
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| task | Base | vard |" in report and "vard@" not in report.split("## Sweep")[0]
    assert "## Sweep: vard's `train.kl_coef` on jpeg_compressibility" in report and "Seeds [3]" in report
    assert "| jpeg_compressibility | train.kl_coef = 0 |" in report
    assert "| jpeg_compressibility | train.kl_coef = 10 |" in report
    assert (tmp_path / "report" / "sweep.png").is_file()
    assert "## Reward gained and diversity kept" in report and "| jpeg_compressibility | vard |" in report
    assert "## Fronts: jpeg_compressibility" in report  # the method's run, evaluated at epochs 0, 1 and 2
    fronts = report.split("## Fronts: jpeg_compressibility")[1]
    for title in ("Inception Score (one split)", "class agreement", "embedding Vendi", "pixel Vendi"):
        assert f"\n{title}:\n" in fronts, f"eval.metric_nets logs {title} along training: the fronts draw it"


def test_the_defaults_study_measures_every_digits_training_config_as_shipped():
    study = load_study("envs_configs/paper_digits_defaults.yaml")
    measured = {spec.config.format(reward=r) for spec in study.methods.values() for r in study.rewards}
    shipped = {str(p) for p in Path("envs_configs").glob("digits_*.yaml") if "demo" not in p.name}
    assert measured == {p for p in shipped if "t2i" not in p}
    assert study.overrides == [] and not study.method_overrides, "the configs as a user runs them"
    paper = load_study("envs_configs/paper_digits.yaml")
    assert not set(study.seeds) & set(paper.seeds), "tuned on seeds no report uses"
    assert study.evaluation == paper.evaluation


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "window_kwargs":
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_the_conventions_study_changes_one_group_of_the_authors_values_at_a_time():
    study, paper = (
        load_study("envs_configs/paper_digits_conventions.yaml"),
        load_study("envs_configs/paper_digits.yaml"),
    )
    reward = study.rewards[0]
    assert set(study.seeds) <= set(paper.seeds) and reward in paper.rewards
    # every method is the project's HRF file, run as make paper runs it
    assert {spec.config for spec in study.methods.values()} == {paper.methods["hrf"].config}
    assert study.overrides == [*paper.overrides, *paper.method_overrides["hrf"]]
    assert [tuple(p) for p in study.front_pairs] == [(m, "hrf") for m in study.methods if m != "hrf"]
    hrf = _flat(yaml.safe_load(Path(paper.methods["hrf"].config.format(reward=reward)).read_text()))
    authors = _flat(yaml.safe_load(Path(paper.methods["hrf-authors"].config.format(reward=reward)).read_text()))
    authors_lr = next(o for o in paper.method_overrides["hrf-authors"] if o.startswith("train.learning_rate="))
    changed = set()
    for method, overrides in study.method_overrides.items():
        for override in overrides:
            key, value = override.split("=", 1)
            value = yaml.safe_load(value)
            if key == "train.learning_rate":  # the authors' study lr, as make paper runs them
                assert override == authors_lr
            elif key.startswith("env.window_kwargs."):
                assert authors["env.window_kwargs"][key.rsplit(".", 1)[1]] == value, (method, key)
            else:
                assert authors[key] == value != hrf[key], (method, key)
            assert key not in changed, f"{key} belongs to one group only"
            changed.add(key)
    # together the groups cover every value in which the two files differ (window_kwargs key by key above)
    differ = {k for k in hrf if hrf[k] != authors[k] and k != "env.window_kwargs"}
    assert differ <= changed | {"train.learning_rate"}
