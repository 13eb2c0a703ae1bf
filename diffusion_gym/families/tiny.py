"""Tiny random text-to-image models built from configs in code: ``random:{sd,sdxl,sd3,flux}-tiny``.

For tests and shape checks without any download, in the manner of diffusers' own pipeline tests: a
two-level ``UNet2DConditionModel`` (channels 32/64, 8×8 latents), a two-level ``AutoencoderKL`` (4
latent channels, scale factor 2: 16×16 images), two-layer CLIP text encoders of width 32 and a CLIP
tokenizer over a small byte-level BPE vocabulary that :func:`write_tiny_clip_vocab` writes (every
byte is a token, so any prompt tokenizes without unknown tokens; a few merges make common prompt
words single tokens). Weights are drawn from a seed; the scheduler is Stable Diffusion's DDIM config
(scaled-linear betas, ``steps_offset=1``, ``set_alpha_to_one=False``) with v-prediction (see
:data:`SD_SCHEDULER`). The flow models take a one-layer transformer; FLUX's T5 encoder reads a
word-level tokenizer (:func:`word_tokenizer`) over the same words.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from diffusion_gym.extras import require
from diffusion_gym.families.base import ModelFamily, place
from diffusion_gym.families.flow_text import FlowTextFamily
from diffusion_gym.families.latent_text import LatentTextFamily

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

TINY_MODELS = ("sd-tiny", "sdxl-tiny", "sd3-tiny", "flux-tiny")
"""The names after ``random:``."""
TINY_MAX_LENGTH = 77
"""Token sequence length (the CLIP text encoders' ``max_position_embeddings``)."""
TINY_WORDS = ("a", "an", "the", "photo", "painting", "of", "cat", "dog", "car", "red", "blue", "in", "on")
"""Words the tiny vocabulary merges into single tokens."""
SD_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "v_prediction",
    "timestep_spacing": "leading",
}
"""Stable Diffusion's scheduler config (SD 1.5's ``scheduler_config.json``, with SD 2.x's v-prediction).

The tiny models predict ``v`` (as SD 2.x 768-v does): a *random* network's ε prediction is not the
noise, so the chain's ``x̂0 = (x − √(1−ᾱ) ε̂)/√ᾱ`` grows ~1/√ᾱ at the noisy steps and random samples
reach |x| ≈ 70, outside the env's bounds; with v-prediction ``x̂0 = √ᾱ x − √(1−ᾱ) v̂`` stays at unit
scale. ``scheduler_overrides={"prediction_type": "epsilon"}`` gives SD 1.x's parameterisation."""


def byte_symbols() -> list[str]:
    """The printable symbol byte-level BPE uses for each byte 0…255, in byte order (GPT-2 / CLIP's map).

    Printable Latin-1 bytes stand for themselves; the others (controls, space, …) are shifted to
    code points from 256 on, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    keep = set(printable)
    symbols, shifted = {}, 0
    for byte in range(256):
        if byte in keep:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + shifted)
            shifted += 1
    return [symbols[byte] for byte in range(256)]


def write_tiny_clip_vocab(folder: Path, words: tuple[str, ...] = TINY_WORDS) -> None:
    """Write a CLIP tokenizer's ``vocab.json`` and ``merges.txt`` into ``folder``.

    The vocabulary: the 256 byte symbols, the same with the end-of-word mark ``</w>``, the merged
    pieces of ``words`` (merged left to right) and ``<|startoftext|>``, ``<|endoftext|>`` last, as in
    CLIP's.
    """
    symbols = byte_symbols()
    vocab = {symbol: i for i, symbol in enumerate(symbols)}
    vocab.update({symbol + "</w>": 256 + i for i, symbol in enumerate(symbols)})
    merges: list[str] = []
    for word in words:
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = f"{pieces[0]} {pieces[1]}"
            if pair not in merges:
                merges.append(pair)
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
            vocab.setdefault(pieces[0], len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer over :func:`write_tiny_clip_vocab`'s vocabulary (written to a temporary folder)."""
    transformers = require("transformers", "text", "latent-text model families (Stable Diffusion, SDXL)")
    with tempfile.TemporaryDirectory(prefix="diffusion-gym-tiny-clip-") as folder:
        write_tiny_clip_vocab(Path(folder))
        return transformers.CLIPTokenizer.from_pretrained(folder, model_max_length=TINY_MAX_LENGTH)


def word_tokenizer(words: tuple[str, ...] = TINY_WORDS, max_length: int = TINY_MAX_LENGTH) -> Any:
    """A T5-style word-level tokenizer (``PreTrainedTokenizerFast``) over ``words``.

    Ids: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then ``words`` (lower-cased; text is split at spaces
    and punctuation); each sequence ends with ``</s>``. It saves as ``tokenizer.json``
    (``save_pretrained``) and loads back with ``AutoTokenizer``.
    """
    transformers = require("transformers", "text", "text-to-image model families")
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in words:
        vocab.setdefault(word.lower(), len(vocab))
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=max_length
    )


def _text_encoder(tokenizer: CLIPTokenizer, projection: bool) -> Any:
    """A two-layer CLIP text encoder of width 32 (``CLIPTextModelWithProjection`` when ``projection``)."""
    import transformers

    config = transformers.CLIPTextConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TINY_MAX_LENGTH,
        projection_dim=32,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return model(config)


def _unet(sdxl: bool) -> UNet2DConditionModel:
    """A two-level UNet over 4×8×8 latents; SDXL's adds the ``text_time`` embedding (6 ids × 8 + 32 pooled)."""
    common: dict[str, Any] = {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    }
    if not sdxl:
        return UNet2DConditionModel(**common, cross_attention_dim=32, attention_head_dim=4)
    return UNet2DConditionModel(
        **common,
        cross_attention_dim=64,  # both text encoders' hidden states, concatenated
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
    )


VAE_LATENT_STATS = {"sd": (0.18215, None), "sdxl": (0.13025, None), "sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}
"""The real models' VAE ``(scaling_factor, shift_factor)``, which the tiny VAEs copy."""


def _vae(kind: str, **overrides: Any) -> AutoencoderKL:
    """A two-level VAE (scale factor 2) with 4 latent channels and the ``kind`` model's scaling (and shift)."""
    scaling, shift = VAE_LATENT_STATS[kind]
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        scaling_factor=scaling,
        shift_factor=shift,
        **overrides,
    )


def _sd3_transformer() -> Any:
    """A one-layer ``SD3Transformer2DModel`` over 4×8×8 latents (patch 1), taking two CLIP encoders' features."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=16,
    )


def build_tiny_family(
    name: str,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    scheduler_overrides: dict[str, Any] | None = None,
    resolution: tuple[int, int] | None = None,
) -> ModelFamily:
    """A tiny random SD (``"sd-tiny"``), SDXL (``"sdxl-tiny"``), SD3 (``"sd3-tiny"``) or FLUX (``"flux-tiny"``) family.

    Args:
        name: one of :data:`TINY_MODELS`.
        seed: seed of the random weights (the global RNG is left as it was).
        device: where to put the components.
        dtype: their parameter dtype.
        scheduler_overrides: scheduler config keys to override (e.g. ``{"prediction_type": "v_prediction"}``).
        resolution: ``(height, width)`` of the images (default: 16×16).

    Raises:
        ValueError: for an unknown name.
        MissingExtraError: when transformers is not installed (the ``text`` extra).
    """
    if name not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {name!r}; valid choices: {list(TINY_MODELS)}")
    if name == "sd3-tiny":
        return _tiny_sd3(seed, device, dtype, scheduler_overrides, resolution)
    if name == "flux-tiny":
        return _tiny_flux(seed, device, dtype, scheduler_overrides, resolution)
    sdxl = name == "sdxl-tiny"
    tokenizer = tiny_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae = _unet(sdxl), _vae("sdxl" if sdxl else "sd")
        encoders = [_text_encoder(tokenizer, projection=False)]
        if sdxl:
            encoders.append(_text_encoder(tokenizer, projection=True))
    scheduler = DDIMScheduler.from_config({**SD_SCHEDULER, **(scheduler_overrides or {})})
    return LatentTextFamily(
        place(unet, device, dtype),
        place(vae, device, dtype),
        [place(encoder, device, dtype) for encoder in encoders],
        [tokenizer] * len(encoders),
        scheduler,
        force_zeros_for_empty_prompt=sdxl,
        resolution=resolution,
    )


SD3_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
"""SD3's ``FlowMatchEulerDiscreteScheduler`` config."""


def _tiny_sd3(
    seed: int,
    device: str | torch.device,
    dtype: torch.dtype,
    scheduler_overrides: dict[str, Any] | None,
    resolution: tuple[int, int] | None,
) -> FlowTextFamily:
    """A tiny random SD3: a one-layer transformer, two projected CLIP encoders, no T5 (zero T5 embeddings)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    tokenizer = tiny_clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer, vae = _sd3_transformer(), _vae("sd3")
        encoders = [_text_encoder(tokenizer, projection=True) for _ in range(2)]
    scheduler = FlowMatchEulerDiscreteScheduler.from_config({**SD3_SCHEDULER, **(scheduler_overrides or {})})
    return FlowTextFamily(
        place(transformer, device, dtype),
        place(vae, device, dtype),
        [place(encoder, device, dtype) for encoder in encoders],
        [tokenizer, tokenizer],
        scheduler,
        max_sequence_length=16,
        resolution=resolution,
    )


FLUX_SCHEDULER = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
"""FLUX.1's ``FlowMatchEulerDiscreteScheduler`` config (dynamic shifting by the image's token count)."""


def _flux_parts() -> tuple[Any, AutoencoderKL]:
    """A tiny ``FluxTransformer2DModel`` and VAE.

    The transformer: one double and one single block, the guidance embedding on, over 2×2 patches of
    4×8×8 latents; the VAE: two levels with FLUX.1's scaling and shift, no quant convolutions.
    """
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )
    return transformer, _vae("flux", use_quant_conv=False, use_post_quant_conv=False)


def _t5_encoder(vocab_size: int) -> Any:
    """A two-layer T5 encoder of width 32."""
    import transformers

    config = transformers.T5Config(
        vocab_size=vocab_size,
        d_model=32,
        d_ff=37,
        d_kv=8,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
    )
    return transformers.T5EncoderModel(config)


def _tiny_flux(
    seed: int,
    device: str | torch.device,
    dtype: torch.dtype,
    scheduler_overrides: dict[str, Any] | None,
    resolution: tuple[int, int] | None,
) -> Any:
    """A tiny random FLUX.1-dev: 16×16 images, CLIP (pooled) and T5 encoders of width 32, 16 T5 tokens."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from diffusion_gym.families.flux import FluxFamily

    tokenizer, t5_tokenizer = tiny_clip_tokenizer(), word_tokenizer(max_length=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer, vae = _flux_parts()
        clip = _text_encoder(tokenizer, projection=False)
        t5 = _t5_encoder(len(t5_tokenizer))
    scheduler = FlowMatchEulerDiscreteScheduler.from_config({**FLUX_SCHEDULER, **(scheduler_overrides or {})})
    return FluxFamily(
        place(transformer, device, dtype),
        place(vae, device, dtype),
        (place(clip, device, dtype), tokenizer),
        (place(t5, device, dtype), t5_tokenizer),
        scheduler,
        max_sequence_length=16,
        resolution=resolution or (16, 16),
    )
