"""Image–text preference rewards on CLIP-style dual encoders: CLIP score, PickScore and HPS v2.1.

Each embeds the images and their prompts, L2-normalises both and scores ``scale · cos``:

* ``clip_score``: open_clip's ViT-L-14 with OpenAI's weights (the CLIP file ``laion_aesthetic`` reads);
  shorter side to 224, centre crop; ``max(100 · cos, 0)``, torchmetrics' CLIPScore.
* ``pickscore``: transformers' ``CLIPModel`` (ViT-H-14) of ``yuvalkirstain/PickScore_v1`` with the tokenizer
  of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``; shorter side to 224, centre crop; ``exp(logit_scale) · cos``,
  PickScore's own score.
* ``hpsv2``: open_clip's ViT-H-14 with the ``state_dict`` of ``HPS_v2.1_compressed.pt`` (hub repo
  ``xswu/HPSv2``); longer side to 224, zero-padded to a square (open_clip's ``ResizeMaxSize``); ``cos``,
  as hpsv2's ``score``.

The packages ``hpsv2`` and ``image-reward`` do not install next to this project's dependencies
(``hpsv2`` pins ``pytest==7.2`` and ``protobuf<4``; ``image-reward`` pins ``timm==0.6.13``), so
HPS v2.1 is built here from open_clip's ViT-H-14 and the published checkpoint, with hpsv2's
preprocessing and score.

The preprocessing runs in torch on the ``[0, 1]`` images, so the rewards are differentiable with
respect to the images (``differentiable=True``); prompts come as the reward's conditions. Weights come
from a path, an environment variable or the local Hugging Face cache; when they are missing,
:class:`~diffusion_gym.models.MissingWeightsError` names the files and the ``hf download`` command.
``random_init=True`` builds the real architecture with random weights (for tests and benchmarks).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_gym.extras import require
from diffusion_gym.models import MissingWeightsError
from diffusion_gym.nets import _cached_hub_file, _explicit_path, _hf_cache_dir, _resolve_clip_weights, _rgb_float
from diffusion_gym.rewards.registry import RewardFn

__all__ = [
    "HPS_FILE",
    "HPS_WEIGHTS_ENV",
    "PICKSCORE_PROCESSOR",
    "PICKSCORE_REPO",
    "DualEncoderScorer",
    "clip_score",
    "hpsv2",
    "pickscore",
    "scorer_reward",
    "square_resize",
]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
PICKSCORE_REPO = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
HPS_FILE = ("xswu/HPSv2", "HPS_v2.1_compressed.pt")
HPS_WEIGHTS_ENV = "DIFFUSION_GYM_HPS_WEIGHTS"


def square_resize(images: Tensor, size: int, mode: str = "crop") -> Tensor:
    """``(B, 3, H, W)`` images to ``size × size``, differentiably (bicubic, antialiased).

    ``"crop"``: the shorter side to ``size``, then the centre crop (CLIP's preprocessing); ``"pad"``: the
    longer side to ``size``, then zeros around the image to a square (open_clip's ``ResizeMaxSize``).
    """
    height, width = images.shape[-2:]
    scale = size / (min(height, width) if mode == "crop" else max(height, width))
    new_h, new_w = round(height * scale), round(width * scale)
    if mode == "crop":
        new_h, new_w = max(size, new_h), max(size, new_w)
    if (new_h, new_w) != (height, width):
        images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    if mode == "crop":
        top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
        return images[..., top : top + size, left : left + size]
    pad_h, pad_w = size - new_h, size - new_w
    return F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))


class DualEncoderScorer(nn.Module):
    """``scale · cos(image embedding, prompt embedding)`` of images in ``[0, 1]`` and their prompts.

    Args:
        model: the dual encoder (frozen here, kept in eval mode).
        encode_image: normalised ``(B, 3, S, S)`` pixels → ``(B, D)`` embeddings.
        encode_text: prompts → ``(B, D)`` embeddings.
        scale: the factor of the cosine, or a callable returning it (a learnt logit scale).
        floor: the lowest score (``None``: none).
        image_size: ``S``.
        mode: ``"crop"`` or ``"pad"`` (:func:`square_resize`).
    """

    def __init__(
        self,
        model: nn.Module,
        encode_image: Callable[[Tensor], Tensor],
        encode_text: Callable[[list[str]], Tensor],
        scale: float | Callable[[], Tensor],
        floor: float | None = None,
        image_size: int = 224,
        mode: str = "crop",
    ) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.encode_image, self.encode_text = encode_image, encode_text
        self.scale, self.floor, self.image_size, self.mode = scale, floor, image_size, mode
        self.register_buffer("mean", torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(OPENAI_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> DualEncoderScorer:
        """Keep the model in eval mode; ``train(True)`` is ignored."""
        return super().train(False)

    def preprocess(self, images: Tensor) -> Tensor:
        """Normalised ``(B, 3, S, S)`` float32 pixels of images in ``[0, 1]`` (grey repeated to RGB)."""
        x = square_resize(_rgb_float(images, self.mean.device), self.image_size, self.mode).clamp(0.0, 1.0)
        return (x - self.mean) / self.std

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """The ``(B,)`` float32 scores of each image for its prompt."""
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) != images.shape[0]:
            raise ValueError(
                f"a preference reward needs one prompt per image ({images.shape[0]}), got {type(prompts).__name__}"
            )
        image = F.normalize(self.encode_image(self.preprocess(images)).float(), dim=-1)
        with torch.no_grad():
            text = F.normalize(self.encode_text([str(p) for p in prompts]).float(), dim=-1)
        scale = self.scale() if callable(self.scale) else self.scale
        score = scale * (image * text.to(image.device)).sum(-1)
        return score.clamp(min=self.floor) if self.floor is not None else score


def scorer_reward(scorer: nn.Module, differentiable: bool) -> RewardFn:
    """A reward calling ``scorer(images, prompts)``, under ``torch.no_grad()`` unless ``differentiable``."""

    def reward(images: Tensor, conditions: Any = None) -> Tensor:
        if differentiable:
            return scorer(images, conditions)
        with torch.no_grad():
            return scorer(images, conditions)

    reward.scorer = scorer  # type: ignore[attr-defined]
    return reward


def _open_clip_scorer(
    model_name: str, checkpoint: str | None, state_dict: dict[str, Tensor] | None, **options: Any
) -> DualEncoderScorer:
    open_clip = require("open_clip", "clip", "the CLIP-based preference rewards")
    quick_gelu = model_name == "ViT-L-14"  # OpenAI's CLIP was trained with QuickGELU; LAION's ViT-H-14 was not
    model = open_clip.create_model(model_name, pretrained=checkpoint, force_quick_gelu=quick_gelu)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    tokenizer = open_clip.get_tokenizer(model_name)
    device = options.pop("device", "cpu")
    scorer = DualEncoderScorer(
        model,
        model.encode_image,
        lambda prompts: model.encode_text(tokenizer(prompts).to(device)),
        **options,
    )
    return scorer.to(device)


def clip_score(
    clip_weights: str | os.PathLike[str] | None = None,
    *,
    random_init: bool = False,
    differentiable: bool = False,
    device: str = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
) -> RewardFn:
    """Factory of the ``clip_score`` reward: ``max(100 · cos, 0)`` on OpenAI's CLIP ViT-L-14 (see the module).

    Args:
        clip_weights: an open_clip ViT-L-14 ``'openai'`` checkpoint (default: ``$DIFFUSION_GYM_CLIP_WEIGHTS``,
            then the Hugging Face cache), the same file as ``laion_aesthetic``'s.
        random_init: random weights of the real architecture, no file needed.
        differentiable: keep the graph to the images.
        device: where the model runs.
        cache_dir: the Hugging Face hub cache to look in.

    Raises:
        MissingWeightsError: naming the file and how to provide it.
    """
    checkpoint = None
    if not random_init:
        checkpoint, missing = _resolve_clip_weights(clip_weights, _hf_cache_dir(cache_dir))
        if missing:
            raise MissingWeightsError(f"Weights of the clip_score reward are missing:\n{missing}")
    scorer = _open_clip_scorer("ViT-L-14", checkpoint, None, scale=100.0, floor=0.0, device=device)
    return scorer_reward(scorer, differentiable)


def _hps_checkpoint(weights: str | os.PathLike[str] | None, cache_dir: str | os.PathLike[str] | None) -> str:
    how = f"Pass weights=/path/to/{HPS_FILE[1]} or set {HPS_WEIGHTS_ENV}."
    if weights is not None:
        return _explicit_path(weights, "HPS v2.1 weights", how)
    if os.environ.get(HPS_WEIGHTS_ENV):
        return _explicit_path(os.environ[HPS_WEIGHTS_ENV], f"HPS v2.1 weights (${HPS_WEIGHTS_ENV})", how)
    cache = _hf_cache_dir(cache_dir)
    path = _cached_hub_file(*HPS_FILE, cache)
    if path is None:
        raise MissingWeightsError(
            f"Weights of the hpsv2 reward are missing (never downloaded at run time): {HPS_FILE[1]} of hub repo "
            f"{HPS_FILE[0]!r}, looked for in the Hugging Face cache {cache}. Provide it with `hf download "
            f"{HPS_FILE[0]} {HPS_FILE[1]}` on a machine with internet and copy the cache here, or {how} "
            "For tests, random_init=True needs no file."
        )
    return path


def hpsv2(
    weights: str | os.PathLike[str] | None = None,
    *,
    random_init: bool = False,
    differentiable: bool = False,
    device: str = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
    model_name: str = "ViT-H-14",
) -> RewardFn:
    """Factory of the ``hpsv2`` reward: HPS v2.1's ``cos`` on open_clip's ViT-H-14 (see the module).

    Args:
        weights: ``HPS_v2.1_compressed.pt`` (default: ``$DIFFUSION_GYM_HPS_WEIGHTS``, then the Hugging Face
            cache); its ``state_dict`` is open_clip's ViT-H-14's, loaded strictly.
        random_init: random weights of the real architecture, no file needed.
        differentiable: keep the graph to the images.
        device: where the model runs.
        cache_dir: the Hugging Face hub cache to look in.
        model_name: the open_clip architecture (ViT-H-14 for HPS v2.1; another for tests).

    Raises:
        MissingWeightsError: naming the file and how to provide it.
    """
    state = None
    if not random_init:
        loaded = torch.load(_hps_checkpoint(weights, cache_dir), map_location="cpu", weights_only=True)
        state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
    scorer = _open_clip_scorer(model_name, None, state, scale=1.0, mode="pad", device=device)
    return scorer_reward(scorer, differentiable)


def _pickscore_parts(weights: str | None, processor: str | None, cache_dir: str | None) -> tuple[Any, Any]:
    transformers = require("transformers", "text", "the pickscore reward")
    where = {"cache_dir": cache_dir, "local_files_only": True}
    try:
        model = transformers.CLIPModel.from_pretrained(weights or PICKSCORE_REPO, **where)
        tokenizer = transformers.AutoTokenizer.from_pretrained(processor or weights or PICKSCORE_PROCESSOR, **where)
    except OSError as error:
        raise MissingWeightsError(
            f"Weights of the pickscore reward are missing (never downloaded at run time): the CLIPModel of "
            f"{weights or PICKSCORE_REPO!r} and the tokenizer of {processor or PICKSCORE_PROCESSOR!r} "
            f"({' '.join(str(error).split())[:200]}). Provide them with `hf download {PICKSCORE_REPO}` and "
            f"`hf download {PICKSCORE_PROCESSOR} tokenizer.json tokenizer_config.json vocab.json merges.txt "
            "special_tokens_map.json` on a machine with internet and copy the cache here, or pass weights= and "
            "processor= folders. For tests, random_init=True with config= and processor= needs no weights."
        ) from None
    return model, tokenizer


def pickscore(
    weights: str | os.PathLike[str] | None = None,
    processor: str | os.PathLike[str] | None = None,
    *,
    random_init: bool = False,
    config: Any = None,
    differentiable: bool = False,
    device: str = "cpu",
    cache_dir: str | os.PathLike[str] | None = None,
) -> RewardFn:
    """Factory of the ``pickscore`` reward: ``exp(logit_scale) · cos`` of PickScore's CLIPModel (see the module).

    Args:
        weights: a CLIPModel folder or hub id (default ``yuvalkirstain/PickScore_v1``, from the cache).
        processor: the tokenizer's folder or hub id (default ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``).
        random_init: random weights: of ``config`` (a ``CLIPConfig``), else of the real checkpoint's config
            (read from ``weights``); the tokenizer still comes from ``processor``.
        config: the ``CLIPConfig`` of ``random_init``.
        differentiable: keep the graph to the images.
        device: where the model runs.
        cache_dir: the Hugging Face hub cache to look in.

    Raises:
        MissingWeightsError: naming the repositories and how to provide them.
    """
    transformers = require("transformers", "text", "the pickscore reward")
    folder = None if weights is None else os.fspath(weights)
    tokenizer_source = None if processor is None else os.fspath(processor)
    cache = None if cache_dir is None else os.fspath(cache_dir)
    if random_init:
        if config is None:
            config = transformers.CLIPConfig.from_pretrained(folder or PICKSCORE_REPO, local_files_only=True)
        model = transformers.CLIPModel(config)
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_source or PICKSCORE_PROCESSOR)
    else:
        model, tokenizer = _pickscore_parts(folder, tokenizer_source, cache)
    model = model.to(device)
    positions = model.config.text_config.max_position_embeddings

    def encode_text(prompts: list[str]) -> Tensor:
        tokens = tokenizer(prompts, padding=True, truncation=True, max_length=positions, return_tensors="pt").to(device)
        return model.text_projection(model.text_model(**tokens).pooler_output)

    def encode_image(pixels: Tensor) -> Tensor:
        return model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)

    size = model.config.vision_config.image_size
    scorer = DualEncoderScorer(model, encode_image, encode_text, scale=lambda: model.logit_scale.exp(), image_size=size)
    return scorer_reward(scorer.to(device), differentiable)
