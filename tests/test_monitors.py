"""Hacking monitors: held-out rewards, diversity within a condition, the monitor and its early stop."""

import json

import pytest
import torch

from agents.algorithms import load_run_config, train
from agents.common.checkpoint import load_checkpoint
from agents.common.config import ConfigError, EvalConfig
from agents.common.monitors import BaseKL, EvaluationMonitors
from diffusion_gym import metrics, sampling


def _monitors(tmp_path=None, **fields):
    config = EvalConfig(
        held_out_rewards={"digit_confidence": {}},
        diversity=True,
        monitor_margins={"digit_confidence": 0.1, "vendi_pixels": 0.5},
        **fields,
    )
    return EvaluationMonitors(config, None if tmp_path is None else tmp_path / "eval.jsonl")


def _line(reward, confidence, vendi=2.0):
    return {"reward_mean": reward, "held_out/digit_confidence": confidence, "vendi_pixels": vendi}


def test_the_monitor_fires_only_when_a_watched_metric_falls_while_the_reward_rises():
    m = _monitors()
    assert m.check(0, _line(-0.48, 0.99)) == {
        "monitor/digit_confidence_drop": 0.0,
        "monitor/vendi_pixels_drop": 0.0,
        "monitor/fired": 0.0,
    }
    out = m.check(1, _line(-0.47, 0.95))  # reward up, confidence down by less than the margin
    assert out["monitor/digit_confidence_drop"] == pytest.approx(0.04) and m.fired == []
    m.check(2, _line(-0.49, 0.50))  # confidence collapsed but the reward fell too: not hacking
    assert m.fired == []
    out = m.check(3, _line(-0.46, 0.80, vendi=1.2))  # reward up, both watched metrics past their margins
    assert m.fired == ["digit_confidence", "vendi_pixels"] and out["monitor/fired"] == 1.0
    assert "digit_confidence fell more than 0.1 below the base model's" in m.describe(3)
    m.check(4, {"reward_mean": -0.40, "held_out/digit_confidence": None, "vendi_pixels": float("nan")})
    assert m.fired == [], "a metric not measured (null, NaN) never fires"


def test_a_resumed_run_compares_with_its_base_line(tmp_path):
    lines = [{"epoch": 0, **_line(-0.48, 0.99)}, {"epoch": 4, **_line(-0.47, 0.97)}]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    m = _monitors(tmp_path)
    m.check(8, _line(-0.46, 0.85))
    assert m.fired == ["digit_confidence"]


def test_measure_scores_held_out_rewards_and_diversity_within_each_condition():
    m = _monitors()
    torch.manual_seed(0)
    same = torch.rand(1, 1, 16, 16).repeat(4, 1, 1, 1)
    images = torch.cat([same, torch.rand(4, 1, 16, 16)])
    keys = [0, 0, 0, 0, 1, 1, 1, 1]
    out = m.measure(images, torch.tensor(keys), keys, reward_fn=None)
    assert set(out) == {"held_out/digit_confidence", "held_out/digit_confidence_se", "vendi_pixels"}
    assert 0 <= out["held_out/digit_confidence"] <= 1
    within = (1.0 + metrics.vendi_score(metrics.pixel_features(images[4:]))) / 2
    assert out["vendi_pixels"] == pytest.approx(within), "class 0 (one image 4 times) scores 1"


def test_metric_nets_log_the_evaluation_stages_sample_metrics_along_training():
    from diffusion_gym.digits import load_digit_classifier, load_digits_dataset

    images, labels = load_digits_dataset()
    images, labels = images[:200], labels[:200]
    m = EvaluationMonitors(EvalConfig(metric_nets="digits"))
    out = m.measure(images, labels, labels.tolist(), reward_fn=None)
    assert set(out) == {"inception_score", "vendi_pixel", "vendi_embedding", "class_agreement"}
    probs = metrics.classifier_outputs(load_digit_classifier(), images).probs
    assert out["inception_score"] == pytest.approx(metrics.inception_score(probs, splits=1).mean), "one split"
    assert out["class_agreement"] == pytest.approx(float((probs.argmax(1) == labels).float().mean()))
    assert out["class_agreement"] > 0.9, "the shipped classifier knows the real digits"
    assert m.measure(images, (labels + 1) % 10, labels.tolist(), None)["class_agreement"] < 0.1, "wrong classes"
    assert out["vendi_pixel"] == pytest.approx(metrics.pixel_vendi(images, 32))
    assert "class_agreement" not in m.measure(images, None, [0] * 200, None), "no class ids: no agreement"
    with pytest.raises(ConfigError, match=r"unknown metric networks 'clip'; valid choices: \['auto', 'digits'"):
        load_run_config(None, ["eval.metric_nets=clip"])
    load_run_config(None, ["eval.metric_nets=auto", "eval.monitor_margins={class_agreement: 0.1}"])


def test_monitor_margins_must_name_a_measured_metric():
    with pytest.raises(ConfigError, match=r"monitor_margins names \['vendi_pixels'\], which the evaluation does not"):
        load_run_config(None, ["eval.monitor_margins={vendi_pixels: 0.1}"])
    with pytest.raises(ConfigError, match="margins must be positive"):
        load_run_config(
            None, ["eval.held_out_rewards=[digit_confidence]", "eval.monitor_margins={digit_confidence: 0}"]
        )
    with pytest.raises(ConfigError, match=r"eval.held_out_rewards: unknown reward 'confidence'"):
        load_run_config(None, ["eval.held_out_rewards=[confidence]"])


@pytest.mark.usefixtures("one_thread")
def test_a_collapsing_jpeg_run_is_stopped_by_its_held_out_digit_confidence(tmp_path):
    """Trained on compressibility by the paper's DDPO config (lr 5e-4), the digits turn to blobs within a few
    epochs: the held-out classifier confidence falls while the reward rises, and the run stops with a checkpoint.

    (A 10-step chain with 16 episodes at lr 3e-3 was cheaper but not reward-directed: one Adam step per epoch
    moved every weight by about the learning rate, and on some CPUs and seeds the reward fell as the digits broke.)
    """
    config = load_run_config(
        "envs_configs/digits_ddpo_jpeg_compressibility.yaml",
        [
            "num_epochs=12",
            "train.learning_rate=5e-4",  # the paper study's pace; the config's gentler default keeps the digits
            "eval.every=1",
            "env.reward={jpeg_compressibility: 1.0, digit_confidence: 0.0}",
            "eval.num_samples=20",
            "eval.held_out_rewards=[digit_confidence]",
            "eval.diversity=true",
            "eval.kl_to_base=true",
            "eval.monitor_margins={digit_confidence: 0.05}",
            "eval.early_stop=true",
            "save_every=100",
        ],
    )
    result = train(config, run_dir=tmp_path / "run", progress=False)
    lines = [json.loads(text) for text in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    last = lines[-1]
    assert result.stopped_early and "digit_confidence fell more than 0.05" in result.stopped_early
    assert len(result.epochs) < 12 and last["monitor_fired"] == ["digit_confidence"]
    assert all(line["monitor_fired"] == [] for line in lines[:-1]), "it stops at the first firing"
    assert last["reward_mean"] > lines[0]["reward_mean"]
    assert last["held_out/digit_confidence"] < lines[0]["held_out/digit_confidence"] - 0.05
    assert load_checkpoint(tmp_path / "run").epoch == len(result.epochs), "a checkpoint at the stop"
    assert lines[0]["kl_to_base"] == 0.0 and last["kl_to_base"] > 0, "the base model is its own base"
    # the weighted reward's components are logged raw: the 0-weighted confidence equals the held-out one
    assert last["reward/digit_confidence"] == pytest.approx(last["held_out/digit_confidence"], abs=1e-6)


def test_base_kl_sums_each_samples_step_kl_without_changing_the_chain():
    from diffusers import DDIMScheduler

    schedule = sampling.make_schedule(DDIMScheduler(num_train_timesteps=1000), 5, eta=1.0)

    def base(x, t, c):
        return 0.5 * x

    def policy(x, t, c):
        return 0.5 * x + 0.1 * torch.arange(x.shape[-1], dtype=x.dtype)

    class Base:
        def denoiser(self):
            return base

    kl = BaseKL(Base())
    images = sampling.generate(
        kl.start(policy, schedule), schedule, 6, (1, 4, 4), seed=3, batch_size=4, on_step=kl.on_step
    )
    assert torch.equal(images, sampling.generate(policy, schedule, 6, (1, 4, 4), seed=3, batch_size=4))
    states = []

    def record(x, t, c):
        states.append(x)
        return policy(x, t, c)

    sampling.generate(record, schedule, 6, (1, 4, 4), seed=3, batch_size=4)
    expected = torch.zeros(6)
    for i, x in enumerate(states):  # 5 steps of the first 4 images, then 5 of the last 2
        k, rows = i % 5, slice(0, 4) if i < 5 else slice(4, 6)
        ours = sampling.denoise_step(policy(x, None, None), x, k, schedule, noise=torch.zeros_like(x))
        theirs = sampling.denoise_step(base(x, None, None), x, k, schedule, noise=torch.zeros_like(x))
        expected[rows] += sampling.kl_same_std(ours.mean, theirs.mean, torch.broadcast_to(ours.std, x.shape))
    assert torch.allclose(kl.result(), expected, rtol=1e-5) and bool((expected > 0).all())
    same = BaseKL(Base())
    sampling.generate(same.start(base, schedule), schedule, 6, (1, 4, 4), seed=3, on_step=same.on_step)
    assert torch.equal(same.result(), torch.zeros(6))
