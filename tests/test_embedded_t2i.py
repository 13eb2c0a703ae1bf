"""The shipped text-to-image digits model (``embedded:digits-t2i``): what it is, that the SD3 loader and
``StableDiffusion3Pipeline`` read it, and that it follows prompts as its committed evaluation says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

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
