"""Evaluation (paired samples, metrics), injection sampling, the report and the study driver."""

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from agents import evaluation
from agents.cli import main
from agents.evaluation import EvalSettings, _noise_digest, evaluate_model, injection_study, write_evaluation
from agents.paper import format_duration, load_study, progress_note
from agents.ppo_is.config import ConfigError
from agents.report import Study, aggregate, family, load_results, runtime_table, write_report
from diffusion_gym import metrics, sampling
from diffusion_gym.models import load_model
from diffusion_gym.rewards import jpeg_size_kb

SMALL = EvalSettings(num_samples=20, num_steps=4, batch_size=8)


@pytest.fixture(scope="module")
def evaluated():
    out = {}
    for spec in ("embedded:digits", "random:digits"):
        torch.manual_seed(0)
        out[spec] = evaluate_model(spec, SMALL, label=spec)
    return out


def test_every_model_starts_from_the_same_noise(evaluated):
    expected = _noise_digest(sampling.initial_noise(SMALL.num_samples, (1, 16, 16), SMALL.seed)[0])
    digests = {spec: result["initial_noise_digest"] for spec, (result, _) in evaluated.items()}
    assert set(digests.values()) == {expected}
    other = evaluate_model("embedded:digits", EvalSettings(num_samples=10, num_steps=2, seed=SMALL.seed + 1))[0]
    assert other["initial_noise_digest"] != expected


def test_evaluation_metrics_match_direct_computations(evaluated):
    result, arrays = evaluated["embedded:digits"]
    sizes = arrays["rewards_jpeg_incompressibility"]
    assert result["rewards"]["jpeg_incompressibility"]["mean"] == pytest.approx(float(np.mean(sizes)), rel=1e-6)
    se = float(np.std(sizes, ddof=1) / math.sqrt(len(sizes)))
    assert result["rewards"]["jpeg_incompressibility"]["se"] == pytest.approx(se, rel=1e-6)
    assert result["rewards"]["jpeg_compressibility"]["mean"] == pytest.approx(-float(np.mean(sizes)), rel=1e-6)
    assert arrays["embeddings"].shape[0] == SMALL.num_samples
    assert result["vendi_embedding"]["value"] == pytest.approx(
        metrics.vendi_score(torch.from_numpy(arrays["embeddings"]))
    )
    assert 1.0 <= result["inception_score"]["mean"] <= 10.0
    assert result["inception_score"]["network"] == "digit-classifier"
    # the trained model draws the digit it is asked for far more often than a random network
    assert result["class_agreement"] > 0.6 > evaluated["random:digits"][0]["class_agreement"]
    # images in the sidecar are the evaluated ones: their JPEG sizes are the recorded rewards
    images = torch.from_numpy(arrays["images_uint8"]).float() / 255
    assert torch.allclose(jpeg_size_kb(images), torch.from_numpy(sizes[: len(images)]).float(), atol=1e-3)


def test_write_evaluation_is_atomic_and_links_arrays(evaluated, tmp_path):
    result, arrays = evaluated["embedded:digits"]
    path = write_evaluation(result, arrays, tmp_path / "base.json")
    data = json.loads(path.read_text())
    assert data["arrays"] == "base.npz" and (tmp_path / "base.npz").is_file()
    assert not list(tmp_path.glob("*.tmp*"))


def test_injection_known_answers():
    tuned = load_model("embedded:digits")
    torch.manual_seed(0)
    other = load_model("random:digits")
    same = injection_study(tuned, tuned, [8, 2], num_samples=3, num_steps=10, seed=1)
    assert all(v == pytest.approx(0, abs=1e-9) for v in same["final_to_base"].values())
    assert all(max(c) == pytest.approx(0, abs=1e-9) for c in same["curves"].values())
    out = injection_study(tuned, other, [10, 5, 0], num_samples=3, num_steps=10, seed=1)
    # switching at step 10 (the noisiest) = the base model throughout; at 0 = the fine-tuned model throughout
    assert out["final_to_base"]["10"] == pytest.approx(0, abs=1e-9)
    assert out["final_to_finetuned"]["0"] == pytest.approx(0, abs=1e-9)
    assert out["final_to_finetuned"]["10"] == pytest.approx(out["finetuned_to_base"], rel=1e-9)
    # before the switch the chains coincide: the x̂0 distance is 0 for the first steps of a late switch
    assert out["curves"]["5"][:5] == pytest.approx([0.0] * 5, abs=1e-9) and out["curves"]["5"][5] > 0
    with pytest.raises(ValueError, match="injection steps"):
        injection_study(tuned, tuned, [11], num_steps=10)


def _fake(method, task, seed, reward, vendi, is_mean=5.0):
    return {
        "method": method,
        "task": task,
        "seed": seed,
        "label": f"{method}{seed}",
        "settings": {"seed": 1, "num_samples": 10, "num_steps": 4, "eta": 1.0, "pixel_size": 32},
        "rewards": {task or "r": {"mean": reward, "se": 0.01}},
        "inception_score": {"mean": is_mean, "std": 0.1, "network": "digit-classifier"},
        "vendi_pixel": vendi,
        "vendi_embedding": {"value": vendi + 1, "network": "digit-classifier"},
    }


def test_report_tables_aggregate_over_seeds_and_check_claims(tmp_path):
    files = [_fake("base", None, None, -0.50, 3.0)]
    files[0]["rewards"] = {"r": {"mean": -0.50, "se": 0.002}}
    files += [_fake("ddpo", "r", s, v, 2.0) for s, v in enumerate([-0.40, -0.42, -0.44])]
    files += [_fake("hrf-early", "r", s, -0.43, 2.8) for s in range(3)]
    files += [_fake("hrf-later", "r", s, -0.47, 2.9) for s in range(3)]
    files += [_fake("hrf-d", "r", s, -0.41, 2.95) for s in range(3)]
    for i, f in enumerate(files):
        (tmp_path / f"{i}.json").write_text(json.dumps(f))
    study = Study(load_results([tmp_path]))
    mean, se, n = aggregate(study.runs("r", method="ddpo"), "reward", "r")
    assert (mean, n) == (pytest.approx(-0.42), 3) and se == pytest.approx(0.02 / math.sqrt(3))
    table = study.table("reward", 4)
    assert table[0] == ["task", "Base", "DDPO", "HRF", "HRF-D"]
    assert table[1][1] == "-0.5000 ± 0.0020" and table[1][2].startswith("-0.4200 ± 0.0115 (n=3)")
    assert table[1][3].startswith("-0.4500")  # HRF = the early and later presets together (6 runs)
    claims = {row[1]: row[2] for row in study.claims()[1:]}
    assert claims["DDPO raises the reward over Base"] == "yes"
    assert claims["HRF reward on par with or above DDPO (within 2 SE)"] == "**no**"
    assert claims["HRF-D reward on par with or above DDPO (within 2 SE)"] == "yes"
    assert claims["HRF-D Vendi (pixels) closer to Base than DDPO's"] == "yes"
    timings = [{"stage": "train", "name": n, "seconds": 60} for n in "ab"] + [
        {"stage": "wall", "name": "train", "seconds": 90}
    ]
    text = write_report([tmp_path], tmp_path / "out", timings=timings).read_text()
    assert "## Table 1: reward" in text and "| train | 2 | 120 | 90 s (1.5 min) |" in text
    assert (tmp_path / "out" / "fig5_reward_vs_vendi.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="no evaluation JSON"):
        load_results([tmp_path / "out"])


def test_a_partial_re_run_says_its_wall_clock_covers_only_some_items():
    timings = [{"stage": "train", "name": n, "seconds": 60} for n in "abc"] + [
        {"stage": "wall", "name": "train", "seconds": 70, "items": 1},
        {"stage": "evaluate", "name": "a", "seconds": 5},
        {"stage": "wall", "name": "evaluate", "seconds": 6},  # written before the item count was kept
    ]
    rows = runtime_table(timings)
    assert rows[1] == ["train", "3", "180", "70 s (1.2 min); the last call, which redid 1 of the 3 items"]
    assert rows[2] == ["evaluate", "1", "5", "6 s (0.1 min)"]
    assert rows[3][3] == "76 s (1.3 min) (of the stages' last calls, some partial)"


def test_cli_evaluate_then_report(tmp_path, capsys):
    args = ["evaluate", "base=embedded:digits", "--n", "10", "--steps", "3", "--out", str(tmp_path / "e")]
    assert main([*args, "--method", "base"]) == 0
    assert "base: jpeg_compressibility" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "e"), "--out", str(tmp_path / "r")]) == 0
    report = (tmp_path / "r" / "report.md").read_text()
    assert "same initial noise (seed 2024, 10 samples, 3 DDIM steps" in report
    assert main(["evaluate", "embedded:digits", "--n", "5", "--out", str(tmp_path)]) == 2  # fewer than 10 IS splits
    assert "num_samples must be >= is_splits=10" in capsys.readouterr().err


def test_study_config_errors_name_the_key(tmp_path):
    good = Path("envs_configs/paper_digits.yaml")
    study = load_study(good)
    assert set(study.methods) == {"ddpo", "hrf", "hrf-authors", "hrf-d"} and study.seeds == [0, 1, 2, 3, 4]
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("hrf-authors: [", "hrf-author: ["))
    with pytest.raises(ConfigError, match="unknown methods \\['hrf-author'\\]"):
        load_study(bad)
    bad.write_text(good.read_text() + "\nepochs: 3\n")
    with pytest.raises(ConfigError, match="epochs"):
        load_study(bad)


def test_paper_study_end_to_end_on_a_tiny_budget(tmp_path):
    """One method, one reward, one seed, one tiny epoch: every stage runs and the report names the runtimes."""
    config = tmp_path / "study.yaml"
    config.write_text(
        f"""
out_dir: {tmp_path / "runs"}
report_dir: {tmp_path / "report"}
seeds: [0]
rewards: [jpeg_compressibility]
methods: {{ddpo: "envs_configs/digits_ddpo_{{reward}}.yaml"}}
overrides: [num_epochs=1, sample.num_envs=4, sample.num_batches_per_epoch=1, sample.num_steps=4,
            train.gradient_updates_per_epoch=1, eval.num_samples=4, eval.every=1, save_every=1]
evaluation: {{num_samples: 10, num_steps: 4, batch_size: 10}}
injection: {{method: ddpo, steps: [4, 2], num_samples: 2}}
"""
    )
    assert main(["paper", "--config", str(config)]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| train | 1 |" in report and "| evaluate | 2 |" in report and "Injection sampling" in report
    assert "![Samples: jpeg_compressibility](samples_jpeg_compressibility.png)" in report
    assert (tmp_path / "report" / "samples_jpeg_compressibility.png").is_file()
    evaluations = json.loads((tmp_path / "report" / "evaluations.json").read_text())
    assert [e["method"] for e in evaluations] == ["base", "ddpo"]
    assert len({e["initial_noise_digest"] for e in evaluations}) == 1
    # a second call finds everything done and only rewrites the report, with the injection results it wrote
    assert main(["paper", "--config", str(config), "--stages", "train,report"]) == 0
    assert "Injection sampling" in (tmp_path / "report" / "report.md").read_text()
    timings = json.loads((tmp_path / "runs" / "timings.json").read_text())
    assert [t["stage"] for t in timings].count("train") == 1


def test_few_samples_per_split_warn_that_the_inception_score_is_biased_low(monkeypatch):
    assert evaluation.warn_if_few_is_samples(500, 10, 10) is False  # 50 per split = 5 per class: enough
    with pytest.warns(RuntimeWarning, match=r"base: the Inception Score of 490 samples in 10 splits \(49 per split\)"):
        assert evaluation.warn_if_few_is_samples(490, 10, 10, label="base")
    with pytest.warns(RuntimeWarning, match="1008 classes need about 5040 per split"):
        evaluation.warn_if_few_is_samples(50_000, 10, 1008)

    def random_images(loaded, settings, n=None):  # the warning depends on n and the IS network only
        n = settings.num_samples
        return torch.rand((n, 1, 16, 16), generator=torch.Generator().manual_seed(0)), torch.arange(n) % 10, "digest"

    monkeypatch.setattr(evaluation, "sample_paired", random_images)
    with pytest.warns(RuntimeWarning, match=r"50 samples in 10 splits \(5 per split\) is biased low"):
        evaluate_model("embedded:digits", EvalSettings(num_samples=50), label="base")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result, _ = evaluate_model("embedded:digits", EvalSettings(num_samples=500), label="base")
    assert not [w for w in caught if "Inception Score" in str(w.message)]
    assert result["settings"]["num_samples"] == 500


def test_report_says_how_many_samples_every_table_is_from(tmp_path):
    files = [_fake("base", None, None, -0.5, 3.0), _fake("ddpo", "r", 0, -0.4, 2.0), _fake("ddpo", "r", 1, -0.4, 2.1)]
    files[0]["rewards"] = {"r": {"mean": -0.5, "se": 0.002}}
    for i, f in enumerate(files):
        f["settings"]["is_splits"] = 2
        (tmp_path / f"{i}.json").write_text(json.dumps(f))
    text = write_report([tmp_path], tmp_path / "out").read_text()
    # Tables 1-3 (Vendi twice): a line under each; every column is one method, so no window ablation
    assert text.count("Samples per model: 10.") == 3 and text.count("Samples per model: 10, in 2 IS splits of 5.") == 1
    assert "Window ablation" not in text
    preset = {**_fake("hrf-early", "r", 0, -0.4, 2.0), "settings": {**files[1]["settings"]}}
    (tmp_path / "3.json").write_text(json.dumps(preset))  # the HRF column now pools a preset: the ablation shows
    text = write_report([tmp_path], tmp_path / "out").read_text()
    assert text.count("Samples per model: 10.") == 5 and text.count("Samples per model: 10, in 2 IS splits of 5.") == 2
    (tmp_path / "3.json").unlink()
    files[2]["settings"]["num_samples"] = 500
    (tmp_path / "2.json").write_text(json.dumps(files[2]))
    text = write_report([tmp_path], tmp_path / "out").read_text()
    assert "Samples per model: 10 (baseNone, ddpo0); 500 (ddpo1) — **metrics from different numbers" in text


def test_progress_notes_give_an_eta():
    assert progress_note(1, 3, 40) == "1/3, elapsed 40 s, ETA 1 min 20 s"
    assert progress_note(3, 3, 4000) == "3/3, elapsed 1 h 06 min"
    assert format_duration(59.6) == "1 min 00 s" and format_duration(-1) == "0 s"


def test_cli_evaluate_prints_progress_and_eta_per_model(tmp_path, capsys):
    args = ["evaluate", "a=embedded:digits", "b=embedded:digits", "--n", "10", "--steps", "2", "--out", str(tmp_path)]
    with pytest.warns(RuntimeWarning, match="biased low"):  # 1 sample per split
        assert main([*args, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "[1/2, elapsed " in out and ", ETA " in out and "[2/2, elapsed " in out
    assert "b vs a: jpeg_compressibility " in out  # the same model from the same noise: no change
    assert "(+0.0000, +0.0 SE)" in out


def test_comparison_line_gives_the_change_in_standard_errors_and_the_guards_before_and_after():
    def result(label, mean, se, agreement, score):
        return {
            "label": label,
            "rewards": {"jpeg_compressibility": {"mean": mean, "se": se}},
            "class_agreement": agreement,
            "inception_score": {"mean": score},
            "vendi_pixel": 2.0,
            "vendi_embedding": {"value": 7.0},
        }

    base, tuned = result("base", -0.4830, 0.0003, 1.0, 9.95), result("demo", -0.4780, 0.0004, 0.95, 9.1)
    line = evaluation.comparison_line(base, tuned)
    # gain 0.005 over hypot(0.0003, 0.0004) = 0.0005: +10 SE
    assert line == (
        "demo vs base: jpeg_compressibility -0.4830 -> -0.4780 (+0.0050, +10.0 SE); "
        "class agreement 100.0% -> 95.0%; IS 9.95 -> 9.10"
    )
    summary = evaluation.summary_line(tuned)
    assert summary.startswith("jpeg_compressibility -0.4780 ± 0.0004; class agreement 95.0%; IS 9.10")


def test_image_row_puts_images_side_by_side_with_white_gaps():
    from agents.report import image_row

    images = np.stack([np.full((1, 2, 3), v, dtype=np.uint8) for v in (10, 20, 30)])
    row = image_row(images, gap=1)
    assert row.shape == (2, 3 * 3 + 2, 1)
    assert row[0, :, 0].tolist() == [10, 10, 10, 255, 20, 20, 20, 255, 30, 30, 30]


def test_only_the_window_presets_share_the_hrf_column():
    assert [family(m) for m in ("hrf", "hrf-early", "hrf-later", "hrf-baseline")] == ["hrf"] * 4
    # HRF-D, the authors' conventions and a one-option ablation named hrf-<option> keep their own columns
    assert [family(m) for m in ("hrf-d", "hrf-authors", "hrf-model-refs", "ddpo", "base")] == [
        "hrf-d",
        "hrf-authors",
        "hrf-model-refs",
        "ddpo",
        "base",
    ]
