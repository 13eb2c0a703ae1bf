import re

import numpy as np
import pytest
import torch
from PIL import Image

from diffusion_gym.references import (
    DigitsReferences,
    FolderReferences,
    ModelReferences,
    TensorReferences,
    make_references,
)

SHAPE = (1, 16, 16)


def test_digits_references_are_labelled_digits_in_model_space():
    refs = DigitsReferences(SHAPE)
    draw = refs.sample(32, np.random.default_rng(0))
    assert draw.images.shape == (32, 1, 16, 16)
    assert draw.images.min() >= -1 and draw.images.max() <= 1 and draw.images.min() == -1
    assert set(draw.conditions.tolist()) <= set(range(10))
    again = refs.sample(32, np.random.default_rng(0))
    assert torch.equal(draw.images, again.images)  # reproducible from the env's RNG


def test_folder_references_read_class_subfolders(tmp_path):
    for label in (3, 7):
        (tmp_path / str(label)).mkdir()
        pixels = np.full((8, 8, 3), 255 if label == 7 else 0, np.uint8)
        Image.fromarray(pixels).save(tmp_path / str(label) / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "loose.jpg")
    refs = make_references(tmp_path, SHAPE)
    assert isinstance(refs, FolderReferences) and len(refs.files) == 3
    by_condition = {int(c): img for img, c in zip(refs.images, refs.conditions, strict=True)}
    assert by_condition[7].min() == pytest.approx(1.0) and by_condition[3].max() == pytest.approx(-1.0)
    assert sorted(refs.conditions.tolist()) == [0, 3, 7]


def test_tensor_references_validate_and_resize():
    refs = make_references(torch.rand(5, 3, 32, 32), SHAPE, conditions=torch.arange(5))
    assert isinstance(refs, TensorReferences) and refs.images.shape == (5, 1, 16, 16)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        make_references(torch.full((2, 1, 16, 16), 2.0), SHAPE)
    with pytest.raises(ValueError, match="conditions"):
        make_references(torch.rand(2, 1, 16, 16), SHAPE, conditions=torch.arange(3))


def test_model_references_use_the_sampler_and_the_rng():
    calls = []

    def sampler(n, conditions, generator):
        calls.append(conditions.clone())
        return torch.randn((n, *SHAPE), generator=generator).tanh()

    refs = make_references("model", SHAPE, model_sampler=sampler, num_classes=10)
    assert isinstance(refs, ModelReferences)
    a = refs.sample(4, np.random.default_rng(1))
    b = refs.sample(4, np.random.default_rng(1))
    assert torch.equal(a.images, b.images) and torch.equal(a.conditions, calls[0])


def test_unknown_references_name_the_choices():
    with pytest.raises(ValueError, match=r"unknown references 'cats'.*digits.*model"):
        make_references("cats", SHAPE)
    with pytest.raises(ValueError, match="model sampler"):
        make_references("model", SHAPE)


def test_folder_class_subfolders_outside_the_model_classes_are_refused(tmp_path):
    for label in ("3", "12"):
        (tmp_path / label).mkdir()
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / label / "a.png")
    with pytest.raises(
        ValueError, match=rf"reference folder {re.escape(str(tmp_path))} has class subfolders.*12.*\[0, 9\]"
    ):
        make_references(tmp_path, SHAPE, num_classes=10)
    assert sorted(make_references(tmp_path, SHAPE, num_classes=13).conditions.tolist()) == [3, 12]


def test_env_refuses_a_reference_folder_with_a_class_the_model_lacks(tmp_path):
    from diffusion_gym.envs import DenoiseCore
    from diffusion_gym.models import load_model

    (tmp_path / "10").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "10" / "a.png")
    with pytest.raises(ValueError, match=r"class subfolders.*10.*\[0, 9\]"):
        DenoiseCore(num_envs=1, model=load_model("embedded:digits"), num_steps=4, references=str(tmp_path))


def test_tensor_reference_conditions_must_be_class_ids():
    images = torch.rand(3, 1, 16, 16)
    with pytest.raises(ValueError, match=r"class ids in \[0, 9\], got \[10\]"):
        make_references(images, SHAPE, num_classes=10, conditions=torch.tensor([0, 10, 9]))
    with pytest.raises(ValueError, match="integer class ids, got dtype torch.float32"):
        make_references(images, SHAPE, num_classes=10, conditions=torch.tensor([0.0, 3.7, 1.0]))
    with pytest.raises(ValueError, match=r"non-negative class ids, got \[-1\]"):
        make_references(images, SHAPE, conditions=torch.tensor([0, -1, 1]))
    refs = make_references(images, SHAPE, num_classes=10, conditions=np.array([1, 2, 3], np.int32))
    assert refs.conditions.dtype == torch.int64 and refs.conditions.tolist() == [1, 2, 3]
