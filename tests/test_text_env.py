"""Text-to-image latent diffusion in ``DiffusionDenoise-v0`` and the policy: exact against diffusers, offline.

Tiny random Stable Diffusion / SDXL components (``random:sd-tiny``, ``random:sdxl-tiny``) built from
configs, with a tokenizer whose vocabulary the code writes: no test touches the network.
"""

from __future__ import annotations

import json

import gymnasium as gym
import numpy as np
import pytest
import torch
from _checks import check_envs_are_clean

import diffusion_gym  # noqa: F401  (registers DiffusionDenoise-v0)
from agents.common.policy import DiffusionPolicy
from diffusion_gym import sampling
from diffusion_gym.conditions import PromptConditions
from diffusion_gym.envs import DiffusionDenoiseEnv, DiffusionDenoiseVectorEnv
from diffusion_gym.families import load_family
from diffusion_gym.prompts import ANIMALS, PromptBook, PromptFunction, PromptList, make_prompts
from diffusion_gym.references import CaptionedFolderReferences
from diffusion_gym.wrappers import PromptIdObservation

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a photo of a cat", "a red car in the snow", "a dog"]
STEPS = 5
TOL = 1e-5


def _family(spec: str, prediction_type: str = "epsilon"):
    return load_family(spec, scheduler_overrides={"prediction_type": prediction_type})


def _rollout(envs, policy, noise_seed=0):
    """Drive the vector env with the policy for one whole batch; return the first obs, steps and final latents."""
    obs, info = envs.reset(seed=0)
    first = obs
    generator = torch.Generator().manual_seed(noise_seed)
    steps = []
    while True:
        k = info["step_index"]
        step = policy.act(obs["x_t"], k, obs["c"], generator=generator)
        steps.append((obs, k, step))
        obs, reward, terminated, _, info = envs.step(step.x_prev)
        if terminated.all():
            return first, steps, info["final_obs"]["x_t"], reward


# --- exactness -----------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["random:sd-tiny", "random:sdxl-tiny"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_env_and_policy_at_eta0_reproduce_the_diffusers_pipeline(spec, prediction_type, guidance):
    family = _family(spec, prediction_type)
    envs = DiffusionDenoiseVectorEnv(  # a random eps-model's chain leaves the action bounds: no checks
        3,
        check_actions=False,
        model=family,
        num_steps=STEPS,
        eta=0.0,
        prompts=PROMPTS,
        guidance_scale=guidance,
        reward="jpeg_compressibility",
    )
    policy = DiffusionPolicy(family, envs.core.schedule, conditions=envs.core.conditions, guidance_scale=guidance)
    first, _, final, _ = _rollout(envs, policy)
    prompts = [envs.prompts[i] for i in first["c"].tolist()]
    expected = family.pipeline()(
        prompts,
        latents=first["x_t"],
        num_inference_steps=STEPS,
        guidance_scale=guidance,
        eta=0.0,
        output_type="latent",
    ).images
    assert (final - expected).abs().max() < TOL
    assert expected.abs().max() > 0.1


def test_eta1_steps_equal_ddim_step_and_a_normal_log_prob_and_the_first_ratio_is_one():
    family = _family("random:sd-tiny")
    guidance = 5.0
    envs = DiffusionDenoiseVectorEnv(
        3, check_actions=False, model=family, num_steps=STEPS, eta=1.0, prompts=PROMPTS, guidance_scale=guidance
    )
    policy = DiffusionPolicy(family, envs.core.schedule, conditions=envs.core.conditions, guidance_scale=guidance)
    pipe = family.pipeline()
    scheduler = pipe.scheduler
    scheduler.set_timesteps(STEPS)
    _, steps, _, _ = _rollout(envs, policy, noise_seed=3)
    for obs, k, step in steps:
        x, c = obs["x_t"], obs["c"]
        prompts = [envs.prompts[i] for i in c.tolist()]
        embeds, negative = pipe.encode_prompt(prompts, "cpu", 1, True)
        t = int(scheduler.timesteps[int(k[0])])
        out = family.denoiser(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([negative, embeds])).sample
        uncond, text = out.chunk(2)
        guided = uncond + guidance * (text - uncond)
        k0 = int(k[0])
        if k0 < STEPS - 1:  # stochastic: the same noise reproduces the scheduler's sample
            z = (step.x_prev - step.mean) / step.std
            prev = scheduler.step(guided, t, x, eta=1.0, variance_noise=z).prev_sample
            assert (prev - step.x_prev).abs().max() < TOL
            normal = torch.distributions.Normal(step.mean.double(), step.std.double())
            expected = normal.log_prob(step.x_prev.double()).mean(dim=(1, 2, 3))
            assert (expected - step.log_prob.double()).abs().max() < TOL
        # the update's recomputation (gradients on) gives ratio 1 for the data it collected
        again = policy.evaluate(x, k, c, step.x_prev)
        assert (again.log_prob - step.log_prob).abs().max() < 1e-6


# --- the MDP -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("window", "start_mode"),
    [
        ("full", "shared"),
        ("hrf", "shared"),
        ("hrf-early", "shared"),
        ("hrf-later", "shared"),
        ("hrf-d", "shared"),
        ([(2, 3), (5, 7)], "shared"),
        ("full", "per_sample"),
        ("hrf-d", "per_sample"),
    ],
    ids=str,
)
def test_gymnasium_and_sb3_check_env_are_clean_on_the_text_env(window, start_mode):
    steps = 40 if window in ("hrf", "hrf-early", "hrf-later") else 10  # the paper's presets: a 40-step chain
    # references: images (VAE-encoded at start; "model" samples are tested below), HRF-D probing every 3rd step
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    kwargs = dict(model="random:sd-tiny", window=window, num_steps=steps, prompts=PROMPTS, probe_size=2)
    kwargs.update(references=images, window_kwargs={"stride": 3} if window == "hrf-d" else {})
    env = gym.make("DiffusionDenoise-v0", render_mode="rgb_array", start_mode=start_mode, **kwargs).unwrapped
    check_envs_are_clean(env, PromptIdObservation(DiffusionDenoiseEnv(start_mode=start_mode, **kwargs)))
    obs, info = env.reset(seed=1)
    assert obs["c"] in PROMPTS and obs["x_t"].shape == (4, 8, 8)
    assert env.render().shape == (16, 16, 3)  # the decoded image, not the latent
    vector = DiffusionDenoiseVectorEnv(4, start_mode=start_mode, **kwargs)
    obs, info = vector.reset(seed=1)
    assert obs["c"].dtype == torch.int64 and set(obs["c"].tolist()) <= {0, 1, 2}
    assert vector.single_observation_space["c"].n == len(PROMPTS)


def test_the_reward_gets_the_decoded_images_and_the_prompts():
    seen = {}

    def reward(images, conditions):
        seen["images"], seen["prompts"] = images, conditions
        return images.mean(dim=(1, 2, 3))

    family = _family("random:sd-tiny")
    envs = DiffusionDenoiseVectorEnv(3, model=family, num_steps=2, prompts=PROMPTS, reward=reward)
    obs, _ = envs.reset(seed=0)
    prompts = [PROMPTS[i] for i in obs["c"].tolist()]
    for _ in range(2):
        obs, rewards, terminated, _, info = envs.step(torch.zeros(3, *envs.core.sample_shape))
    assert terminated.all()
    assert seen["prompts"] == prompts
    assert seen["images"].shape == (3, *family.image_shape)
    assert torch.allclose(seen["images"], family.decode(info["final_obs"]["x_t"]))
    assert torch.allclose(rewards, seen["images"].mean(dim=(1, 2, 3)))


def test_reset_takes_a_prompt_and_refuses_unknown_ones():
    env = DiffusionDenoiseEnv(model="random:sd-tiny", num_steps=3, prompts=PROMPTS)
    obs, _ = env.reset(seed=0, options={"condition": "a dog"})
    assert obs["c"] == "a dog"
    obs, _ = env.reset(options={"condition": 1})
    assert obs["c"] == PROMPTS[1]
    with pytest.raises(ValueError, match="not in the env's prompt list"):
        env.reset(options={"condition": "a horse"})
    with pytest.raises(ValueError, match=r"prompt id in \[0, 2\]"):
        env.reset(options={"condition": 7})


def test_negative_prompt_and_guidance_change_the_env_denoiser():
    family = _family("random:sd-tiny")
    x = torch.randn(1, *family.sample_shape, generator=torch.Generator().manual_seed(0))
    outs = []
    for negative, guidance in ((None, 5.0), ("blurry", 5.0), (None, 1.0)):
        env = DiffusionDenoiseEnv(
            model=family, num_steps=3, prompts=PROMPTS, negative_prompt=negative, guidance_scale=guidance
        )
        cond = env.core.conditions.denoiser_input(torch.tensor([0]))
        outs.append(env.core.denoiser(x, torch.tensor([500]), cond))
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[0], outs[2])
    with pytest.raises(ValueError, match="guidance_scale"):
        DiffusionDenoiseEnv(model=family, num_steps=3, guidance_scale=-1.0)
    with pytest.raises(ValueError, match="text-to-image model"):
        DiffusionDenoiseEnv(model="random:digits", num_steps=3, prompts=PROMPTS)


def test_prompt_embeddings_are_encoded_once_and_looked_up_by_id():
    family = _family("random:sd-tiny")
    calls = []
    encode = family.encode_conditions

    def counting(prompts, negative=None):
        calls.append(list(prompts))
        return encode(prompts, negative)

    family.encode_conditions = counting
    conditions = PromptConditions(family, PROMPTS)
    a = conditions.encode(torch.tensor([2, 0]))
    b = conditions.encode(torch.tensor([0, 1, 2, 2]))
    assert calls == [PROMPTS]  # the list's prompts, once
    expected = encode(["a dog", "a photo of a cat"])
    assert torch.equal(a.embeds, expected.embeds) and torch.equal(a.negative_embeds, expected.negative_embeds)
    assert torch.equal(b.embeds[2], b.embeds[3])


# --- prompt sources ----------------------------------------------------------------------------


def test_prompt_sources(tmp_path):
    rng = np.random.default_rng(0)
    animals = make_prompts("animals")
    assert isinstance(animals, PromptList) and animals.prompts == ANIMALS and len(ANIMALS) == 50
    assert set(animals.sample(100, rng)) <= set(ANIMALS)
    path = tmp_path / "prompts.txt"
    path.write_text("# my prompts\na cat\n\n  a dog  \n")
    assert make_prompts(path).prompts == ("a cat", "a dog")
    assert make_prompts(["x", "y"]).prompts == ("x", "y")
    words = ["red", "blue"]
    source = make_prompts(lambda rng: f"a {words[rng.integers(2)]} car")
    assert isinstance(source, PromptFunction) and source.prompts is None
    assert set(source.sample(20, np.random.default_rng(1))) == {"a red car", "a blue car"}
    assert source.sample(5, np.random.default_rng(2)) == source.sample(5, np.random.default_rng(2))
    with pytest.raises(ValueError, match="unknown prompts 'cats'"):
        make_prompts("cats")
    with pytest.raises(ValueError, match="appears twice"):
        make_prompts(["a", "a"])
    with pytest.raises(ValueError, match="empty"):
        make_prompts([])
    with pytest.raises(ValueError, match="must be a string"):
        make_prompts(["a", 3])


def test_an_open_ended_prompt_source_registers_prompts_and_its_book_survives_a_checkpoint():
    def prompt(rng):
        return f"a photo of a {['cat', 'dog', 'car'][rng.integers(3)]}"

    kwargs = dict(model="random:sd-tiny", num_steps=2, prompts=prompt)
    envs = DiffusionDenoiseVectorEnv(4, **kwargs)
    obs, _ = envs.reset(seed=0)
    assert [envs.prompts[i] for i in obs["c"].tolist()] == envs.core.conditions.reward_input(obs["c"])
    state = envs.state_dict()
    other = DiffusionDenoiseVectorEnv(4, **kwargs)
    other.load_state_dict(state)
    assert other.prompts == envs.prompts
    book = PromptBook(["a"], limit=2)
    book.id("b")
    with pytest.raises(ValueError, match="limit"):
        book.id("c")


# --- references for HRF on text models ----------------------------------------------------------


def test_captioned_folder_references_are_vae_encoded_with_their_prompts(tmp_path):
    from PIL import Image

    family = _family("random:sd-tiny")
    rng = np.random.default_rng(0)
    for name in ("one.png", "two.png", "sub/three.png"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / name)
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "one.png", "text": "a cat"})
        + "\n"
        + json.dumps({"file_name": "two.png", "text": "a dog"})
    )
    (tmp_path / "sub" / "three.txt").write_text("a red car\n")
    env = DiffusionDenoiseEnv(
        model=family, num_steps=40, window="hrf", prompts=["a cat", "a dog", "a red car"], references=tmp_path
    )
    refs = env.core.references
    assert isinstance(refs, CaptionedFolderReferences)
    assert refs.images.shape == (3, *family.sample_shape)
    assert refs.conditions.tolist() == [0, 2, 1]  # files in path order: one.png, sub/three.png, two.png
    obs, info = env.reset(seed=0)
    assert info["start_step"] in range(8, 13) and obs["c"] in ("a cat", "a dog", "a red car")
    (tmp_path / "sub" / "three.txt").unlink()
    with pytest.raises(ValueError, match="has no caption"):
        DiffusionDenoiseEnv(model=family, num_steps=40, window="hrf", prompts=["a cat", "a dog"], references=tmp_path)
    with pytest.raises(ValueError, match="captioned images"):
        DiffusionDenoiseEnv(model=family, num_steps=40, window="hrf", references="digits")


def test_model_references_are_latents_of_the_current_policy_with_drawn_prompts():
    family = _family("random:sd-tiny", "v_prediction")
    env = DiffusionDenoiseEnv(model=family, num_steps=40, window="hrf", prompts=PROMPTS)
    env.reset(seed=0)
    refs = env.core.references.sample(3, np.random.default_rng(0))
    assert refs.images.shape == (3, *family.sample_shape)
    assert set(refs.conditions.tolist()) <= {0, 1, 2}
    # the same prompts and generator through the chain give the same latents
    again = env.core.references.sample(3, np.random.default_rng(0))
    assert torch.equal(refs.images, again.images)
    assert refs.images.abs().max() < 10  # v-prediction keeps a random model's samples at unit scale
    assert sampling.to_unit_range(refs.images).shape == refs.images.shape


def test_prompt_toy_rewards_are_antisymmetric_and_need_prompts():
    from diffusion_gym.rewards import make_reward

    images = torch.zeros(3, 3, 4, 4)
    images[:, 0], images[:, 2] = 0.8, 0.2  # red 0.8, green 0, blue 0.2: brightness 1/3
    color = make_reward("prompt_color")(images, ["a red car", "blue", "a cat"])
    assert torch.allclose(color, torch.tensor([0.6, -0.6, 0.0]))
    brightness = make_reward("prompt_brightness")(images, ["a bright day", "a dark night", "bright and dark"])
    assert torch.allclose(brightness, torch.tensor([1 / 3 - 0.5, 0.5 - 1 / 3, 0.0]))
    with pytest.raises(ValueError, match="one prompt per image"):
        make_reward("prompt_color")(images, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="RGB"):
        make_reward("prompt_color")(images[:, :1], ["red", "red", "red"])
