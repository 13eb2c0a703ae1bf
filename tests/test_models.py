import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from diffusion_gym import models, sampling
from diffusion_gym.digits import load_digit_classifier
from diffusion_gym.models import EMBEDDED_DIR, MissingWeightsError, load_model


def test_embedded_digits_is_a_class_conditional_diffusers_model():
    unet, scheduler = load_model("embedded:digits")
    assert isinstance(unet, UNet2DModel) and isinstance(scheduler, DDIMScheduler)
    assert unet.config.num_class_embeds == 10 and unet.config.sample_size == 16 and unet.config.in_channels == 1
    assert not unet.training
    assert isinstance(load_model("embedded:digits", scheduler="ddpm").scheduler, DDPMScheduler)
    pipe = DDPMPipeline.from_pretrained(EMBEDDED_DIR)  # the shipped folder is a plain diffusers pipeline
    assert pipe.unet.config.num_class_embeds == 10
    size = sum(f.stat().st_size for f in EMBEDDED_DIR.rglob("*") if f.is_file())
    assert size < 8 * 2**20


def test_embedded_model_samples_the_digit_it_is_asked_for():
    unet, scheduler = load_model("embedded:digits")
    schedule = sampling.make_schedule(scheduler, 40, eta=1.0)
    c = torch.arange(40) % 10
    x = sampling.generate(sampling.unet_denoiser(unet), schedule, 40, (1, 16, 16), c, seed=123)
    images = sampling.to_unit_range(x)
    with torch.no_grad():
        predicted = load_digit_classifier()(images).argmax(1)
    assert (predicted == c).float().mean() >= 0.9
    assert images.std(0).mean() > 0.1  # not one image repeated


def test_random_architectures():
    unet, scheduler = load_model("random:celebahq-256", scheduler="ddpm")
    assert sum(p.numel() for p in unet.parameters()) == pytest.approx(113.7e6, rel=0.002)
    assert unet.config.sample_size == 256 and scheduler.config.beta_schedule == "linear"
    assert scheduler.config.clip_sample and scheduler.config.variance_type == "fixed_small"
    a = load_model("random:digits", seed=1).unet.conv_in.weight
    b = load_model("random:digits", seed=1).unet.conv_in.weight
    c = load_model("random:digits", seed=2).unet.conv_in.weight
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_specs_name_the_value_and_the_choices():
    with pytest.raises(ValueError, match=r"'embedded:cats'.*embedded:digits"):
        load_model("embedded:cats")
    with pytest.raises(ValueError, match=r"'random:nope'.*random:celebahq-256"):
        load_model("random:nope")
    with pytest.raises(ValueError, match=r"'dpm'.*ddim"):
        load_model("embedded:digits", scheduler="dpm")
    with pytest.raises(MissingWeightsError, match="not-a-model"):
        load_model("./not-a-model")


def test_missing_hub_weights_give_a_clear_error_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for allow in (None, False):
        with pytest.raises(MissingWeightsError) as err:
            load_model("google/ddpm-celebahq-256", cache_dir=str(tmp_path), allow_download=allow)
        message = str(err.value)
        assert "google/ddpm-celebahq-256" in message
        assert str(tmp_path) in message and "config.json" in message
        assert "huggingface-cli download" in message and "--weights" in message


def _save_tiny(directory: Path, layout: str) -> UNet2DModel:
    torch.manual_seed(0)
    unet = models.build_architecture("digits").unet
    scheduler = DDPMScheduler(num_train_timesteps=100, beta_schedule="linear", prediction_type="v_prediction")
    if layout == "pipeline":
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(directory)
    else:
        unet.save_pretrained(directory)
        scheduler.save_pretrained(directory)
    return unet


@pytest.mark.parametrize("layout", ["pipeline", "unet"])
def test_local_directories(tmp_path, layout):
    saved = _save_tiny(tmp_path / "m", layout)
    unet, scheduler = load_model(tmp_path / "m")
    assert torch.equal(unet.conv_in.weight, saved.conv_in.weight)
    assert scheduler.config.num_train_timesteps == 100 and scheduler.config.prediction_type == "v_prediction"
    overridden = load_model(str(tmp_path / "m"), scheduler_overrides={"clip_sample": False}).scheduler
    assert overridden.config.clip_sample is False


def test_hub_id_is_read_from_the_cache(tmp_path):
    repo = tmp_path / "models--someone--tiny-ddpm"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    saved = _save_tiny(snapshot, "pipeline")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(snapshot.name)
    unet, scheduler = load_model("someone/tiny-ddpm", cache_dir=str(tmp_path), allow_download=False)
    assert torch.equal(unet.conv_in.weight, saved.conv_in.weight)
    assert json.loads((snapshot / "model_index.json").read_text())["_class_name"] == "DDPMPipeline"
    assert os.environ["HF_HUB_OFFLINE"] == "1"
