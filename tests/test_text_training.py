"""The agents on the text env: PPO-IS with LoRA learns a prompt-dependent reward, resumes exactly, exports
diffusers LoRA; the SD configs validate and fail offline naming the weights; SB3 and the minimal example run.

All on ``random:sd-tiny`` (tiny random components built from configs; no network).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from agents.common.checkpoint import latest_checkpoint, load_checkpoint
from agents.common.policy import add_lora, load_lora_state_dict
from agents.ppo_is import train
from agents.ppo_is.config import load_config
from diffusion_gym import sampling
from diffusion_gym.families import load_family
from diffusion_gym.models import MissingWeightsError

TOY = Path(__file__).resolve().parents[1] / "envs_configs" / "sd-tiny_prompt_color.yaml"
SMALL = ["sample.num_steps=4", "sample.num_envs=4", "sample.num_batches_per_epoch=1", "eval.num_samples=4"]


def _lora(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(latest_checkpoint(run_dir) / "lora.safetensors")


def test_ppo_is_with_lora_raises_the_prompt_dependent_reward_on_fixed_noise(tmp_path):
    """The shipped toy config (16 epochs of 128 episodes on a tiny random SD, about 75 s on 2 CPU cores;
    measured +11.6 SE, and +15.0 / +7.4 SE with seeds 1 / 2).

    On the same fixed noise and prompts, the fine-tuned model's reward is higher, paired, by >= 3 SE.
    The reward is antisymmetric ("red": red − blue, "blue": blue − red) and the evaluation prompts
    alternate, so a change that ignores the prompt adds nothing to the mean: the gain is what the
    policy learnt per prompt.
    """
    from scripts.text_toy_check import check

    result = check(run_dir=tmp_path)
    gain = result["gain"]
    assert gain.mean / gain.std >= 3, f"paired gain {gain.mean:+.4f} ± {gain.std:.4f}: {result['prompts']}"


def test_resume_is_bit_exact_and_the_lora_folder_loads_in_diffusers(tmp_path):
    overrides = [*SMALL, "num_epochs=2", "eval.every=2"]
    straight = train(load_config(TOY, overrides), run_dir=tmp_path / "a", progress=False)
    # the update's first recomputation of the stored log-probs (guidance 5, LoRA) gives ratio 1
    assert all(e.first_ratio_max_dev < 1e-6 for e in straight.epochs)
    train(load_config(TOY, overrides), run_dir=tmp_path / "b", progress=False, stop_after=1)
    train(load_config(TOY, overrides), run_dir=tmp_path / "b", resume=tmp_path / "b", progress=False)
    a, b = _lora(tmp_path / "a"), _lora(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)  # trained, not the zero init

    checkpoint = latest_checkpoint(tmp_path / "a")
    assert (checkpoint / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert not (checkpoint / "unet").exists()  # a text model's LoRA run keeps the adapters only
    # ours: the base model with the checkpoint's adapters, a deterministic guided chain
    ours = load_family("random:sd-tiny")
    add_lora(ours.denoiser, 8)
    load_lora_state_dict(ours.denoiser, load_checkpoint(checkpoint).extra_weights["lora"])
    # diffusers: the same base model in a StableDiffusionPipeline, load_lora_weights(the lora folder)
    theirs = load_family("random:sd-tiny")
    pipe = theirs.pipeline()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_lora_weights(checkpoint / "lora")
    prompts = ["a bright photo of a cat", "a dark photo of a cat"]
    latents = torch.randn((2, *ours.sample_shape), generator=torch.Generator().manual_seed(0))
    images = pipe(prompts, latents=latents, num_inference_steps=4, guidance_scale=5.0, eta=0.0, output_type="pt")
    schedule = sampling.make_schedule(ours.scheduler, 4, eta=0.0)
    x = sampling.denoise_chain(ours.chain_denoiser(5.0), latents, schedule, ours.encode_conditions(prompts))
    assert (ours.decode(x) - images.images).abs().max() < 1e-4
    # and the adapters matter: without them the images differ
    base = load_family("random:sd-tiny")
    x_base = sampling.denoise_chain(base.chain_denoiser(5.0), latents, schedule, base.encode_conditions(prompts))
    assert (base.decode(x_base) - images.images).abs().max() > 1e-3


def test_sdxl_lora_adapters_load_in_the_sdxl_pipeline(tmp_path):
    from agents.common.policy import lora_adapter_config, lora_state_dict

    ours = load_family("random:sdxl-tiny")
    add_lora(ours.denoiser, 4)
    with torch.no_grad():
        for name, p in ours.denoiser.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    ours.save_lora_weights(tmp_path / "lora", lora_state_dict(ours.denoiser), lora_adapter_config(ours.denoiser))
    pipe = load_family("random:sdxl-tiny").pipeline()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_lora_weights(tmp_path / "lora")
    prompts = ["a red car", "a dog"]
    latents = torch.randn((2, *ours.sample_shape), generator=torch.Generator().manual_seed(0))
    expected = pipe(prompts, latents=latents, num_inference_steps=3, guidance_scale=5.0, output_type="latent").images
    schedule = sampling.make_schedule(ours.scheduler, 3, eta=0.0)
    x = sampling.denoise_chain(ours.chain_denoiser(5.0), latents, schedule, ours.encode_conditions(prompts))
    assert (x - expected).abs().max() < 1e-4
    base = load_family("random:sdxl-tiny")
    x_base = sampling.denoise_chain(base.chain_denoiser(5.0), latents, schedule, base.encode_conditions(prompts))
    assert (x_base - expected).abs().max() > 1e-3  # the adapters were loaded and matter


def test_save_merged_unet_writes_a_unet_folder_that_equals_the_adapted_one(tmp_path):
    from diffusers import UNet2DConditionModel

    overrides = [*SMALL, "num_epochs=1", "train.save_merged_unet=true"]
    train(load_config(TOY, overrides), run_dir=tmp_path, progress=False)
    checkpoint = latest_checkpoint(tmp_path)
    merged = UNet2DConditionModel.from_pretrained(checkpoint / "unet")
    adapted = load_family("random:sd-tiny").denoiser
    add_lora(adapted, 8)
    load_lora_state_dict(adapted, load_checkpoint(checkpoint).extra_weights["lora"])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    text = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = adapted(x, 500, encoder_hidden_states=text).sample
        got = merged(x, 500, encoder_hidden_states=text).sample
    assert (expected - got).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["sd15_aesthetic", "sd15_jpeg_compressibility", "sdxl_aesthetic"])
def test_sd_configs_fail_offline_naming_the_weights(tmp_path, name):
    config = load_config(Path(__file__).resolve().parents[1] / "envs_configs" / f"{name}.yaml", ["device=cpu"])
    assert config.sample.guidance_scale == 5.0 and config.train.lora_rank == 4 and config.sample.num_steps == 50
    with pytest.raises(MissingWeightsError, match=f"hf download {config.model}"):
        train(config, run_dir=tmp_path, progress=False)
    assert not any(tmp_path.iterdir())  # nothing written


TEXT_MODELS = ["random:sd-tiny", "random:sd3-tiny", "random:flux-tiny"]


@pytest.mark.parametrize("model", TEXT_MODELS)
def test_vard_and_drift_run_on_the_text_env(tmp_path, model):
    from agents.algorithms import load_run_config
    from agents.algorithms import train as train_any

    drift = [*SMALL, f"model={model}", "num_epochs=1", "drift.condition_noise=0.5", "drift.subset_fraction=0.75"]
    result = train(load_config(TOY, [*drift, "drift.diversity_coef=0.1"]), run_dir=tmp_path / "drift", progress=False)
    assert len(result.epochs) == 1 and math.isfinite(result.epochs[0].loss)
    vard = load_run_config(
        None,
        [
            "algo=vard",
            f"model={model}",
            "env.reward=prompt_brightness",
            "env.prompts=[a bright cat, a dark cat]",
            *SMALL,
            "num_epochs=1",
        ],
    )
    result = train_any(vard, run_dir=tmp_path / "vard", progress=False)
    assert len(result.epochs) == 1


@pytest.mark.parametrize("model", TEXT_MODELS)
def test_sb3_ppo_and_the_minimal_example_run_an_update_on_the_text_env(model):
    from stable_baselines3 import PPO

    from agents.sb3 import DiffusionActorCriticPolicy, DiffusionVecEnv

    venv = DiffusionVecEnv(
        num_envs=4,
        model=model,
        num_steps=3,
        prompts=["a bright cat", "a dark cat"],
        reward="prompt_brightness",
    )
    agent = PPO(
        DiffusionActorCriticPolicy, venv, n_steps=3, batch_size=6, n_epochs=1, policy_kwargs=venv.policy_kwargs()
    )
    before = {k: v.clone() for k, v in agent.policy.actor.unet.state_dict().items()}
    agent.learn(total_timesteps=12)
    after = agent.policy.actor.unet.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    images = agent.policy.generate_images(2, seed=0)
    assert images.shape == (2, 3, 16, 16) and images.min() >= 0 and images.max() <= 1

    from examples.reinforce_minimal import Args, main

    result = main(
        Args(
            model=model,
            guidance_scale=5.0,
            reward="jpeg_compressibility",
            num_steps=6,
            window_start=2,
            window_end=3,
            num_envs=4,
            samples_per_reference=2,
            batches_per_iteration=1,
            iterations=1,
            minibatches=1,
            eval_episodes=4,
        )
    )
    assert math.isfinite(result["final"])
