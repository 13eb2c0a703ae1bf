"""Model families: the latent-text family reproduces diffusers' SD / SDXL pipelines; the pixel family ``generate``.

All offline on tiny random components (``random:sd-tiny``, ``random:sdxl-tiny``) built from configs.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from diffusers import DDIMScheduler

from diffusion_gym import sampling
from diffusion_gym.extras import MissingExtraError
from diffusion_gym.families import Conditioning, LatentTextFamily, PixelFamily, load_family
from diffusion_gym.families.tiny import tiny_clip_tokenizer
from diffusion_gym.models import MissingWeightsError, load_model
from tests._tiny_unet import tiny_unet

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a photo of a cat", "a red car in the snow"]
STEPS = 5
TOL = 1e-5


def _family(spec: str, prediction_type: str = "epsilon") -> LatentTextFamily:
    family = load_family(spec, scheduler_overrides={"prediction_type": prediction_type})
    assert isinstance(family, LatentTextFamily)
    return family


def _latents(family: LatentTextFamily, n: int = len(PROMPTS), seed: int = 0) -> torch.Tensor:
    return torch.randn((n, *family.sample_shape), generator=torch.Generator().manual_seed(seed))


def _our_chain(family, latents, cond, guidance, eta=0.0, noise=None):
    """The policy's chain written out: model_output, then sampling.denoise_step, step by step."""
    schedule = sampling.make_schedule(family.scheduler, STEPS, eta=eta)
    x = latents
    for k in range(STEPS):
        t = sampling.timestep_at(k, schedule).expand(x.shape[0])
        out = family.model_output(x, t, cond, guidance)
        x = sampling.denoise_step(out, x, k, schedule, noise=None if noise is None else noise[k]).x_prev
    return x


# --- the tiny tokenizer ---------------------------------------------------------------------------


def test_tiny_tokenizer_tokenizes_simple_prompts_without_unknown_tokens():
    tokenizer = tiny_clip_tokenizer()
    ids = tokenizer("a photo of a cat").input_ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens == ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>", "<|endoftext|>"]
    # CLIP's unknown token is its end token: none may appear before the end, whatever the characters
    for prompt in ["Zebra, 3 ünïcode!", "A Dog  on\tthe CAR"]:
        ids = tokenizer(prompt).input_ids
        assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.unk_token_id not in ids[1:-1]
    assert tokenizer.model_max_length == 77
    assert tokenizer("a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids.shape == (1, 77)


def test_random_tiny_families_are_seeded():
    a, b, c = (load_family("random:sd-tiny", seed=s) for s in (0, 0, 1))
    state_a, state_b, state_c = (f.denoiser.state_dict() for f in (a, b, c))
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not all(torch.equal(state_a[k], state_c[k]) for k in state_a)
    enc_a, enc_b = (f.text_encoders[0].state_dict() for f in (a, b))
    assert all(torch.equal(enc_a[k], enc_b[k]) for k in enc_a)


# --- exactness against diffusers -----------------------------------------------------------------


@pytest.mark.parametrize("spec", ["random:sd-tiny", "random:sdxl-tiny"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("guidance", [1.0, 5.0])
def test_eta0_chain_reproduces_the_diffusers_pipeline(spec, prediction_type, guidance):
    family = _family(spec, prediction_type)
    latents = _latents(family)
    expected = family.pipeline()(
        PROMPTS, latents=latents, num_inference_steps=STEPS, guidance_scale=guidance, eta=0.0, output_type="latent"
    ).images
    ours = _our_chain(family, latents, family.encode_conditions(PROMPTS), guidance)
    assert (ours - expected).abs().max() < TOL
    assert expected.abs().max() > 0.1  # a real chain, not zeros


@pytest.mark.parametrize("spec", ["random:sd-tiny", "random:sdxl-tiny"])
def test_negative_prompts_and_decoding_reproduce_the_diffusers_pipeline(spec):
    family = _family(spec)
    pipe = family.pipeline()
    latents = _latents(family, seed=1)
    negative = ["blurry", "a dog"]
    kwargs = dict(latents=latents, num_inference_steps=STEPS, guidance_scale=7.0, eta=0.0)
    expected = pipe(PROMPTS, negative_prompt=negative, output_type="latent", **kwargs).images
    cond = family.encode_conditions(PROMPTS, negative=negative)
    ours = _our_chain(family, latents, cond, 7.0)
    assert (ours - expected).abs().max() < TOL
    images = pipe(PROMPTS, negative_prompt=negative, output_type="pt", **kwargs).images
    decoded = family.decode(ours)
    assert decoded.shape == images.shape == (2, *family.image_shape)
    assert (decoded - images).abs().max() < TOL


def test_the_chain_also_runs_through_sampling_generate_and_denoise_chain():
    family = _family("random:sd-tiny")
    latents = _latents(family)
    cond = family.encode_conditions(PROMPTS)
    schedule = sampling.make_schedule(family.scheduler, STEPS, eta=0.0)
    chained = sampling.denoise_chain(family.chain_denoiser(5.0), latents, schedule, cond)
    assert torch.equal(chained, _our_chain(family, latents, cond, 5.0))
    assert family.default_guidance_scale == 7.5
    # generate slices the Conditioning batch by batch; each row equals its own chain from the same noise
    rows = sampling.generate(family.chain_denoiser(5.0), schedule, 2, family.sample_shape, cond, seed=4, batch_size=1)
    noise = sampling.initial_noise(2, family.sample_shape, seed=4)
    for i in range(2):
        assert torch.equal(rows[i : i + 1], _our_chain(family, noise[i : i + 1], cond[i], 5.0))


@pytest.mark.parametrize("spec", ["random:sd-tiny", "random:sdxl-tiny"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_eta1_steps_and_log_probs_match_ddim_step_and_a_normal(spec, prediction_type):
    family = _family(spec, prediction_type)
    cond = family.encode_conditions(PROMPTS)
    schedule = sampling.make_schedule(family.scheduler, STEPS, eta=1.0)
    scheduler = DDIMScheduler.from_config(family.scheduler.config)
    scheduler.set_timesteps(STEPS)
    # SD's config: steps_offset=1, set_alpha_to_one=False, "leading" spacing
    assert scheduler.timesteps.tolist() == schedule.timesteps.tolist() == [801, 601, 401, 201, 1]
    assert schedule.alpha_prod_prev[-1] == scheduler.alphas_cumprod[0]
    assert not schedule.deterministic.any()
    gen = torch.Generator().manual_seed(2)
    x = _latents(family)
    for k, t in enumerate(scheduler.timesteps):
        out = family.model_output(x, t, cond, 5.0)
        z = torch.randn(x.shape, generator=gen)
        step = sampling.denoise_step(out, x, k, schedule, noise=z)
        expected = scheduler.step(out, t, x, eta=1.0, variance_noise=z).prev_sample
        assert (step.x_prev - expected).abs().max() < TOL
        mean = scheduler.step(out, t, x, eta=1.0, variance_noise=torch.zeros_like(z)).prev_sample
        prev_t = t - scheduler.config.num_train_timesteps // STEPS
        std = scheduler._get_variance(t, prev_t).sqrt()
        log_prob = torch.distributions.Normal(mean, std).log_prob(step.x_prev).mean(dim=(1, 2, 3))
        assert (step.log_prob - log_prob).abs().max() < TOL
        x = step.x_prev


# --- conditions ----------------------------------------------------------------------------------


def test_sd_conditions_equal_the_pipelines_prompt_encoding():
    family = _family("random:sd-tiny")
    pipe = family.pipeline()
    cond = family.encode_conditions(PROMPTS)
    embeds, negative = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    assert torch.equal(cond.embeds, embeds) and torch.equal(cond.negative_embeds, negative)
    assert cond.embeds.shape == (2, 77, 32) and cond.pooled is None and cond.time_ids is None
    empty, _ = family.encode_text(["", ""])
    assert torch.equal(cond.negative_embeds, empty)  # the default negative prompt is ""
    one = family.encode_conditions(PROMPTS, negative="blurry")
    assert torch.equal(one.negative_embeds, family.encode_conditions(PROMPTS, ["blurry"] * 2).negative_embeds)
    assert not torch.equal(one.negative_embeds, cond.negative_embeds)
    assert torch.equal(family.encode_conditions("a photo of a cat").embeds, cond.embeds[:1])


def test_sdxl_conditions_equal_the_pipelines_prompt_encoding_and_time_ids():
    family = _family("random:sdxl-tiny")
    pipe = family.pipeline()
    cond = family.encode_conditions(PROMPTS)
    encoded = pipe.encode_prompt(
        prompt=PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
    )
    for ours, theirs in zip(["embeds", "negative_embeds", "pooled", "negative_pooled"], encoded, strict=True):
        assert torch.equal(getattr(cond, ours), theirs), ours
    assert cond.embeds.shape == (2, 77, 64) and cond.pooled.shape == (2, 32)
    # force_zeros_for_empty_prompt: no negative prompt means zeros; an explicit "" is encoded
    assert not cond.negative_embeds.any() and not cond.negative_pooled.any()
    explicit = family.encode_conditions(PROMPTS, negative="")
    assert explicit.negative_embeds.abs().sum() > 0 and explicit.negative_pooled.abs().sum() > 0
    # (original size, crop top-left, target size) at the generated 16x16 resolution, both branches
    assert cond.time_ids.tolist() == [[16, 16, 0, 0, 16, 16]] * 2
    assert torch.equal(cond.negative_time_ids, cond.time_ids)
    expected = pipe._get_add_time_ids((16, 16), (0, 0), (16, 16), torch.float32, 32)
    assert torch.equal(cond.time_ids[:1], expected)


def test_bad_prompts_are_rejected_with_the_bad_value():
    family = _family("random:sd-tiny")
    with pytest.raises(ValueError, match="got 3 .*int"):
        family.encode_conditions(["a cat", 3])
    with pytest.raises(ValueError, match="Tensor"):
        family.encode_conditions(torch.arange(2))
    with pytest.raises(ValueError, match="got 1 negative prompts for 2 prompts"):
        family.encode_conditions(PROMPTS, negative=["blurry"])
    with pytest.raises(ValueError, match="negative prompts must be strings, got None"):
        family.encode_conditions(PROMPTS, negative=["blurry", None])


def test_sdxl_resolution_sets_the_latent_shape_and_time_ids():
    tiny = _family("random:sdxl-tiny")
    parts = (tiny.denoiser, tiny.vae, tiny.text_encoders, tiny.tokenizers, tiny.scheduler)
    family = LatentTextFamily(*parts, force_zeros_for_empty_prompt=True, resolution=(24, 32))
    assert family.sample_shape == (4, 12, 16) and family.image_shape == (3, 24, 32)
    assert family.encode_conditions(["a cat"]).time_ids.tolist() == [[24, 32, 0, 0, 24, 32]]
    with pytest.raises(ValueError, match=r"multiples of the VAE's scale factor 2, got \(15, 16\)"):
        LatentTextFamily(*parts, resolution=(15, 16))
    with pytest.raises(ValueError, match="a sdxl UNet needs 2 text encoder"):
        LatentTextFamily(tiny.denoiser, tiny.vae, tiny.text_encoders[:1], tiny.tokenizers[:1], tiny.scheduler)
    with pytest.raises(ValueError, match="at least one prompt"):
        family.encode_conditions([])


def test_conditioning_slices_moves_and_concatenates_rows():
    family = _family("random:sdxl-tiny")
    cond = family.encode_conditions(PROMPTS, negative="blurry")
    assert cond.batch_size == 2 and cond.has_negative
    assert all(torch.equal(v, getattr(cond, k)[1:]) for k, v in cond[1].tensors().items())
    assert cond[-1].batch_size == 1 and torch.equal(cond[-1].embeds, cond.embeds[1:])
    both = Conditioning.cat([cond[1], cond[0]])
    assert torch.equal(both.pooled, cond.pooled.flip(0))
    assert torch.equal(cond[torch.tensor([0, 0, 1])].embeds, cond.repeat_interleave(2)[torch.tensor([0, 1, 2])].embeds)
    assert cond.to(dtype=torch.float64).embeds.dtype == torch.float64
    labels = Conditioning(labels=torch.arange(3)).to(dtype=torch.float16)
    assert labels.labels.dtype == torch.int64 and Conditioning().batch_size is None
    with pytest.raises(ValueError, match="different fields"):
        Conditioning.cat([cond, labels])
    with pytest.raises(ValueError, match="repeats must be a positive int, got 0"):
        cond.repeat_interleave(0)


# --- guidance ------------------------------------------------------------------------------------


def test_guidance_runs_one_batched_unet_call_and_uses_the_formula():
    family = _family("random:sdxl-tiny")
    cond = family.encode_conditions(PROMPTS, negative="blurry")
    x, t = _latents(family), torch.tensor([901, 401])
    calls = []

    def network(sample, timestep, **kwargs):
        calls.append(sample.shape[0])
        return family.denoiser(sample, timestep, **kwargs)

    conditional = family.model_output(x, t, cond, 1.0, network=network)
    unconditional = family.model_output(
        x, t, Conditioning(embeds=cond.negative_embeds, pooled=cond.negative_pooled, time_ids=cond.negative_time_ids)
    )
    assert calls == [2]  # g = 1: the conditional half only, as diffusers
    guided = family.model_output(x, t, cond, 3.0, network=network)
    assert calls == [2, 4]  # one UNet call on [unconditional, conditional]
    assert (guided - (unconditional + 3.0 * (conditional - unconditional))).abs().max() < TOL
    assert (family.model_output(x, t, cond, 0.0) - unconditional).abs().max() < TOL  # g = 0: unconditional
    assert (
        family.model_output(x, 901, cond, 1.0) - family.model_output(x, torch.tensor([901, 901]), cond)
    ).abs().max() == 0
    for bad in (-1.0, float("nan"), True, "5"):
        with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 0"):
            family.model_output(x, t, cond, bad)
    with pytest.raises(ValueError, match="needs the unconditional branch"):
        family.model_output(x, t, Conditioning(embeds=cond.embeds, pooled=cond.pooled, time_ids=cond.time_ids), 2.0)
    with pytest.raises(ValueError, match="needs embeds, pooled and time_ids"):
        family.model_output(x, t, Conditioning(embeds=cond.embeds), 1.0)


# --- decode / encode -----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["random:sd-tiny", "random:sdxl-tiny"])
def test_decode_and_encode_images_shapes_ranges_and_definition(spec):
    family = _family(spec)
    x = 3 * _latents(family, n=3)
    images = family.decode(x)
    assert images.shape == (3, 3, 16, 16) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert (family.decode(x, batch_size=1) - images).abs().max() < 1e-6
    assert family.decode(x[:0]).shape == (0, 3, 16, 16)
    pictures = torch.rand(3, *family.image_shape, generator=torch.Generator().manual_seed(0))
    latents = family.encode_images(pictures)
    assert latents.shape == (3, *family.sample_shape)
    assert torch.equal(latents, family.encode_images(pictures))  # the posterior mean: deterministic
    assert (family.encode_images(pictures, batch_size=2) - latents).abs().max() < 1e-6
    mean = family.vae.encode(2 * pictures - 1).latent_dist.mean
    assert (latents - mean * family.vae.config.scaling_factor).abs().max() < 1e-5
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, 16, 16\).*got \(3, 3, 8, 8\)"):
        family.encode_images(torch.rand(3, 3, 8, 8))


# --- the pixel family ----------------------------------------------------------------------------


def test_pixel_family_reproduces_generate_of_the_embedded_model_exactly(model):
    unet, scheduler = model
    schedule = sampling.make_schedule(scheduler, 8, eta=1.0)
    labels = torch.tensor([0, 3, 7, 9, 1, 5])
    expected = sampling.generate(sampling.unet_denoiser(unet), schedule, 6, (1, 16, 16), labels, seed=3, batch_size=4)
    family = load_family("embedded:digits")
    assert isinstance(family, PixelFamily) and family.sample_shape == family.image_shape == (1, 16, 16)
    ours = sampling.generate(
        family.chain_denoiser(),
        sampling.make_schedule(family.scheduler, 8, eta=1.0),
        6,
        family.sample_shape,
        family.encode_conditions(labels),
        seed=3,
        batch_size=4,
    )
    assert torch.equal(ours, expected)
    assert torch.equal(family.decode(ours), sampling.to_unit_range(ours))
    assert (family.encode_images(family.decode(ours)) - ours.clamp(-1, 1)).abs().max() < 1e-6


def test_pixel_family_checks_class_ids_and_guidance():
    family = load_family("embedded:digits")
    assert torch.equal(family.encode_conditions([1, 2]).labels, torch.tensor([1, 2]))
    for bad, message in [([3.7], "ints, got 3.7"), ([True], "ints, got True"), (["3"], "ints, got '3'")]:
        with pytest.raises(ValueError, match=message):
            family.encode_conditions(bad)
    with pytest.raises(ValueError, match=r"\[0, 9\], got \[10\]"):
        family.encode_conditions(torch.tensor([1, 10]))
    with pytest.raises(ValueError, match="integer tensor, got dtype torch.float32"):
        family.encode_conditions(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="no negative prompts"):
        family.encode_conditions([1], negative="blurry")
    x = torch.randn(1, 1, 16, 16)
    with pytest.raises(ValueError, match="guidance_scale must be 1.0, got 5.0"):
        family.model_output(x, 10, family.encode_conditions([1]), 5.0)
    with pytest.raises(ValueError, match="holds no class ids"):
        family.model_output(x, 10, Conditioning())


def test_unconditional_pixel_family():
    scheduler = load_model("random:digits").scheduler
    family = PixelFamily(tiny_unet(), scheduler)
    cond = family.encode_conditions(None)
    assert cond.batch_size is None
    x = torch.randn(2, *family.sample_shape)
    assert torch.equal(family.model_output(x, 5, cond), family.denoiser(x, torch.tensor([5, 5])).sample)
    schedule = sampling.make_schedule(scheduler, 3, eta=0.0)
    assert sampling.denoise_chain(family.chain_denoiser(), x, schedule).shape == x.shape
    with pytest.raises(ValueError, match="unconditional: conditions must be None"):
        family.encode_conditions([1])


# --- loading -------------------------------------------------------------------------------------


def test_unknown_specs_name_the_valid_forms():
    for spec in ("nonsense", "random:nope", "/no/such/folder"):
        with pytest.raises(
            ValueError, match=r"valid forms: \['embedded:digits', .*'random:sd-tiny', 'random:sdxl-tiny'"
        ):
            load_family(spec)
    with pytest.raises(ValueError, match="unknown embedded model"):
        load_family("embedded:faces")


def test_a_hub_id_missing_from_the_cache_names_it_and_how_to_provide_it(tmp_path):
    with pytest.raises(MissingWeightsError) as error:
        load_family("stabilityai/stable-diffusion-xl-base-1.0", cache_dir=tmp_path)
    message = str(error.value)
    assert "'stabilityai/stable-diffusion-xl-base-1.0' is not in the Hugging Face cache" in message
    assert str(tmp_path / "models--stabilityai--stable-diffusion-xl-base-1.0") in message
    assert "hf download stabilityai/stable-diffusion-xl-base-1.0" in message
    assert "pass that folder as the model" in message


PNDM_CONFIG = {  # SD 1.5's scheduler config: a PNDM scheduler, no timestep_spacing
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


@pytest.mark.parametrize("spec", ["random:sd-tiny", "random:sdxl-tiny"])
def test_a_saved_pipeline_loads_from_a_folder_and_from_the_hub_cache(spec, tmp_path):
    family = _family(spec)
    folder = tmp_path / "pipe"
    family.pipeline().save_pretrained(folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(PNDM_CONFIG))
    snapshot = tmp_path / "cache" / "models--someone--tiny" / "snapshots" / ("0" * 40)
    shutil.copytree(folder, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    x, t = _latents(family), torch.tensor([801, 1])
    cond = family.encode_conditions(PROMPTS)
    for loaded in (load_family(folder), load_family("someone/tiny", cache_dir=tmp_path / "cache")):
        assert isinstance(loaded, LatentTextFamily) and loaded.variant == family.variant
        assert loaded.force_zeros_for_empty_prompt == family.force_zeros_for_empty_prompt
        assert isinstance(loaded.scheduler, DDIMScheduler)
        assert not loaded.scheduler.config.clip_sample  # latents are never clipped to [-1, 1]
        assert loaded.scheduler.config.steps_offset == 1 and not loaded.scheduler.config.set_alpha_to_one
        theirs = loaded.encode_conditions(PROMPTS)
        assert all(torch.equal(v, getattr(cond, k)) for k, v in theirs.tensors().items())
        assert torch.equal(loaded.model_output(x, t, theirs, 5.0), family.model_output(x, t, cond, 5.0))


def test_incomplete_or_foreign_pipeline_folders_are_named(tmp_path):
    family = _family("random:sd-tiny")
    folder = tmp_path / "pipe"
    family.pipeline().save_pretrained(folder)
    (folder / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(MissingWeightsError, match=r"lacks \['text_encoder/model.safetensors\|"):
        load_family(folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "PixArtAlphaPipeline"}))
    with pytest.raises(ValueError, match="unsupported pipeline 'PixArtAlphaPipeline'.*StableDiffusionXLPipeline.*Flux"):
        load_family(folder)


def test_only_text_families_need_transformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if the `text` extra were not installed
    with pytest.raises(MissingExtraError, match=r"diffusion-gym\[text\]"):
        load_family("random:sd-tiny")
    assert load_family("random:digits").name == "pixel"
