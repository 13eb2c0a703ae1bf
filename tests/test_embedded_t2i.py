"""The shipped text-to-image digits model (``embedded:digits-t2i``): what it is, that the SD3 loader and
``StableDiffusion3Pipeline`` read it, and that it follows prompts as its committed evaluation says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from agents.algorithms import load_run_config, train
from agents.common.config import ConfigError
from agents.common.policy import DiffusionPolicy
from agents.prompt_following import evaluate_prompt_following
from diffusion_gym import sampling
from diffusion_gym.digit_prompts import HELDOUT_PROMPTS
from diffusion_gym.envs import DiffusionDenoiseVectorEnv
from diffusion_gym.families import FlowTextFamily, load_family
from diffusion_gym.families.loading import EMBEDDED_T2I_GUIDANCE
from diffusion_gym.models import EMBEDDED_T2I_DIR

RESULTS = json.loads((Path(__file__).resolve().parents[1] / "docs" / "results" / "embedded_t2i.json").read_text())

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def family() -> FlowTextFamily:
    return load_family("embedded:digits-t2i")


def test_it_is_a_small_sd3_pipeline_folder(family):
    assert isinstance(family, FlowTextFamily) and family.t5 is None and family.max_sequence_length == 0
    assert family.sample_shape == (4, 8, 8) and family.image_shape == (3, 16, 16)
    assert family.default_guidance_scale == EMBEDDED_T2I_GUIDANCE
    size = sum(f.stat().st_size for f in EMBEDDED_T2I_DIR.rglob("*") if f.is_file())
    assert size < 15e6, f"{size / 1e6:.1f} MB"


def test_the_env_and_policy_reproduce_stable_diffusion_3_pipeline_on_it(family):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(EMBEDDED_T2I_DIR, text_encoder_3=None, tokenizer_3=None)
    prompts = ["a bold 3", "the number seven"]
    envs = DiffusionDenoiseVectorEnv(2, check_actions=False, model=family, num_steps=6, eta=0.0, prompts=prompts)
    policy = DiffusionPolicy(family, envs.core.schedule, conditions=envs.core.conditions)
    obs, info = envs.reset(seed=0)
    first = obs
    while True:
        obs, _, terminated, _, info = envs.step(policy.act(obs["x_t"], info["step_index"], obs["c"]).x_prev)
        if terminated.all():
            break
    asked = [envs.prompts[i] for i in first["c"].tolist()]
    expected = pipe(
        asked, latents=first["x_t"], num_inference_steps=6, guidance_scale=EMBEDDED_T2I_GUIDANCE,
        output_type="latent", max_sequence_length=0, height=16, width=16,
    ).images  # fmt: skip
    assert (info["final_obs"]["x_t"] - expected).abs().max() < 1e-5


def test_it_follows_prompts_as_its_committed_evaluation_says(family):
    """The held-out accuracy at the default guidance, recomputed on a quarter of the committed samples."""
    row = RESULTS["results"][f"heldout_g{EMBEDDED_T2I_GUIDANCE}"]
    assert 0.55 <= row["accuracy"] <= 0.80 and row["digit_only"] >= 0.95
    for g in (1.5, 5.0):
        assert 0.55 <= RESULTS["results"][f"heldout_g{g}"]["accuracy"] <= 0.80
    sde = RESULTS["results"][f"heldout_g{EMBEDDED_T2I_GUIDANCE}_sde0.7"]["accuracy"]
    assert abs(sde - row["accuracy"]) <= 0.05  # the SDE policy RL trains follows prompts as the ODE does
    again = evaluate_prompt_following(family, HELDOUT_PROMPTS, 2, num_steps=RESULTS["steps"])
    assert abs(again["accuracy"] - row["accuracy"]) < 0.1


def test_the_first_ratio_of_an_update_is_one_on_it(family):
    envs = DiffusionDenoiseVectorEnv(4, model=family, num_steps=5, eta=0.7, prompts="digits")
    schedule = sampling.make_schedule(family.scheduler, 5, eta=0.7)
    policy = DiffusionPolicy(family, schedule, conditions=envs.core.conditions)
    obs, info = envs.reset(seed=0)
    step = policy.act(obs["x_t"], info["step_index"], obs["c"], generator=torch.Generator().manual_seed(0))
    again = policy.evaluate(obs["x_t"], info["step_index"], obs["c"], step.x_prev)
    assert (torch.exp(again.log_prob - step.log_prob) - 1).abs().max() < 1e-5


T2I_CONFIG = Path(__file__).resolve().parents[1] / "envs_configs" / "digits-t2i_grpo_prompt_match.yaml"
TINY_RUN = [
    "sample.num_steps=2",
    "sample.sde_window=null",  # the config's 3-step sliding window needs 3 steps or more
    "sample.sde_window_kwargs={}",
    "sample.num_envs=8",
    "sample.samples_per_condition=4",
    "eval.num_samples=24",
    "eval.num_steps=2",
    "num_epochs=1",
    "eval.every=1",
]


def test_a_run_evaluates_on_its_held_out_prompts_and_logs_prompt_following(tmp_path):
    """``eval.prompts`` replaces the env's prompts in the fixed-noise evaluation; ``eval.jsonl`` gets the metrics.

    The 24 evaluation samples cycle over 3 held-out prompts (8 images each), one without a weight.
    """
    assert load_run_config(T2I_CONFIG).eval.prompts == "digits-heldout"
    heldout = ["a handwritten 3", "the bold number two", "seven in thin strokes"]
    over = [f"eval.prompts={json.dumps(heldout)}", "env.reward=prompt_match", f"logdir={tmp_path}", "run_name=t2i"]
    config = load_run_config(T2I_CONFIG, [*TINY_RUN, *over])
    assert config.env.prompts == "digits"
    train(config, progress=False)
    lines = [json.loads(line) for line in (tmp_path / "t2i" / "eval.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1] and lines[1]["episodes"] == 8
    assert lines[0]["train_seconds"] == 0 and lines[1]["train_seconds"] > 0
    for key in ("accuracy", "digit_only", "weighted", "weight_accuracy", "abs_margin_mean", "vendi_embedding"):
        assert 0 <= lines[0][key] < float("inf"), key
    assert lines[0]["accuracy"] == pytest.approx(lines[0]["reward_mean"])  # prompt_match's mean is the accuracy


def test_evaluation_prompts_are_refused_for_a_model_without_prompts(tmp_path):
    config = load_run_config(
        Path(__file__).resolve().parents[1] / "envs_configs" / "digits_ddpo_jpeg_compressibility.yaml",
        ["eval.prompts=digits-heldout", f"logdir={tmp_path}"],
    )
    with pytest.raises(ConfigError, match="eval.prompts is for text-to-image models; 'embedded:digits' takes no"):
        train(config, progress=False)
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_grpo_raises_held_out_prompt_accuracy_in_seconds(tmp_path):
    """A CI-sized GRPO run on thin prompts: the accuracy on their held-out phrasings rises by >= 3 standard errors.

    Thin prompts only (the base model draws them right about half the time), so that the lesson
    (less ink when "thin" is asked) is learnt in seconds; the whole task, bold and thin, is the
    config's 15-minute run. Accuracy: ``prompt_match`` on fixed
    evaluation noise, before and after training.
    """
    thin = [f"a thin {d}" for d in (2, 3, 5, 7)]
    heldout = ["the thin number two", "a thin digit 3", "five in thin strokes", "the thin number seven"]
    config = load_run_config(
        T2I_CONFIG,
        [
            "sample.num_steps=6",
            "sample.sde_window=null",  # every step an SDE step at the config's first lr: learnt in 10 epochs
            "sample.sde_window_kwargs={}",
            "train.learning_rate=1.0e-2",
            "sample.num_envs=32",
            "sample.samples_per_condition=8",
            "eval.num_samples=96",
            "eval.num_steps=10",
            "num_epochs=10",
            "eval.every=10",
            "save_every=10",
            f"env.prompts={json.dumps(thin)}",
            f"eval.prompts={json.dumps(heldout)}",
            f"logdir={tmp_path}",
            "run_name=ci",
        ],
    )
    train(config, progress=False)
    before, after = (json.loads(line) for line in (tmp_path / "ci" / "eval.jsonl").read_text().splitlines())
    n = config.eval.num_samples
    se = ((before["accuracy"] * (1 - before["accuracy"]) + after["accuracy"] * (1 - after["accuracy"])) / n) ** 0.5
    assert after["accuracy"] - before["accuracy"] >= 3 * se, (before["accuracy"], after["accuracy"], se)
    assert after["digit_only"] is None  # no digit-only prompt here
    assert after["abs_margin_mean"] <= 2 * RESULTS["data"]["ink_margin_p90"]  # the ink guard held
