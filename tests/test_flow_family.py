"""Stable Diffusion 3 and FLUX as flow-matching families in the env and the policy: exact against
``StableDiffusion3Pipeline`` / ``FluxPipeline`` at noise level 0, Flow-GRPO's SDE policy above it.
Tiny random components, offline."""

from __future__ import annotations

import warnings

import gymnasium as gym
import pytest
import torch
from _checks import check_envs_are_clean

import diffusion_gym  # noqa: F401  (registers DiffusionDenoise-v0)
from agents.common.policy import DiffusionPolicy
from diffusion_gym import sampling
from diffusion_gym.envs import DiffusionDenoiseVectorEnv
from diffusion_gym.families import FluxFamily, ModelFamily, load_family
from diffusion_gym.families.flux import pack_latents, unpack_latents
from diffusion_gym.models import MissingWeightsError
from diffusion_gym.wrappers import PromptIdObservation

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a photo of a cat", "a red car", "a dog"]
STEPS = 5


FLOW_MODELS = ["random:sd3-tiny", "random:flux-tiny"]


@pytest.fixture(scope="module", params=FLOW_MODELS)
def family(request) -> ModelFamily:
    return load_family(request.param)


def _run_pipeline(family, prompts, latents, guidance, output_type="latent", pipe=None):
    """The family's diffusers pipeline from the env's ``(B, C, h, w)`` latents (FLUX's packed in and out)."""
    flux = isinstance(family, FluxFamily)
    pipe = pipe if pipe is not None else family.pipeline()
    height, width = family.resolution
    out = pipe(
        prompts,
        latents=pack_latents(latents) if flux else latents,
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        output_type=output_type,
        max_sequence_length=family.max_sequence_length,
        height=height,
        width=width,
    ).images
    return unpack_latents(out, *latents.shape[-2:]) if flux and output_type == "latent" else out


@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_env_and_policy_at_noise_level_zero_reproduce_the_pipeline(family, guidance):
    envs = DiffusionDenoiseVectorEnv(
        3, check_actions=False, model=family, num_steps=STEPS, eta=0.0, prompts=PROMPTS, guidance_scale=guidance
    )
    policy = DiffusionPolicy(family, envs.core.schedule, conditions=envs.core.conditions, guidance_scale=guidance)
    assert isinstance(policy.schedule, sampling.FlowSchedule)
    obs, info = envs.reset(seed=0)
    first = obs
    while True:
        step = policy.act(obs["x_t"], info["step_index"], obs["c"])
        obs, _, terminated, _, info = envs.step(step.x_prev)
        if terminated.all():
            break
    prompts = [envs.prompts[i] for i in first["c"].tolist()]
    expected = _run_pipeline(family, prompts, first["x_t"], guidance)
    assert (info["final_obs"]["x_t"] - expected).abs().max() < 1e-5
    assert expected.abs().max() > 0.1
    images = _run_pipeline(family, prompts, first["x_t"], guidance, output_type="pt")
    assert (family.decode(info["final_obs"]["x_t"]) - images).abs().max() < 1e-5


def test_the_sde_policy_log_prob_is_a_normal_and_the_first_ratio_is_one(family):
    envs = DiffusionDenoiseVectorEnv(3, model=family, num_steps=STEPS, eta=0.7, prompts=PROMPTS, guidance_scale=4.5)
    policy = DiffusionPolicy(family, envs.core.schedule, conditions=envs.core.conditions, guidance_scale=4.5)
    obs, info = envs.reset(seed=1)
    generator = torch.Generator().manual_seed(2)
    for _ in range(STEPS):
        step = policy.act(obs["x_t"], info["step_index"], obs["c"], generator=generator)
        normal = torch.distributions.Normal(step.mean.double(), step.std.double())
        expected = normal.log_prob(step.x_prev.double()).mean(dim=(1, 2, 3))
        assert (expected - step.log_prob.double()).abs().max() < 1e-5
        again = policy.evaluate(obs["x_t"], info["step_index"], obs["c"], step.x_prev)
        assert (again.log_prob - step.log_prob).abs().max() < 1e-6
        obs, _, terminated, _, info = envs.step(step.x_prev)
    assert terminated.all()


@pytest.mark.parametrize("window", ["full", [(1, 3)]], ids=str)
def test_check_env_is_clean_on_the_flow_env(family, window):
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    kwargs = dict(model=family, num_steps=6, eta=0.7, prompts=PROMPTS, window=window, references=images)
    env = gym.make("DiffusionDenoise-v0", **kwargs).unwrapped
    sb3_env = PromptIdObservation(gym.make("DiffusionDenoise-v0", **kwargs).unwrapped)
    check_envs_are_clean(env, sb3_env, render=False)
    obs, info = env.reset(seed=0)
    assert env.observation_space["t"].n == 1001 and obs["t"] <= 1000  # t = σ·1000, rounded; σ = 1 first


def test_a_pipeline_folder_loads_and_a_missing_component_is_named(family, tmp_path):
    folder = tmp_path / "pipeline"
    family.pipeline().save_pretrained(folder)
    loaded = load_family(folder)
    assert type(loaded) is type(family)
    assert isinstance(loaded, FluxFamily) or loaded.t5 is None  # SD3's T5 is optional
    loaded.max_sequence_length = family.max_sequence_length  # a pipeline argument, not saved in the folder
    cond_a, cond_b = family.encode_conditions(PROMPTS[:2]), loaded.encode_conditions(PROMPTS[:2])
    assert torch.equal(cond_a.embeds, cond_b.embeds) and torch.equal(cond_a.pooled, cond_b.pooled)
    for weights in (folder / "transformer").glob("diffusion_pytorch_model*"):
        weights.unlink()
    with pytest.raises(MissingWeightsError, match="transformer/diffusion_pytorch_model"):
        load_family(folder)


@pytest.mark.parametrize("model", FLOW_MODELS)
def test_ppo_is_with_lora_trains_a_flow_model_and_its_lora_folder_loads_in_diffusers(model, tmp_path):
    from agents.common.checkpoint import latest_checkpoint, load_checkpoint
    from agents.common.policy import add_lora, load_lora_state_dict
    from agents.ppo_is import train
    from agents.ppo_is.config import load_config

    overrides = [
        f"model={model}",
        "sample.eta=0.7",  # the SDE's noise level a
        "sample.num_steps=4",
        "sample.num_envs=8",
        "num_epochs=2",
        "eval.num_samples=4",
    ]
    result = train(load_config("envs_configs/sd-tiny_prompt_color.yaml", overrides), run_dir=tmp_path, progress=False)
    assert all(e.first_ratio_max_dev < 1e-6 and e.num_pairs == 8 * 4 for e in result.epochs)
    checkpoint = latest_checkpoint(tmp_path)
    ours = load_family(model)
    add_lora(ours.denoiser, 8)
    load_lora_state_dict(ours.denoiser, load_checkpoint(checkpoint).extra_weights["lora"])
    theirs = load_family(model)
    pipe = theirs.pipeline()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_lora_weights(checkpoint / "lora")
    latents = torch.randn((2, *ours.sample_shape), generator=torch.Generator().manual_seed(0))
    expected = _run_pipeline(ours, ["red", "blue"], latents, 5.0, pipe=pipe)
    schedule = sampling.make_schedule(ours.scheduler, STEPS, eta=0.0)
    x = sampling.denoise_chain(ours.chain_denoiser(5.0), latents, schedule, ours.encode_conditions(["red", "blue"]))
    assert (x - expected).abs().max() < 1e-4


def test_an_sde_window_stores_and_trains_only_its_steps_while_episodes_run_the_whole_chain(tmp_path):
    """Flow-GRPO-Fast: with sde_window (2, 4) of a 6-step chain, each episode contributes 2 pairs."""
    from agents.ppo_is import train
    from agents.ppo_is.config import load_config

    overrides = [
        "model=random:sd3-tiny",
        "sample.eta=0.7",
        "sample.num_steps=6",
        "sample.sde_window=[2, 4]",
        "sample.num_envs=4",
        "num_epochs=1",
        "eval.num_samples=2",
    ]
    config = load_config("envs_configs/sd-tiny_prompt_color.yaml", overrides)
    result = train(config, run_dir=tmp_path, progress=False)
    epoch = result.epochs[0]
    assert epoch.num_pairs == 4 * 2 and epoch.first_ratio_max_dev < 1e-6
    envs = DiffusionDenoiseVectorEnv(2, model="random:sd3-tiny", num_steps=6, eta=0.7, sde_window=(2, 4))
    obs, info = envs.reset(seed=0)
    assert (~envs.core.schedule.deterministic).nonzero().flatten().tolist() == [2, 3]
    steps = 0
    while True:
        obs, _, terminated, _, info = envs.step(torch.zeros(2, 4, 8, 8))
        steps += 1
        if terminated.all():
            break
    assert steps == 6  # the whole chain runs; only its SDE steps are actions a trainer stores
    with pytest.raises(ValueError, match="sde_window applies to flow-matching"):
        DiffusionDenoiseVectorEnv(2, model="random:digits", num_steps=6, sde_window=(2, 4))
    with pytest.raises(ValueError, match=r"0 <= a < b <= 6"):
        DiffusionDenoiseVectorEnv(2, model="random:sd3-tiny", num_steps=6, sde_window=(4, 9))
