"""Load any supported model as a :class:`~diffusion_gym.families.base.ModelFamily`: :func:`load_family`.

==========================================  ==================================================
spec                                        family
==========================================  ==================================================
``"embedded:digits"``, ``"random:digits"``,  pixel (:func:`diffusion_gym.models.load_model`)
``"random:celebahq-256"``
``"random:sd-tiny"``, ``"random:sdxl-tiny"``  latent-text, tiny random components
                                            (:mod:`diffusion_gym.families.tiny`)
``"embedded:digits-t2i"``                   flow-text (SD3-shaped), the shipped text-to-image digits model
``"random:sd3-tiny"``                       flow-text (SD3), tiny random components
``"random:flux-tiny"``                      flux (FLUX.1-dev), tiny random components
a local diffusers folder                    latent-text when its ``model_index.json`` names
                                            ``StableDiffusionPipeline`` or
                                            ``StableDiffusionXLPipeline``; flow-text for
                                            ``StableDiffusion3Pipeline``; flux for
                                            ``FluxPipeline``; pixel for a
                                            ``UNet2DModel`` pipeline or UNet folder
a hub id ``"owner/name"``                   the same, from the Hugging Face cache first
==========================================  ==================================================

Offline first: a hub id is read from the Hugging Face cache without a network call. When it is
missing, it is downloaded (configs, tokenizers, safetensors weights) only if downloads are on
(``HF_HUB_OFFLINE`` unset, or ``allow_download=True``); otherwise
:class:`~diffusion_gym.models.MissingWeightsError` names the repository, the cache folder it should be
in and how to provide it (``hf download`` elsewhere and copy the cache, or pass a local folder).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from diffusion_gym.extras import require
from diffusion_gym.families.base import ModelFamily, place
from diffusion_gym.families.flow_text import FlowTextFamily
from diffusion_gym.families.flux import FluxFamily
from diffusion_gym.families.latent_text import LatentTextFamily
from diffusion_gym.families.pixel import PixelFamily
from diffusion_gym.families.tiny import TINY_MODELS, build_tiny_family
from diffusion_gym.models import (
    ARCHITECTURES,
    DEFAULT_MODEL,
    EMBEDDED_T2I_DIR,
    SCHEDULER_KINDS,
    MissingWeightsError,
    downloads_allowed,
    load_model,
)

LATENT_TEXT_PIPELINES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl"}
"""``model_index.json`` class names of the latent-text family, and their variant."""
FLOW_TEXT_PIPELINES = {"StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux"}
"""``model_index.json`` class names of the flow text-to-image families (SD3's and FLUX's)."""
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
"""The form of a hub id, ``owner/name``."""
_WEIGHTS = {
    "unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
    "text_encoder": ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"),
    "transformer": (
        "diffusion_pytorch_model.safetensors",
        "diffusion_pytorch_model.bin",
        "diffusion_pytorch_model.safetensors.index.json",
    ),
}


def valid_specs() -> list[str]:
    """The forms a spec may take, for messages."""
    randoms = [f"random:{name}" for name in (*sorted(ARCHITECTURES), *TINY_MODELS)]
    return [
        "embedded:digits",
        EMBEDDED_T2I_SPEC,
        *randoms,
        "a local diffusers folder (model_index.json, or a UNet2DModel folder)",
        "a hub id 'owner/name' in the Hugging Face cache",
    ]


def _required_files(variant: str) -> dict[str, list[tuple[str, ...]]]:
    """Per component folder: groups of file names of which one must exist (SD3's T5 is optional, FLUX's not)."""
    denoiser = "transformer" if variant in ("sd3", "flux") else "unet"
    needed: dict[str, list[tuple[str, ...]]] = {
        denoiser: [("config.json",), _WEIGHTS[denoiser]],
        "vae": [("config.json",), _WEIGHTS["vae"]],
        "scheduler": [("scheduler_config.json",)],
    }
    suffixes = ["", "_2"] if variant in ("sdxl", "sd3", "flux") else [""]
    for suffix in suffixes:
        needed[f"text_encoder{suffix}"] = [("config.json",), _WEIGHTS["text_encoder"]]
        needed[f"tokenizer{suffix}"] = [("tokenizer.json", "vocab.json")]
    if variant == "flux":  # T5's tokenizer: a sentencepiece model or a tokenizer.json
        needed["tokenizer_2"] = [("tokenizer.json", "spiece.model")]
    return needed


def missing_files(folder: Path, variant: str) -> list[str]:
    """The files a pipeline folder (``"sd"``, ``"sdxl"``, ``"sd3"``, ``"flux"``) lacks (``a|b``: either will do)."""
    missing = []
    for component, groups in _required_files(variant).items():
        for names in groups:
            if not any((folder / component / name).is_file() for name in names):
                missing.append("|".join(f"{component}/{name}" for name in names))
    return missing


def check_complete(folder: Path, variant: str, class_name: str, source: str | None) -> None:
    """Raise :class:`MissingWeightsError` naming the files a ``class_name`` pipeline folder lacks."""
    missing = missing_files(folder, variant)
    if missing:
        raise MissingWeightsError(
            f"{source or folder} is a {class_name} but lacks {missing} (in {folder}). Provide the complete pipeline "
            "folder (e.g. `hf download <repo>` or the pipeline's save_pretrained)."
        )


def _hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors"]
"""Files of a hub repository a download fetches: configs, tokenizers and safetensors weights (``.bin``
weights only for a repository that has no safetensors)."""
HUB_SKIPPED = ["*.fp16.*", "*non_ema*", "*.ckpt", "*.onnx*", "*.msgpack"]
"""What a download skips: fp16 variants, EMA duplicates and other formats of the same weights."""


def _download(repo_id: str, cache_dir: str | os.PathLike[str] | None) -> Path:
    """Download the files a family loads (:data:`HUB_PATTERNS`) into the cache."""
    from huggingface_hub import HfApi, snapshot_download

    files = HfApi().list_repo_files(repo_id)
    patterns = HUB_PATTERNS + ([] if any(f.endswith(".safetensors") for f in files) else ["*.bin"])
    return Path(snapshot_download(repo_id, allow_patterns=patterns, ignore_patterns=HUB_SKIPPED, cache_dir=cache_dir))


def cached_snapshot(
    repo_id: str, cache_dir: str | os.PathLike[str] | None = None, allow_download: bool | None = None
) -> Path:
    """The local snapshot folder of ``repo_id``: from the Hugging Face cache, else downloaded if allowed.

    Offline first: the cache is read without any network call; a download (configs, tokenizers and
    safetensors weights only) happens only when the cache misses and ``allow_download`` is true
    (``None``: unless ``HF_HUB_OFFLINE`` is set), as :func:`diffusion_gym.models.load_model` does.

    Raises:
        MissingWeightsError: when the cache has no snapshot of it and it was not downloaded (the
            message says how to provide one).
    """
    from huggingface_hub import snapshot_download

    cache = Path(cache_dir) if cache_dir is not None else _hub_cache()
    try:
        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=cache_dir))
    except Exception as error:  # noqa: BLE001 - every cache miss becomes the one clear error
        reason = type(error).__name__
    if downloads_allowed(allow_download):
        try:
            return _download(repo_id, cache_dir)
        except Exception as error:  # noqa: BLE001
            reason = f"{reason}; the download failed: {error}"
    else:
        reason = f"{reason}; downloads are off (HF_HUB_OFFLINE=1 or allow_download=False)"
    repo_folder = cache / f"models--{repo_id.replace('/', '--')}"
    raise MissingWeightsError(
        f"model {repo_id!r} is not in the Hugging Face cache ({reason}). "
        f"Expected {repo_folder}/snapshots/<revision>/ with model_index.json and its component folders "
        "(Stable Diffusion: unet/, vae/, text_encoder/, tokenizer/, scheduler/; SDXL also text_encoder_2/, "
        f"tokenizer_2/). Cache directory: {cache}. To provide it: run `hf download {repo_id}` on a machine with "
        f"internet and copy {repo_folder} into this cache (or point HF_HUB_CACHE / HF_HOME at a cache that has "
        "it), or download the repository to a folder and pass that folder as the model."
    )


def _latent_scheduler(folder: Path, kind: str, overrides: dict[str, Any] | None) -> Any:
    """A DDIM (or DDPM) scheduler from the pipeline's scheduler config (``clip_sample`` off unless set)."""
    if kind not in SCHEDULER_KINDS:
        raise ValueError(f"unknown scheduler {kind!r}; valid choices: {sorted(SCHEDULER_KINDS)}")
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    config.setdefault("clip_sample", False)  # latents are not in [-1, 1]; DDIM's default would clip them
    return SCHEDULER_KINDS[kind].from_config({**config, **(overrides or {})})


def load_latent_text_dir(
    folder: Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    scheduler: str = "ddim",
    scheduler_overrides: dict[str, Any] | None = None,
    source: str | None = None,
    resolution: tuple[int, int] | None = None,
) -> LatentTextFamily:
    """A :class:`LatentTextFamily` from a ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` folder.

    The VAE stays in float32 when ``dtype`` is float16 and its config says ``force_upcast`` (the SDXL
    VAE overflows in fp16, which is why diffusers' pipeline upcasts it to decode).

    Args:
        folder: the pipeline folder (``model_index.json`` and the component folders).
        device: where to put the components.
        dtype: their parameter dtype.
        scheduler: ``"ddim"`` (default) or ``"ddpm"``, built from ``scheduler/scheduler_config.json``.
        scheduler_overrides: scheduler config keys to override.
        source: what the folder is, for messages (default: the folder).
        resolution: ``(height, width)`` of the images (default: the model's).

    Raises:
        MissingWeightsError: when a component's files are missing (named in the message).
        ValueError: when ``model_index.json`` names another pipeline.
    """
    index = json.loads((folder / "model_index.json").read_text())
    class_name = index.get("_class_name")
    if class_name not in LATENT_TEXT_PIPELINES:
        raise ValueError(
            f"unsupported pipeline {class_name!r} in {folder}; valid choices: {sorted(LATENT_TEXT_PIPELINES)}"
        )
    variant = LATENT_TEXT_PIPELINES[class_name]
    check_complete(folder, variant, class_name, source)
    transformers = require("transformers", "text", "latent-text model families (Stable Diffusion, SDXL)")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    vae_dtype = torch.float32 if dtype == torch.float16 and getattr(vae.config, "force_upcast", False) else dtype
    encoder_classes = [transformers.CLIPTextModel]
    if variant == "sdxl":
        encoder_classes.append(transformers.CLIPTextModelWithProjection)
    suffixes = ["", "_2"][: len(encoder_classes)]
    encoders = [
        cls.from_pretrained(folder / f"text_encoder{s}", dtype=dtype)
        for cls, s in zip(encoder_classes, suffixes, strict=True)
    ]
    tokenizers = [transformers.CLIPTokenizer.from_pretrained(folder / f"tokenizer{s}") for s in suffixes]
    return LatentTextFamily(
        unet.to(device),
        place(vae, device, vae_dtype),
        [encoder.to(device) for encoder in encoders],
        tokenizers,
        _latent_scheduler(folder, scheduler, scheduler_overrides),
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", variant == "sdxl")),
        resolution=resolution,
    )


def load_flow_text_dir(
    folder: Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    scheduler: str = "ddim",
    scheduler_overrides: dict[str, Any] | None = None,
    source: str | None = None,
    resolution: tuple[int, int] | None = None,
    max_sequence_length: int = 256,
    default_guidance_scale: float | None = None,
) -> FlowTextFamily:
    """A :class:`FlowTextFamily` from a ``StableDiffusion3Pipeline`` folder (``text_encoder_3``/T5 optional).

    Args:
        folder: the pipeline folder.
        device: where to put the components.
        dtype: their parameter dtype.
        scheduler: ignored (flow models use their ``FlowMatchEulerDiscreteScheduler``); accepted so that
            every folder loads with the same options.
        scheduler_overrides: scheduler config keys to override.
        source: what the folder is, for messages.
        resolution: ``(height, width)`` of the images (default: the model's).
        max_sequence_length: T5 tokens of the conditioning (the pipeline's argument; default 256).
        default_guidance_scale: the guidance scale when none is given (default: SD3's 7.0).

    Raises:
        MissingWeightsError: when a component's files are missing (named in the message).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    check_complete(folder, "sd3", "StableDiffusion3Pipeline", source)
    transformers = require("transformers", "text", "flow text-to-image families (Stable Diffusion 3)")
    transformer = SD3Transformer2DModel.from_pretrained(folder / "transformer", torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    encoders = [
        transformers.CLIPTextModelWithProjection.from_pretrained(folder / f"text_encoder{s}", dtype=dtype).to(device)
        for s in ("", "_2")
    ]
    tokenizers = [transformers.CLIPTokenizer.from_pretrained(folder / f"tokenizer{s}") for s in ("", "_2")]
    t5 = None
    if (folder / "text_encoder_3" / "config.json").is_file():
        t5 = (
            transformers.T5EncoderModel.from_pretrained(folder / "text_encoder_3", dtype=dtype).to(device),
            transformers.AutoTokenizer.from_pretrained(folder / "tokenizer_3"),
        )
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    flow_scheduler = FlowMatchEulerDiscreteScheduler.from_config({**config, **(scheduler_overrides or {})})
    return FlowTextFamily(
        transformer.to(device), place(vae, device, dtype), encoders, tokenizers, flow_scheduler, t5=t5,
        resolution=resolution, max_sequence_length=max_sequence_length,
        **({} if default_guidance_scale is None else {"default_guidance_scale": default_guidance_scale}),
    )  # fmt: skip


def load_flux_dir(
    folder: Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    scheduler: str = "ddim",
    scheduler_overrides: dict[str, Any] | None = None,
    source: str | None = None,
    resolution: tuple[int, int] | None = None,
) -> FluxFamily:
    """A :class:`FluxFamily` from a ``FluxPipeline`` folder (FLUX.1-dev, FLUX.1-schnell).

    Args:
        folder: the pipeline folder.
        device: where to put the components.
        dtype: their parameter dtype.
        scheduler: ignored (FLUX uses its ``FlowMatchEulerDiscreteScheduler``); accepted so that every
            folder loads with the same options.
        scheduler_overrides: scheduler config keys to override.
        source: what the folder is, for messages.
        resolution: ``(height, width)`` of the images (default: the model's).

    Raises:
        MissingWeightsError: when a component's files are missing (named in the message).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    check_complete(folder, "flux", "FluxPipeline", source)
    transformers = require("transformers", "text", "flow text-to-image families (FLUX)")
    transformer = FluxTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    clip = transformers.CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=dtype).to(device)
    t5 = transformers.T5EncoderModel.from_pretrained(folder / "text_encoder_2", dtype=dtype).to(device)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    return FluxFamily(
        transformer.to(device),
        place(vae, device, dtype),
        (clip, transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer")),
        (t5, transformers.AutoTokenizer.from_pretrained(folder / "tokenizer_2")),
        FlowMatchEulerDiscreteScheduler.from_config({**config, **(scheduler_overrides or {})}),
        resolution=resolution,
    )


EMBEDDED_T2I_SPEC = "embedded:digits-t2i"
"""The spec of the shipped text-to-image model."""
EMBEDDED_T2I_GUIDANCE = 3.0
"""Its default classifier-free guidance scale."""


def load_embedded_t2i(
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    scheduler: str = "ddim",
    scheduler_overrides: dict[str, Any] | None = None,
    resolution: tuple[int, int] | None = None,
) -> FlowTextFamily:
    """The shipped text-to-image digits model (``scripts/train_digits_t2i.py``).

    A ``StableDiffusion3Pipeline`` folder, read with no T5 tokens (it was trained without them) and
    guidance 3 by default.

    Raises:
        FileNotFoundError: when the folder is missing from the installation.
    """
    if not (EMBEDDED_T2I_DIR / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the embedded text-to-image model {EMBEDDED_T2I_DIR} is missing: reinstall diffusion-gym, or train it "
            "with `python scripts/train_digits_t2i.py`"
        )
    return load_flow_text_dir(
        EMBEDDED_T2I_DIR,
        device=device,
        dtype=dtype,
        scheduler=scheduler,
        scheduler_overrides=scheduler_overrides,
        source=EMBEDDED_T2I_SPEC,
        resolution=resolution,
        max_sequence_length=0,
        default_guidance_scale=EMBEDDED_T2I_GUIDANCE,
    )


def _load_folder(
    folder: Path, source: str | None, options: dict[str, Any], resolution: tuple[int, int] | None
) -> ModelFamily:
    """The family of a local diffusers folder (latent-text pipeline, else whatever ``load_model`` reads)."""
    index_path = folder / "model_index.json"
    if index_path.is_file():
        class_name = json.loads(index_path.read_text()).get("_class_name")
        if class_name in LATENT_TEXT_PIPELINES:
            return load_latent_text_dir(folder, source=source, resolution=resolution, **options)
        if class_name == "FluxPipeline":
            return load_flux_dir(folder, source=source, resolution=resolution, **options)
        if class_name in FLOW_TEXT_PIPELINES:
            return load_flow_text_dir(folder, source=source, resolution=resolution, **options)
        unet_config = folder / "unet" / "config.json"
        if unet_config.is_file() and json.loads(unet_config.read_text()).get("_class_name") != "UNet2DModel":
            raise ValueError(
                f"unsupported pipeline {class_name!r} in {source or folder}; valid choices: "
                f"{sorted(LATENT_TEXT_PIPELINES) + sorted(FLOW_TEXT_PIPELINES)} or a pipeline of a UNet2DModel"
            )
    _no_resolution(resolution, source or str(folder))
    return PixelFamily.from_loaded(load_model(folder, **options))


def _no_resolution(resolution: tuple[int, int] | None, what: str) -> None:
    if resolution is not None:
        raise ValueError(
            f"resolution {tuple(resolution)} applies to text-to-image (latent) models; {what} is a pixel model "
            "that samples at its UNet's size: use None"
        )


def load_family(
    spec: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    scheduler: str = "ddim",
    scheduler_overrides: dict[str, Any] | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    allow_download: bool | None = None,
    resolution: tuple[int, int] | None = None,
) -> ModelFamily:
    """Load a model as its family (see the module docstring for the specs).

    Args:
        spec: ``"embedded:digits"``, ``"random:<name>"``, a local diffusers folder or a cached hub id.
        device: where to put the model.
        dtype: its parameter dtype.
        scheduler: ``"ddim"`` (default) or ``"ddpm"``, built from the model's scheduler config.
        scheduler_overrides: scheduler config keys to override (e.g. ``{"prediction_type": "v_prediction"}``).
        seed: ``random:`` specs only: the seed of the random weights.
        cache_dir: hub ids only: the Hugging Face hub cache (default: the library's).
        allow_download: hub ids missing from the cache only: ``True`` downloads them, ``False`` never
            does, ``None`` downloads unless ``HF_HUB_OFFLINE`` is set.
        resolution: text-to-image models only: ``(height, width)`` of the generated images (default:
            the model's; Flow-GRPO trains SD3.5 and FLUX at 512).

    Raises:
        ValueError: for a spec of no known form (the message lists the valid forms), an unknown
            ``random:`` / ``embedded:`` name or an unsupported pipeline.
        MissingWeightsError: for a hub id not in the cache or a folder with missing files.
    """
    spec = os.fspath(spec)
    options: dict[str, Any] = {
        "device": device,
        "dtype": dtype,
        "scheduler": scheduler,
        "scheduler_overrides": scheduler_overrides,
    }
    if spec.startswith("random:") and spec.split(":", 1)[1] in TINY_MODELS:
        if scheduler != "ddim":
            raise ValueError(f"tiny models use a DDIM scheduler; valid choice: 'ddim', got {scheduler!r}")
        name = spec.split(":", 1)[1]
        return build_tiny_family(
            name, seed=seed, device=device, dtype=dtype, scheduler_overrides=scheduler_overrides, resolution=resolution
        )
    if spec == EMBEDDED_T2I_SPEC:
        return load_embedded_t2i(resolution=resolution, **options)
    if spec.startswith(("embedded:", "random:")):
        name = spec.split(":", 1)[1]
        if spec.startswith("random:") and name not in ARCHITECTURES:
            raise ValueError(f"unknown model spec {spec!r}; valid forms: {valid_specs()}")
        _no_resolution(resolution, spec)
        return PixelFamily.from_loaded(load_model(spec, seed=seed, **options))
    folder = Path(spec).expanduser()
    if folder.is_dir():
        return _load_folder(folder, None, options, resolution)
    if HUB_ID.match(spec) and not spec.startswith("."):
        snapshot = cached_snapshot(spec, cache_dir, allow_download)
        return _load_folder(snapshot, f"hub model {spec!r}", options, resolution)
    raise ValueError(f"unknown model spec {spec!r} (not an existing folder either); valid forms: {valid_specs()}")
