"""CLIP score, PickScore and HPS v2.1 on random weights: the formula against a hand computation, loading, errors."""

import pytest
import torch
import torch.nn.functional as F

from diffusion_gym.models import MissingWeightsError
from diffusion_gym.rewards import make_reward
from diffusion_gym.rewards.preference import square_resize

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
PROMPTS = ["a red cube", "a photo of a dog"]


def _images(size=(224, 224), seed=0):
    return torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(seed))


def test_square_resize_crops_or_pads_to_a_square():
    x = torch.rand(1, 3, 20, 40)
    assert square_resize(x, 10, "crop").shape == (1, 3, 10, 10)
    padded = square_resize(x, 10, "pad")
    assert padded.shape == (1, 3, 10, 10)
    assert padded[..., :2, :].abs().max() == 0 and padded[..., 8:, :].abs().max() == 0, "5 rows of image, centred"
    same = torch.rand(1, 3, 10, 10)
    assert torch.equal(square_resize(same, 10, "crop"), same) and torch.equal(square_resize(same, 10, "pad"), same)


def test_hpsv2_is_the_cosine_of_open_clip_embeddings_with_its_checkpoint(tmp_path, monkeypatch):
    """HPS v2.1's file holds an open_clip model's state_dict; the score is the plain cosine (no logit scale)."""
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-S-32", pretrained=None).eval()
    torch.save({"state_dict": model.state_dict()}, tmp_path / "HPS_v2.1_compressed.pt")
    reward = make_reward("hpsv2", weights=tmp_path / "HPS_v2.1_compressed.pt", model_name="ViT-S-32")
    images = _images((112, 224))  # wider than tall: resized to 112 x 224 -> padded to 224 x 224
    tokens = open_clip.get_tokenizer("ViT-S-32")(PROMPTS)
    pixels = F.pad(images, (0, 0, 56, 56))
    with torch.no_grad():
        image = F.normalize(model.encode_image((pixels - MEAN) / STD), dim=-1)
        text = F.normalize(model.encode_text(tokens), dim=-1)
    assert torch.allclose(reward(images, PROMPTS), (image * text).sum(-1), atol=1e-5)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(MissingWeightsError, match=r"HPS_v2.1_compressed.pt of hub repo 'xswu/HPSv2'.*hf download"):
        make_reward("hpsv2")


def test_clip_score_is_100_cosine_floored_at_zero(monkeypatch):
    reward = make_reward("clip_score", random_init=True)
    scorer = reward.scorer
    images = _images()
    with torch.no_grad():
        image = F.normalize(scorer.model.encode_image((images - MEAN) / STD), dim=-1)
        text = F.normalize(scorer.model.encode_text(open_clip.get_tokenizer("ViT-L-14")(PROMPTS)), dim=-1)
    assert torch.allclose(reward(images, PROMPTS), (100 * (image * text).sum(-1)).clamp(min=0), atol=1e-4)
    with pytest.raises(ValueError, match=r"needs one prompt per image \(2\), got Tensor"):
        reward(images, torch.tensor([1, 2]))


def _tiny_clip_folder(tmp_path):
    """A tiny random CLIPModel and a word-level CLIP tokenizer, saved as a PickScore-like folder."""
    from diffusion_gym.families.tiny import write_tiny_clip_vocab

    write_tiny_clip_vocab(tmp_path, ["a", "red", "cube", "photo", "of", "dog"])
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    config = transformers.CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 16,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
        logit_scale_init_value=2.0,
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return model, tokenizer


def test_pickscore_is_the_scaled_cosine_of_the_clip_model(tmp_path, monkeypatch):
    """PickScore's score: exp(logit_scale) times the cosine of CLIPModel's projected embeddings."""
    model, tokenizer = _tiny_clip_folder(tmp_path)
    reward = make_reward("pickscore", weights=tmp_path, processor=tmp_path)
    images = _images((32, 32))
    with torch.no_grad():
        pixels = (images - MEAN) / STD
        tokens = tokenizer(PROMPTS, padding=True, return_tensors="pt")
        image = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        text = F.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)
    expected = model.logit_scale.exp() * (image * text).sum(-1)
    assert torch.allclose(reward(images, PROMPTS), expected, atol=1e-5)
    assert reward.scorer.model.logit_scale.exp().item() == pytest.approx(torch.e**2, rel=1e-5)
    differentiable = make_reward("pickscore", weights=tmp_path, processor=tmp_path, differentiable=True)
    images.requires_grad_(True)
    differentiable(images, PROMPTS).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(
        MissingWeightsError, match=r"yuvalkirstain/PickScore_v1.*hf download yuvalkirstain/PickScore_v1"
    ):
        make_reward("pickscore", cache_dir=tmp_path / "empty")
