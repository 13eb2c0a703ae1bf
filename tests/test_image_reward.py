"""ImageReward on transformers' BLIP modules: its checkpoint layout converted, the ViT checked by hand, the score."""

import math

import pytest
import torch
import torch.nn.functional as F

from diffusion_gym.models import MissingWeightsError
from diffusion_gym.rewards import make_reward
from diffusion_gym.rewards.image_reward import (
    IMAGE_REWARD_MEAN,
    IMAGE_REWARD_STD,
    convert_image_reward_state_dict,
    image_reward_configs,
)
from diffusion_gym.rewards.preference import square_resize

transformers = pytest.importorskip("transformers")

SIZES = {"vision_width": 32, "vision_layers": 2, "vision_heads": 4, "image_size": 32, "patch_size": 8}
WORDS = ["a", "red", "cube", "photo", "of", "dog"]


def _tokenizer_folder(tmp_path):
    """A word-level BERT tokenizer (the special tokens, then WORDS) saved like bert-base-uncased."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    transformers.BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    return tmp_path


def _blip_vit_state(seed=0):
    """Random weights in BLIP's own ViT names (models/BLIP/vit.py), as ImageReward.pt stores them."""
    g = torch.Generator().manual_seed(seed)
    d, n, patches = SIZES["vision_width"], SIZES["vision_layers"], (SIZES["image_size"] // SIZES["patch_size"]) ** 2

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.2

    state = {
        "cls_token": rand(1, 1, d),
        "pos_embed": rand(1, patches + 1, d),
        "patch_embed.proj.weight": rand(d, 3, 8, 8),
        "patch_embed.proj.bias": rand(d),
        "norm.weight": 1 + rand(d),
        "norm.bias": rand(d),
    }
    for i in range(n):
        for name, shape in {
            "norm1": (d,), "attn.qkv": (3 * d, d), "attn.proj": (d, d), "norm2": (d,),
            "mlp.fc1": (4 * d, d), "mlp.fc2": (d, 4 * d),
        }.items():  # fmt: skip
            state[f"blocks.{i}.{name}.weight"] = (1 + rand(*shape)) if name.startswith("norm") else rand(*shape)
            state[f"blocks.{i}.{name}.bias"] = rand(shape[0])
    return {f"blip.visual_encoder.{k}": v for k, v in state.items()}


def _blip_vit_forward(state, pixels):
    """BLIP's VisionTransformer.forward written out: patches + cls + pos, pre-norm blocks, final norm (eps 1e-6)."""
    s = {k[len("blip.visual_encoder.") :]: v for k, v in state.items()}
    d, heads = SIZES["vision_width"], SIZES["vision_heads"]
    x = F.conv2d(pixels, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=8).flatten(2).transpose(1, 2)
    x = torch.cat([s["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + s["pos_embed"]
    for i in range(SIZES["vision_layers"]):
        p = {k[len(f"blocks.{i}.") :]: v for k, v in s.items() if k.startswith(f"blocks.{i}.")}
        h = F.layer_norm(x, (d,), p["norm1.weight"], p["norm1.bias"], eps=1e-6)
        b, n, _ = h.shape
        qkv = F.linear(h, p["attn.qkv.weight"], p["attn.qkv.bias"]).reshape(b, n, 3, heads, d // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attention = ((q @ k.transpose(-2, -1)) / math.sqrt(d // heads)).softmax(-1)
        x = x + F.linear((attention @ v).transpose(1, 2).reshape(b, n, d), p["attn.proj.weight"], p["attn.proj.bias"])
        h = F.layer_norm(x, (d,), p["norm2.weight"], p["norm2.bias"], eps=1e-6)
        x = x + F.linear(
            F.gelu(F.linear(h, p["mlp.fc1.weight"], p["mlp.fc1.bias"])), p["mlp.fc2.weight"], p["mlp.fc2.bias"]
        )
    return F.layer_norm(x, (d,), s["norm.weight"], s["norm.bias"], eps=1e-6)


def test_blips_vit_weights_load_into_blip_vision_model_with_the_same_output():
    state = _blip_vit_state()
    vision = transformers.BlipVisionModel(image_reward_configs(**SIZES)[0]).eval()
    vision.load_state_dict(convert_image_reward_state_dict(state)["vision"])  # strict: every parameter mapped
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = vision(pixel_values=pixels).last_hidden_state
    assert torch.allclose(ours, _blip_vit_forward(state, pixels), atol=1e-5)
    with pytest.raises(ValueError, match="'blip.visual_encoder.blocks.0.attn.q_norm.weight' has no counterpart"):
        convert_image_reward_state_dict({"blip.visual_encoder.blocks.0.attn.q_norm.weight": torch.zeros(1)})


def test_the_score_is_the_normalised_head_of_the_cls_state_and_the_checkpoint_round_trips(tmp_path):
    folder = _tokenizer_folder(tmp_path / "tok")
    sizes = {**SIZES, "text_width": 16, "text_layers": 2, "text_heads": 2, "vocab_size": len(WORDS) + 7}
    torch.manual_seed(0)
    reward = make_reward("image_reward", tokenizer=folder, random_init=True, sizes=sizes)
    scorer = reward.scorer
    images = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(2))  # resized to 32, centre-cropped
    prompts = ["a red cube", "a photo of a dog"]
    with torch.no_grad():
        x = (square_resize(images, 32, "crop").clamp(0, 1) - scorer.mean) / scorer.std
        image_tokens = scorer.vision(pixel_values=x).last_hidden_state
        ids = scorer.tokenizer(prompts, padding="max_length", max_length=35, return_tensors="pt")
        assert ids.input_ids.shape == (2, 35) and ids.input_ids[0, 0] == scorer.tokenizer.cls_token_id
        states = scorer.text(
            input_ids=ids.input_ids,
            attention_mask=ids.attention_mask,
            encoder_hidden_states=image_tokens,
            is_decoder=False,
        ).last_hidden_state
        cls = states[:, 0]
        expected = (scorer.head(cls).squeeze(-1) - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD
    scores = reward(images, prompts)
    assert torch.allclose(scores, expected, atol=1e-5)
    assert not torch.allclose(reward(images, prompts[::-1]), scores), "the score reads the prompt"
    # the same weights saved in ImageReward.pt's layout load back to the same scores
    state = {f"blip.text_encoder.{k}": v for k, v in scorer.text.state_dict().items()}
    state |= {f"mlp.{k}": v for k, v in scorer.head.state_dict().items()}  # mlp.layers.0.weight, ...
    inverse = {v: k for k, v in _names_of_vision(sizes["vision_layers"]).items()}
    state |= {f"blip.visual_encoder.{inverse[k]}": v for k, v in scorer.vision.state_dict().items() if k in inverse}
    torch.save(state, tmp_path / "ImageReward.pt")
    loaded = make_reward("image_reward", weights=tmp_path / "ImageReward.pt", tokenizer=folder, sizes=sizes)
    assert torch.allclose(loaded(images, prompts), scores, atol=1e-6)


def _names_of_vision(layers):
    """BLIP ViT name -> BlipVisionModel name, written out by hand (vit.py vs transformers' modeling_blip.py)."""
    names = {
        "cls_token": "embeddings.class_embedding",
        "pos_embed": "embeddings.position_embedding",
        "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
        "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
        "norm.weight": "post_layernorm.weight",
        "norm.bias": "post_layernorm.bias",
    }
    pairs = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv"}
    pairs |= {"attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for i in range(layers):
        for old, new in pairs.items():
            for leaf in ("weight", "bias"):
                names[f"blocks.{i}.{old}.{leaf}"] = f"encoder.layers.{i}.{new}.{leaf}"
    return names


def test_missing_weights_and_tokenizer_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(MissingWeightsError, match=r"ImageReward.pt of hub repo 'THUDM/ImageReward'.*hf download"):
        make_reward("image_reward", sizes=SIZES)
    with pytest.raises(MissingWeightsError, match=r"tokenizer of the image_reward reward is missing.*uncased"):
        make_reward("image_reward", random_init=True, sizes=SIZES)
