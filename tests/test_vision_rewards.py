"""OCR, face and quality rewards, run for real on the models their packages ship (extras ocr, faces, quality)."""

import numpy as np
import pytest
import skimage.data as skimage_data  # the quality extra's dependency, whose wheel holds the test photographs
import torch

from diffusion_gym.extras import MissingExtraError
from diffusion_gym.rewards import make_reward, runs_on_host
from diffusion_gym.rewards.vision import edit_similarity, quoted_text, to_uint8


def _rendered(text: str, size=(256, 64)) -> torch.Tensor:
    from PIL import Image, ImageDraw, ImageFont

    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).text((10, 8), text, fill="black", font=ImageFont.load_default(size=40))
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255


def _astronaut() -> torch.Tensor:
    return torch.from_numpy(skimage_data.astronaut().copy()).permute(2, 0, 1).float() / 255


def test_edit_similarity_and_quoted_text():
    assert edit_similarity("OPEN 42", "open42") == 1.0
    assert edit_similarity("OPEN", "OPEN42") == pytest.approx(4 / 6)
    assert edit_similarity("", "OPEN") == 0.0 and edit_similarity("a much longer text", "ab") == 0.0
    assert quoted_text('a neon sign that says "OPEN 42" at night') == "OPEN 42" and quoted_text("a cat") is None
    with pytest.raises(ValueError, match="target text is empty"):
        edit_similarity("x", " ")


def test_ocr_scores_rendered_text_higher_for_the_matching_string():
    reward = make_reward("ocr")
    images = torch.stack([_rendered("OPEN 42"), _rendered("CLOSED"), torch.ones(3, 64, 256)])
    prompts = ['a sign that says "OPEN 42"'] * 3
    scores = reward(images, prompts)
    assert runs_on_host(reward)
    assert scores[0] == 1.0 and scores[0] > scores[1] and scores[2] == 0.0, scores
    assert reward.read(images[:2]) == ["OPEN 42", "CLOSED"]
    assert torch.equal(make_reward("ocr", target="CLOSED")(images[:2]), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="text between double quotes; none in 'a sign'"):
        reward(images[:1], ["a sign"])


def test_no_face_in_a_blank_or_noise_image_and_one_in_a_photograph():
    noise = torch.rand(3, 512, 512, generator=torch.Generator().manual_seed(0))
    scores = make_reward("face_confidence")(torch.stack([_astronaut(), torch.ones(3, 512, 512), noise]))
    assert scores[0] > 0.8 and scores[1] == 0.0 and scores[2] == 0.0, scores


def test_a_blurred_image_scores_worse_than_the_sharp_one():
    from torchvision.transforms.functional import gaussian_blur, resize

    sharp = _astronaut()[None]
    reward = make_reward("brisque")
    big = reward(torch.cat([sharp, gaussian_blur(sharp, 9, 2.0)]))
    small = resize(sharp, [64, 64], antialias=True)  # upscaled to min_side before scoring when smaller
    little = reward(torch.cat([small, gaussian_blur(small, 5, 1.5)]))
    assert big[0] > big[1] + 20 and little[0] > little[1] + 10, (big, little)


def test_grey_and_small_images_are_read_as_8_bit_rgb():
    arrays = to_uint8(torch.tensor([[[[0.0, 1.0], [0.5, 0.2]]]]), min_side=5)
    assert arrays[0].shape == (6, 6, 3) and arrays[0].dtype == np.uint8
    assert arrays[0][0, 0].tolist() == [0, 0, 0] and arrays[0][0, 5].tolist() == [255, 255, 255]
    assert arrays[0][5, 0].tolist() == [128, 128, 128]


@pytest.mark.parametrize(
    ("module", "name", "extra"), [("rapidocr", "ocr", "ocr"), ("yuface", "face_confidence", "faces")]
)
def test_a_missing_package_names_its_extra(monkeypatch, module, name, extra):
    monkeypatch.setitem(__import__("sys").modules, module, None)
    with pytest.raises(MissingExtraError, match=rf"pip install 'diffusion-gym\[{extra}\]'"):
        make_reward(name)
