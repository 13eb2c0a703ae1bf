"""ClassConditionalPipeline: three-line generation from the embedded model and from a checkpoint, the same images
as sampling.generate, label checks, save/load round trips (DDPMPipeline still loads checkpoints), lazy export,
and `sample --model <run>` pointing to --checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from _tiny_unet import TINY_UNET, tiny_unet
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from agents.cli import main
from agents.common.checkpoint import save_checkpoint
from diffusion_gym import sampling
from diffusion_gym.models import EMBEDDED_DIR, load_model
from diffusion_gym.pipeline import ClassConditionalPipeline, ClassConditionalPipelineOutput

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe() -> ClassConditionalPipeline:
    loaded = ClassConditionalPipeline.from_pretrained(EMBEDDED_DIR)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def tiny_checkpoint(run_dir, num_classes: int | None = 3):
    """A tiny training checkpoint (class-conditional unless ``num_classes`` is None) with its scheduler."""
    torch.manual_seed(0)
    config = {**TINY_UNET, "num_class_embeds": num_classes} if num_classes else TINY_UNET
    unet = UNet2DModel(**config) if num_classes else tiny_unet()
    scheduler = DDIMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    return save_checkpoint(run_dir, 2, unet, {"epoch": 2}, scheduler=scheduler)


def test_three_lines_from_the_embedded_model():
    from diffusion_gym import ClassConditionalPipeline as Exported  # the lazy export

    generated = Exported.from_pretrained(EMBEDDED_DIR)
    images = generated(class_labels=[3, 7], num_inference_steps=4, seed=0).images
    assert len(images) == 2 and images[0].size == (16, 16) and images[0].mode == "L"


def test_default_call_draws_one_image_per_class(pipe):
    out = pipe(num_inference_steps=2, seed=1)
    assert isinstance(out, ClassConditionalPipelineOutput) and len(out.images) == 10
    assert out.class_labels.tolist() == list(range(10))
    again = pipe(class_labels=4, batch_size=3, num_inference_steps=2, seed=1, output_type="np")
    assert again.images.shape == (3, 16, 16, 1) and again.class_labels.tolist() == [4, 4, 4]


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_same_images_as_sampling_generate(pipe, sampler):
    loaded = load_model("embedded:digits", scheduler=sampler)
    labels = torch.tensor([0, 5, 9, 2, 2, 7])
    schedule = sampling.make_schedule(loaded.scheduler, 5, eta=0.7)
    x = sampling.generate(sampling.unet_denoiser(loaded.unet), schedule, 6, (1, 16, 16), labels, seed=11, batch_size=4)
    images = pipe(
        labels, num_inference_steps=5, eta=0.7, seed=11, output_type="pt", sampler=sampler, chain_batch_size=4
    ).images
    assert torch.equal(images, sampling.to_unit_range(x))  # bit for bit, over two chains
    as_numpy = pipe(
        labels, num_inference_steps=5, eta=0.7, seed=11, output_type="np", sampler=sampler, chain_batch_size=4
    )
    assert np.array_equal(as_numpy.images, images.permute(0, 2, 3, 1).numpy())


def test_generator_draws_are_reproducible(pipe):
    first = pipe([1, 2], num_inference_steps=3, generator=torch.Generator().manual_seed(5), output_type="pt").images
    second = pipe([1, 2], num_inference_steps=3, generator=torch.Generator().manual_seed(5), output_type="pt").images
    assert torch.equal(first, second)
    (tupled,) = pipe([1, 2], num_inference_steps=3, seed=5, output_type="pt", return_dict=False)
    assert tupled.shape == (2, 1, 16, 16) and not torch.equal(tupled, first)


def test_bad_arguments_name_the_valid_values(pipe):
    with pytest.raises(ValueError, match=r"class_labels must lie in \[0, 9\].*got \[10\]"):
        pipe(class_labels=[0, 10])
    with pytest.raises(ValueError, match=r"\[0, 9\].*got \[-1\]"):
        pipe(class_labels=-1)
    with pytest.raises(ValueError, match="integer class ids"):
        pipe(class_labels=[1.5])
    with pytest.raises(ValueError, match="integer class ids"):
        pipe(class_labels=True)
    with pytest.raises(ValueError, match="batch_size=3 disagrees with the 2 class_labels"):
        pipe(class_labels=[1, 2], batch_size=3)
    with pytest.raises(ValueError, match=r"output_type 'latent'.*\('pil', 'np', 'pt'\)"):
        pipe(output_type="latent")
    with pytest.raises(ValueError, match=r"sampler 'euler'.*\['ddim', 'ddpm'\]"):
        pipe(sampler="euler")
    with pytest.raises(ValueError, match="seed or generator"):
        pipe(seed=0, generator=torch.Generator())
    with pytest.raises(ValueError, match="eta must be a number in"):
        pipe(eta=1.5)


def test_three_lines_from_a_training_checkpoint(tmp_path):
    ckpt = tiny_checkpoint(tmp_path)
    index = json.loads((ckpt / "model_index.json").read_text())
    assert index["_class_name"] == ClassConditionalPipeline.__name__
    generated = ClassConditionalPipeline.from_pretrained(ckpt)
    images = generated(class_labels=[2, 0, 1], num_inference_steps=3, seed=0).images
    assert len(images) == 3 and images[0].size == (8, 8)
    with pytest.raises(ValueError, match=r"\[0, 2\] \(this model has 3 classes\)"):
        generated(class_labels=3)
    # diffusers' own class still loads the folder (it names another class, an explicit class wins)
    ddpm = DDPMPipeline.from_pretrained(ckpt)
    assert ddpm.unet.config.num_class_embeds == 3 and isinstance(ddpm.scheduler, DDIMScheduler)


def test_unconditional_checkpoint(tmp_path):
    generated = ClassConditionalPipeline.from_pretrained(tiny_checkpoint(tmp_path, num_classes=None))
    generated.set_progress_bar_config(disable=True)
    out = generated(batch_size=2, num_inference_steps=3, seed=0, output_type="pt")
    assert out.images.shape == (2, 1, 8, 8) and out.class_labels is None
    assert len(generated(num_inference_steps=2, seed=0).images) == 1
    with pytest.raises(ValueError, match="unconditional"):
        generated(class_labels=[0])


def test_save_pretrained_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "saved")
    assert (
        json.loads((tmp_path / "saved" / "model_index.json").read_text())["_class_name"] == "ClassConditionalPipeline"
    )
    reloaded = ClassConditionalPipeline.from_pretrained(tmp_path / "saved")
    reloaded.set_progress_bar_config(disable=True)
    assert isinstance(reloaded.scheduler, DDPMScheduler)  # saved as it was
    kwargs = dict(class_labels=[3, 8], num_inference_steps=3, seed=2, output_type="pt")
    assert torch.equal(reloaded(**kwargs).images, pipe(**kwargs).images)
    assert isinstance(DDPMPipeline.from_pretrained(tmp_path / "saved"), DDPMPipeline)


def test_import_stays_light():
    code = "import sys, diffusion_gym; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_sample_model_flag_points_training_runs_to_checkpoint(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "run")
    for flag, path in (("--model", tmp_path / "run"), ("--weights", tmp_path / "run" / "checkpoints")):
        assert main(["sample", flag, str(path), "--device", "cpu", "--out", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err
        assert f"{flag} {path} is a training run" in err and f"use --checkpoint {path}" in err
    (ckpt / "model_index.json").unlink()  # a checkpoint without a complete pipeline
    assert main(["sample", "--model", str(ckpt), "--device", "cpu", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "without a diffusers pipeline (missing model_index.json)" in err and f"use --checkpoint {ckpt}" in err
    assert not (tmp_path / "x.png").exists()
