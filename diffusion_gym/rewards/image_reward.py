"""ImageReward (Xu et al., 2023) on transformers' BLIP modules, loading the published ``ImageReward.pt``.

The ``image-reward`` package does not install next to this project's dependencies (it pins
``timm==0.6.13`` and ``fairscale``, and its BLIP code imports helpers that transformers 5 removed), so
the model is assembled here from the same parts and loads the same checkpoint:

* the image tower: BLIP's ViT-L/16 (width 1024, 24 blocks, 16 heads, 224², LayerNorm eps 1e-6), which
  is transformers' :class:`~transformers.BlipVisionModel` (the checkpoint's ``blip.visual_encoder.*``
  renamed by :func:`convert_image_reward_state_dict`);
* the text tower: BLIP's BERT-base "MED" encoder with cross-attention to the image tokens in every layer
  (vocabulary 30524: bert-base-uncased with ``[DEC]`` and ``[ENC]``), which is transformers'
  :class:`~transformers.BlipTextModel` with the same parameter names (``blip.text_encoder.*``);
* the head: ``mlp.layers`` 768 → 1024 → 128 → 64 → 16 → 1, linear with dropout only: the LAION
  aesthetic predictor's MLP (:class:`~diffusion_gym.rewards.aesthetic.AestheticMLP`), on which ImageReward built.

Score, as ImageReward's ``score``: the prompt tokenised by bert-base-uncased (padded to 35 tokens),
encoded with cross-attention to the image, its ``[CLS]`` state through the head, then
``(r − 0.16717362830052426) / 1.0333394966054072``. Images: the shorter side to 224 (bicubic), the
centre crop, CLIP's mean and std (in torch here, differentiable).

The weights (``ImageReward.pt`` of hub repo ``THUDM/ImageReward``) and the tokenizer
(``google-bert/bert-base-uncased``) come from a path or the local Hugging Face cache, never the network.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from diffusion_gym.extras import require
from diffusion_gym.models import MissingWeightsError
from diffusion_gym.nets import _cached_hub_file, _explicit_path, _hf_cache_dir, _rgb_float
from diffusion_gym.rewards.aesthetic import AestheticMLP
from diffusion_gym.rewards.preference import OPENAI_MEAN, OPENAI_STD, scorer_reward, square_resize
from diffusion_gym.rewards.registry import RewardFn

__all__ = [
    "IMAGE_REWARD_FILE",
    "IMAGE_REWARD_MEAN",
    "IMAGE_REWARD_STD",
    "ImageRewardScorer",
    "convert_image_reward_state_dict",
    "image_reward",
    "image_reward_configs",
]

IMAGE_REWARD_FILE = ("THUDM/ImageReward", "ImageReward.pt")
IMAGE_REWARD_ENV = "DIFFUSION_GYM_IMAGE_REWARD_WEIGHTS"
BERT_TOKENIZER = "google-bert/bert-base-uncased"
IMAGE_REWARD_MEAN = 0.16717362830052426
IMAGE_REWARD_STD = 1.0333394966054072
PROMPT_TOKENS = 35
"""ImageReward pads and truncates prompts to this many tokens."""


def image_reward_configs(**sizes: Any) -> tuple[Any, Any]:
    """The ``(BlipVisionConfig, BlipTextConfig)`` of ImageReward (``sizes`` override them, for tests).

    Vision keys: ``vision_width``, ``vision_layers``, ``vision_heads``, ``image_size``, ``patch_size``;
    text keys: ``text_width``, ``text_layers``, ``text_heads``, ``vocab_size``.
    """
    transformers = require("transformers", "text", "the image_reward reward")
    width = sizes.get("vision_width", 1024)
    vision = transformers.BlipVisionConfig(
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=sizes.get("vision_layers", 24),
        num_attention_heads=sizes.get("vision_heads", 16),
        image_size=sizes.get("image_size", 224),
        patch_size=sizes.get("patch_size", 16),
        hidden_act="gelu",
        layer_norm_eps=1e-6,
    )
    text_width = sizes.get("text_width", 768)
    text = transformers.BlipTextConfig(
        vocab_size=sizes.get("vocab_size", 30524),
        hidden_size=text_width,
        encoder_hidden_size=width,
        intermediate_size=4 * text_width,
        num_hidden_layers=sizes.get("text_layers", 12),
        num_attention_heads=sizes.get("text_heads", 12),
        max_position_embeddings=512,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        is_decoder=True,  # builds the cross-attention layers; the forward runs bidirectionally (is_decoder=False)
    )
    return vision, text


def _vision_key(key: str) -> str | None:
    """BLIP ViT parameter name → ``BlipVisionModel``'s (``None``: not a parameter of it)."""
    fixed = {
        "cls_token": "embeddings.class_embedding",
        "pos_embed": "embeddings.position_embedding",
        "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
        "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
        "norm.weight": "post_layernorm.weight",
        "norm.bias": "post_layernorm.bias",
    }
    if key in fixed:
        return fixed[key]
    if not key.startswith("blocks."):
        return None
    _, index, rest = key.split(".", 2)
    for old, new in (
        ("norm1.", "layer_norm1."),
        ("norm2.", "layer_norm2."),
        ("attn.qkv.", "self_attn.qkv."),
        ("attn.proj.", "self_attn.projection."),
        ("mlp.fc1.", "mlp.fc1."),
        ("mlp.fc2.", "mlp.fc2."),
    ):
        if rest.startswith(old):
            return f"encoder.layers.{index}.{new}{rest[len(old) :]}"
    return None


def convert_image_reward_state_dict(state: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Split ``ImageReward.pt``'s state dict into ``{"vision", "text", "mlp"}`` state dicts of this module's parts.

    Buffers (``position_ids``) and BLIP's contrastive projections, which the score does not use, are dropped.

    Raises:
        ValueError: for a BLIP ViT parameter without a counterpart (a checkpoint of another layout).
    """
    out: dict[str, dict[str, Tensor]] = {"vision": {}, "text": {}, "mlp": {}}
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            name = _vision_key(key[len("blip.visual_encoder.") :])
            if name is None:
                raise ValueError(f"ImageReward checkpoint key {key!r} has no counterpart in BlipVisionModel")
            out["vision"][name] = value
        elif key.startswith("blip.text_encoder.") and not key.endswith("position_ids"):
            out["text"][key[len("blip.text_encoder.") :]] = value
        elif key.startswith("mlp."):
            out["mlp"][key[len("mlp.") :]] = value
    return out


class ImageRewardScorer(nn.Module):
    """ImageReward's score of images in ``[0, 1]`` for their prompts (see the module docstring).

    Args:
        vision: a ``BlipVisionModel``.
        text: a ``BlipTextModel`` with cross-attention layers (no pooler).
        head: the MLP (its input is ``text``'s width).
        tokenizer: bert-base-uncased with ``[DEC]`` and ``[ENC]`` added.
    """

    def __init__(self, vision: nn.Module, text: nn.Module, head: nn.Module, tokenizer: Any) -> None:
        super().__init__()
        self.vision, self.text, self.head, self.tokenizer = vision, text, head, tokenizer
        self.image_size = int(vision.config.image_size)
        self.register_buffer("mean", torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(OPENAI_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> ImageRewardScorer:
        """Keep the model in eval mode (dropout off); ``train(True)`` is ignored."""
        return super().train(False)

    def forward(self, images: Tensor, prompts: list[str]) -> Tensor:
        """The ``(B,)`` float32 ImageReward scores."""
        if isinstance(prompts, str) or not isinstance(prompts, list | tuple) or len(prompts) != images.shape[0]:
            raise ValueError(f"image_reward needs one prompt per image ({images.shape[0]}), got {prompts!r:.80}")
        x = square_resize(_rgb_float(images, self.mean.device), self.image_size, "crop").clamp(0.0, 1.0)
        image_tokens = self.vision(pixel_values=(x - self.mean) / self.std).last_hidden_state
        tokens = self.tokenizer(
            [str(p) for p in prompts],
            padding="max_length",
            truncation=True,
            max_length=PROMPT_TOKENS,
            return_tensors="pt",
        ).to(self.mean.device)
        states = self.text(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            encoder_hidden_states=image_tokens,
            encoder_attention_mask=torch.ones(image_tokens.shape[:2], dtype=torch.long, device=image_tokens.device),
            is_decoder=False,
        ).last_hidden_state
        return ((self.head(states[:, 0]).squeeze(-1) - IMAGE_REWARD_MEAN) / IMAGE_REWARD_STD).float()


def _image_reward_weights(weights: str | os.PathLike[str] | None, cache: str) -> str:
    how = f"Pass weights=/path/to/{IMAGE_REWARD_FILE[1]} or set {IMAGE_REWARD_ENV}."
    if weights is not None:
        return _explicit_path(weights, "ImageReward weights", how)
    if os.environ.get(IMAGE_REWARD_ENV):
        return _explicit_path(os.environ[IMAGE_REWARD_ENV], f"ImageReward weights (${IMAGE_REWARD_ENV})", how)
    path = _cached_hub_file(*IMAGE_REWARD_FILE, cache)
    if path is None:
        raise MissingWeightsError(
            f"Weights of the image_reward reward are missing (never downloaded at run time): {IMAGE_REWARD_FILE[1]} "
            f"of hub repo {IMAGE_REWARD_FILE[0]!r}, looked for in the Hugging Face cache {cache}. Provide it with "
            f"`hf download {IMAGE_REWARD_FILE[0]} {IMAGE_REWARD_FILE[1]}` on a machine with internet and copy the "
            f"cache here, or {how} For tests, random_init=True needs no file."
        )
    return path


def _bert_tokenizer(tokenizer: str | os.PathLike[str] | None, cache: str) -> Any:
    transformers = require("transformers", "text", "the image_reward reward")
    source = os.fspath(tokenizer) if tokenizer is not None else BERT_TOKENIZER
    try:
        loaded = transformers.AutoTokenizer.from_pretrained(source, cache_dir=cache, local_files_only=True)
    except OSError:
        raise MissingWeightsError(
            f"The tokenizer of the image_reward reward is missing: {source!r} (bert-base-uncased), looked for in "
            f"the Hugging Face cache {cache}. Provide it with `hf download {BERT_TOKENIZER} vocab.txt "
            "tokenizer.json tokenizer_config.json config.json` on a machine with internet, or pass tokenizer= a folder."
        ) from None
    loaded.add_special_tokens({"bos_token": "[DEC]"})
    loaded.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return loaded


def image_reward(
    weights: str | os.PathLike[str] | None = None,
    tokenizer: str | os.PathLike[str] | None = None,
    *,
    random_init: bool = False,
    sizes: dict[str, Any] | None = None,
    differentiable: bool = False,
    device: str = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
) -> RewardFn:
    """Factory of the ``image_reward`` reward (see the module docstring).

    Args:
        weights: ``ImageReward.pt`` (default: ``$DIFFUSION_GYM_IMAGE_REWARD_WEIGHTS``, then the cache).
        tokenizer: a bert-base-uncased tokenizer folder or hub id (default: the cache's).
        random_init: random weights of the architecture (no weight file; the tokenizer is still needed).
        sizes: :func:`image_reward_configs`'s overrides (tests build a small one).
        differentiable: keep the graph to the images.
        device: where the model runs.
        cache_dir: the Hugging Face hub cache to look in.

    Raises:
        MissingWeightsError: naming the file or tokenizer and how to provide it.
    """
    transformers = require("transformers", "text", "the image_reward reward")
    cache = _hf_cache_dir(cache_dir)
    path = None if random_init else _image_reward_weights(weights, cache)  # what is missing fails before any build
    bert_tokenizer = _bert_tokenizer(tokenizer, cache)
    vision_config, text_config = image_reward_configs(**(sizes or {}))
    vision = transformers.BlipVisionModel(vision_config)
    text = transformers.BlipTextModel(text_config, add_pooling_layer=False)
    head = AestheticMLP(text_config.hidden_size)  # the same 768 → … → 1 MLP as LAION's aesthetic head
    if path is not None:
        state = torch.load(path, map_location="cpu", weights_only=True)
        parts = convert_image_reward_state_dict(state.get("state_dict", state))
        vision.load_state_dict(parts["vision"])
        missing, unexpected = text.load_state_dict(parts["text"], strict=False)
        missing = [key for key in missing if not key.endswith("position_ids")]  # a buffer, not in every checkpoint
        if missing or unexpected:
            raise ValueError(f"ImageReward text encoder: missing {missing[:5]}, unexpected {unexpected[:5]}")
        head.load_state_dict(parts["mlp"])
    return scorer_reward(ImageRewardScorer(vision, text, head, bert_tokenizer).to(device), differentiable)
