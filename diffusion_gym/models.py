"""Load a diffusion model (UNet + noise scheduler) from a spec string.

One function, :func:`load_model`, understands every place a model can come from:

======================================  ====================================================
spec                                    what it loads
======================================  ====================================================
``"embedded:digits"`` (the default)     the shipped class-conditional 16×16 digits DDPM
``"random:celebahq-256"``               google/ddpm-celebahq-256's architecture, random init
``"random:digits"``                     the embedded architecture, random init
``"google/ddpm-celebahq-256"``          a Hugging Face hub id (cache first; see below)
``"/path/to/dir"``                      a local diffusers directory: a pipeline directory
                                        (``model_index.json`` + ``unet/`` + ``scheduler/``)
                                        or a UNet directory (``config.json`` [+
                                        ``scheduler_config.json``])
======================================  ====================================================

Hub ids are read from the local Hugging Face cache. The network is tried only when downloads are
allowed (``allow_download=True``, or ``None`` and ``HF_HUB_OFFLINE`` unset); when the weights are
neither cached nor downloadable, :class:`MissingWeightsError` names the id, the file that is
missing, the cache directory and how to provide the files.

The returned scheduler is a diffusers ``DDIMScheduler`` (default) or ``DDPMScheduler`` built from
the model's saved scheduler config, so a DDPM-trained model can be sampled with DDIM as in the
paper.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
EMBEDDED_DIR = ASSETS_DIR / "digits-ddpm"
EMBEDDED_T2I_DIR = ASSETS_DIR / "digits-t2i"
"""The embedded text-to-image flow model (``"embedded:digits-t2i"``, ``scripts/train_digits_t2i.py``)."""
DEFAULT_MODEL = "embedded:digits"
SCHEDULER_KINDS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}

# The architectures behind "random:<name>" (and, for "digits", the shipped model).
ARCHITECTURES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # google/ddpm-celebahq-256: 113.7 M parameters, linear betas, clip_sample, fixed_small variance.
    "celebahq-256": (
        {
            "sample_size": 256,
            "in_channels": 3,
            "out_channels": 3,
            "layers_per_block": 2,
            "block_out_channels": (128, 128, 256, 256, 512, 512),
            "down_block_types": ("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
            "act_fn": "silu",
            "attention_head_dim": None,
            "center_input_sample": False,
            "downsample_padding": 0,
            "flip_sin_to_cos": False,
            "freq_shift": 1,
            "mid_block_scale_factor": 1,
            "norm_eps": 1e-6,
            "norm_num_groups": 32,
            "time_embedding_type": "positional",
        },
        {
            "num_train_timesteps": 1000,
            "beta_start": 0.0001,
            "beta_end": 0.02,
            "beta_schedule": "linear",
            "clip_sample": True,
            "variance_type": "fixed_small",
        },
    ),
    # The embedded digits model: 1.1 M parameters, class-conditional (c = digit 0–9), 1×16×16.
    "digits": (
        {
            "sample_size": 16,
            "in_channels": 1,
            "out_channels": 1,
            "layers_per_block": 1,
            "block_out_channels": (32, 64, 64),
            "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
            "attention_head_dim": 8,
            "norm_num_groups": 8,
            "num_class_embeds": 10,
        },
        {
            "num_train_timesteps": 1000,
            "beta_schedule": "squaredcos_cap_v2",
            "clip_sample": True,
            "prediction_type": "epsilon",
            "variance_type": "fixed_small",
        },
    ),
}


class MissingWeightsError(FileNotFoundError):
    """Raised when a model's weights are neither on disk nor downloadable."""


class LoadedModel(NamedTuple):
    """What :func:`load_model` returns."""

    unet: UNet2DModel
    """The denoising network, in eval mode."""
    scheduler: SchedulerMixin
    """A fresh noise scheduler (``DDIMScheduler`` or ``DDPMScheduler``) with the model's config."""


def build_architecture(name: str) -> LoadedModel:
    """A randomly initialised UNet and its DDPM training scheduler for a known architecture.

    Args:
        name: one of ``ARCHITECTURES`` (``"celebahq-256"``, ``"digits"``).

    Raises:
        ValueError: for an unknown name.
    """
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; valid choices: {sorted(ARCHITECTURES)}")
    unet_config, scheduler_config = ARCHITECTURES[name]
    return LoadedModel(UNet2DModel(**unet_config), DDPMScheduler(**scheduler_config))


def _make_scheduler(config: dict[str, Any], kind: str) -> SchedulerMixin:
    if kind not in SCHEDULER_KINDS:
        raise ValueError(f"unknown scheduler {kind!r}; valid choices: {sorted(SCHEDULER_KINDS)}")
    return SCHEDULER_KINDS[kind].from_config(config)


def _hf_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def downloads_allowed(allow_download: bool | None = None) -> bool:
    """``allow_download``, or (``None``) whether ``HF_HUB_OFFLINE`` leaves hub downloads on."""
    if allow_download is not None:
        return allow_download
    from huggingface_hub import constants

    return not (constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"))


def _resolve_hub(repo_id: str, allow_download: bool | None, cache_dir: str | None) -> Path:
    """Return a local snapshot directory of ``repo_id``, from the cache or (if allowed) the hub."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.bin"]
    cache = cache_dir or _hf_cache_dir()
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True, cache_dir=cache_dir))
        _find_unet_dir(path)  # raises if the snapshot has no model files
        return path
    except Exception as cached_error:  # noqa: BLE001 - any cache miss falls through to the clear error
        reason = f"not in the cache ({type(cached_error).__name__})"
        if downloads_allowed(allow_download):
            try:
                return Path(snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache_dir))
            except Exception as download_error:  # noqa: BLE001
                reason = f"not in the cache, and the download failed: {download_error}"
        else:
            reason += "; downloads are off (HF_HUB_OFFLINE=1 or allow_download=False)"
    snapshot = Path(cache) / f"models--{repo_id.replace('/', '--')}" / "snapshots" / "<revision>"
    raise MissingWeightsError(
        f"Weights for model {repo_id!r} are missing: {reason}. Expected file: "
        f"{snapshot}/unet/config.json (or config.json) with its diffusion_pytorch_model.safetensors/.bin. "
        f"Cache directory: {cache}. To provide them: run `huggingface-cli download {repo_id}` on a machine "
        f"with internet and copy {Path(cache) / ('models--' + repo_id.replace('/', '--'))} into this cache "
        "(or set HF_HOME), or download the repository to a folder and pass that folder as the model "
        "(`model=/path/to/dir`, CLI flag `--weights /path/to/dir`)."
    )


def _find_unet_dir(path: Path) -> tuple[Path, Path | None]:
    """Locate the UNet and scheduler configs inside a diffusers directory."""
    if (path / "model_index.json").is_file() and (path / "unet" / "config.json").is_file():
        scheduler = path / "scheduler" / "scheduler_config.json"
        return path / "unet", scheduler if scheduler.is_file() else None
    if (path / "config.json").is_file():
        scheduler = path / "scheduler_config.json"
        if not scheduler.is_file():
            scheduler = path / "scheduler" / "scheduler_config.json"
        return path, scheduler if scheduler.is_file() else None
    raise MissingWeightsError(
        f"{path} is not a diffusers model directory: expected {path / 'model_index.json'} with "
        f"{path / 'unet' / 'config.json'}, or {path / 'config.json'} (UNet2DModel.save_pretrained)."
    )


def _load_dir(path: Path) -> tuple[UNet2DModel, dict[str, Any]]:
    unet_dir, scheduler_path = _find_unet_dir(path)
    weights = [unet_dir / name for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")]
    if not any(w.is_file() for w in weights):
        raise MissingWeightsError(
            f"UNet weights missing in {unet_dir}: expected {weights[0].name} or {weights[1].name}. "
            "Write them with UNet2DModel.save_pretrained or download the model's files into that folder."
        )
    unet = UNet2DModel.from_pretrained(unet_dir)
    if scheduler_path is None:
        scheduler_config: dict[str, Any] = {}  # diffusers' DDPM defaults (linear betas, 1000 steps)
    else:
        scheduler_config = json.loads(scheduler_path.read_text())
    return unet, scheduler_config


def is_embedded_digits(unet: torch.nn.Module) -> bool:
    """Whether ``unet`` was loaded from the shipped ``embedded:digits`` model."""
    origin = getattr(getattr(unet, "config", None), "_name_or_path", None)
    return bool(origin) and Path(origin).resolve().parent == EMBEDDED_DIR.resolve()


def load_model(
    spec: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    scheduler: str = "ddim",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    allow_download: bool | None = None,
    cache_dir: str | None = None,
    seed: int = 0,
    scheduler_overrides: dict[str, Any] | None = None,
) -> LoadedModel:
    """Load a UNet and a noise scheduler from a spec.

    Args:
        spec: ``"embedded:digits"``, ``"random:<architecture>"``, a hub id or a local directory
            (see the module docstring).
        scheduler: ``"ddim"`` (default, as in the paper) or ``"ddpm"``; built from the model's saved
            scheduler config.
        device: where to put the UNet.
        dtype: the UNet's parameter dtype.
        allow_download: hub ids only: ``True`` may download, ``False`` never does, ``None`` follows
            ``HF_HUB_OFFLINE``.
        cache_dir: hub ids only: the Hugging Face cache directory (default: the library's).
        seed: ``random:`` specs only: seed of the random initialisation.
        scheduler_overrides: config keys to override on the scheduler (e.g. ``{"clip_sample": False}``).

    Returns:
        ``LoadedModel(unet, scheduler)`` with the UNet in eval mode.

    Raises:
        ValueError: for an unknown ``embedded:``/``random:`` name or scheduler kind.
        MissingWeightsError: when the weights cannot be found (the message says which file and how to
            provide it).
    """
    if scheduler not in SCHEDULER_KINDS:
        raise ValueError(f"unknown scheduler {scheduler!r}; valid choices: {sorted(SCHEDULER_KINDS)}")
    spec = os.fspath(spec)
    if spec.startswith("embedded:"):
        name = spec.split(":", 1)[1]
        if name != "digits":
            raise ValueError(f"unknown embedded model {spec!r}; valid choices: ['embedded:digits']")
        unet, scheduler_config = _load_dir(EMBEDDED_DIR)
    elif spec.startswith("random:"):
        name = spec.split(":", 1)[1]
        if name not in ARCHITECTURES:
            choices = [f"random:{k}" for k in sorted(ARCHITECTURES)]
            raise ValueError(f"unknown random architecture {spec!r}; valid choices: {choices}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            built = build_architecture(name)
        unet, scheduler_config = built.unet, dict(built.scheduler.config)
    elif Path(spec).expanduser().exists():
        unet, scheduler_config = _load_dir(Path(spec).expanduser())
    elif spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        unet, scheduler_config = _load_dir(_resolve_hub(spec, allow_download, cache_dir))
    else:
        raise MissingWeightsError(
            f"model {spec!r} is neither 'embedded:digits', 'random:<{'|'.join(sorted(ARCHITECTURES))}>', "
            "an existing local diffusers directory, nor a hub id of the form 'owner/name'."
        )
    config = {**scheduler_config, **(scheduler_overrides or {})}
    unet = unet.to(device=device)
    if unet.dtype != dtype:
        unet = unet.to(dtype=dtype)
    return LoadedModel(unet.eval(), _make_scheduler(config, scheduler))
