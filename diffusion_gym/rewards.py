"""Reward functions for diffusion fine-tuning, and a registry to build them by name.

Conventions
-----------
A reward function (:data:`RewardFn`) is any callable ``reward(images, conditions) -> rewards``:

* ``images``: a ``(B, C, H, W)`` float tensor **in [0, 1]** (``C`` = 1 for grey, 3 for RGB). Rewards
  never see the model's ``[-1, 1]`` range; the caller converts (``(x + 1) / 2``, clamped).
* ``conditions``: what the images were generated for: a ``(B,)`` tensor of class ids, a list of ``B``
  prompts, or ``None`` (unconditional). Rewards that do not need it ignore it.
* returns: a ``(B,)`` float32 tensor on ``images.device``, higher is better.

Rewards are built by name with :func:`make_reward` (see :func:`available_rewards`); a user callable
passed to :func:`make_reward` is wrapped so that its output is checked (shape ``(B,)``, finite) and
mistakes surface as a clear ``ValueError`` instead of a silent broadcast in the RL loss.

Registered rewards
------------------
``jpeg_compressibility`` / ``jpeg_incompressibility``
    ∓ the size in kB of the image saved as JPEG at quality 95 with PIL, exactly as ddpo-pytorch
    measures it (uint8 via ``(x * 255).round().clamp(0, 255)``, size = bytes / 1000). Not
    differentiable; the images of a batch are encoded on a thread pool.
``laion_aesthetic``
    The LAION aesthetic predictor ("sac+logos+ava1-l14-linearMSE"): a linear MLP on the
    L2-normalised OpenAI CLIP ViT-L/14 image embedding (:class:`LaionAestheticScorer`, a
    :class:`ClipImageEncoder` with the MLP on top; the encoder alone also serves the Vendi score).
    Differentiable with respect to the images. Weights come from the local Hugging Face cache or a
    path, never from the network; ``random_init=True`` gives random weights of the real shapes.
``digit_confidence``
    For the embedded digits model: the probability the shipped digit classifier gives to the class
    each image was conditioned on. Needs class-id conditions.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from diffusion_gym.models import MissingWeightsError

__all__ = [
    "AESTHETIC_MLP_ENV",
    "AESTHETIC_MLP_FILENAME",
    "AESTHETIC_MLP_HUB_FILES",
    "CLIP_WEIGHTS_ENV",
    "AestheticMLP",
    "CheckedReward",
    "ClipImageEncoder",
    "LaionAestheticScorer",
    "RewardFn",
    "available_rewards",
    "host_reward",
    "clip_hub_files",
    "digit_confidence",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "jpeg_size_kb",
    "laion_aesthetic",
    "make_reward",
    "register_reward",
    "reward_async",
    "runs_on_host",
    "set_jpeg_workers",
]

RewardFn = Callable[[Tensor, Any], Tensor]
"""``reward(images (B, C, H, W) in [0, 1], conditions) -> (B,) float32 tensor on images.device``."""

# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------

_REGISTRY: dict[str, Callable[..., RewardFn]] = {}

# How far outside [0, 1] the images may stray (float rounding) before the checked wrapper complains.
_RANGE_TOLERANCE = 1e-3


def register_reward(name: str, factory: Callable[..., RewardFn], *, overwrite: bool = False) -> None:
    """Register a reward factory under a name, for :func:`make_reward`.

    Args:
        name: the reward's name (e.g. ``"jpeg_compressibility"``).
        factory: called with :func:`make_reward`'s keyword arguments; returns a :data:`RewardFn`.
        overwrite: replace an existing registration of the same name instead of failing.

    Raises:
        ValueError: if ``name`` is empty or already registered (and ``overwrite`` is false), or
            ``factory`` is not callable.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"reward name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise ValueError(f"reward factory for {name!r} must be callable, got {type(factory).__name__}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"reward {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = factory


def available_rewards() -> list[str]:
    """Names of the registered rewards, sorted."""
    return sorted(_REGISTRY)


class CheckedReward:
    """A reward function wrapped so that its inputs and output are validated.

    Checks that the images are ``(B, 1 or 3, H, W)`` in ``[0, 1]`` and that the reward returned a
    finite ``(B,)`` tensor, then returns it as float32 on ``images.device`` (keeping any autograd
    graph). Built by :func:`make_reward`; other attributes of the wrapped function (e.g. ``scorer``)
    are reachable through the wrapper.

    Args:
        fn: the reward function.
        name: its name, used in error messages.
    """

    def __init__(self, fn: RewardFn, name: str) -> None:
        self.fn = fn
        self.name = name

    def __getattr__(self, item: str) -> Any:
        if item in ("fn", "name"):  # not set yet (e.g. during unpickling)
            raise AttributeError(item)
        return getattr(self.fn, item)

    def __repr__(self) -> str:
        return f"CheckedReward({self.name!r})"

    def __call__(self, images: Tensor, conditions: Any = None) -> Tensor:
        """Compute and validate the rewards of a batch.

        Args:
            images: ``(B, C, H, W)`` float images in ``[0, 1]``, ``C`` = 1 or 3.
            conditions: class ids, prompts or ``None``, passed through.

        Returns:
            ``(B,)`` float32 rewards on ``images.device``.

        Raises:
            ValueError: for malformed images, or when the reward's output is not a finite ``(B,)``
                tensor.
        """
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"reward {self.name!r}: expected images of shape (B, 1 or 3, H, W), got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"reward {self.name!r}: expected float images in [0, 1], got dtype {images.dtype}")
        batch = images.shape[0]
        if images.numel():
            low, high = torch.stack([images.detach().amin(), images.detach().amax()]).float().tolist()
            if low < -_RANGE_TOLERANCE or high > 1.0 + _RANGE_TOLERANCE:
                raise ValueError(
                    f"reward {self.name!r}: images must be in [0, 1] but span [{low:.4g}, {high:.4g}] "
                    "(convert model outputs in [-1, 1] with (x + 1) / 2 and clamp)"
                )
        out = self.fn(images, conditions)
        if not isinstance(out, Tensor):
            try:
                out = torch.as_tensor(np.asarray(out))
            except Exception as error:  # noqa: BLE001 - reported below with the reward's name
                raise ValueError(
                    f"reward {self.name!r} returned a {type(out).__name__}, expected a tensor of shape ({batch},)"
                ) from error
        if tuple(out.shape) != (batch,):
            raise ValueError(
                f"reward {self.name!r} returned shape {tuple(out.shape)}, expected ({batch},) (one reward per image)"
            )
        if not (out.is_floating_point() or out.dtype in (torch.int8, torch.int16, torch.int32, torch.int64)):
            raise ValueError(f"reward {self.name!r} returned dtype {out.dtype}, expected a real number per image")
        out = out.to(device=images.device, dtype=torch.float32)
        finite = torch.isfinite(out.detach())
        if not bool(finite.all()):
            bad = (~finite).nonzero().flatten().tolist()
            values = out.detach()[~finite].tolist()
            raise ValueError(f"reward {self.name!r} returned non-finite values {values} at batch indices {bad}")
        return out


def make_reward(spec: str | RewardFn, **kwargs: Any) -> RewardFn:
    """Build a reward function from a registered name, or wrap a user callable.

    Args:
        spec: a name from :func:`available_rewards`, or a callable ``(images, conditions) -> (B,)``.
        **kwargs: passed to the registered reward's factory (names only).

    Returns:
        A :class:`CheckedReward` around the reward, which validates images and outputs.

    Raises:
        ValueError: for an unknown name (the message lists the valid choices), for keyword arguments
            given with a callable, or for a spec that is neither a string nor a callable.
    """
    if isinstance(spec, CheckedReward):
        if kwargs:
            raise ValueError("keyword arguments are only used with a registered reward name, not a callable")
        return spec
    if isinstance(spec, str):
        if spec not in _REGISTRY:
            raise ValueError(f"unknown reward {spec!r}; valid choices: {available_rewards()}")
        return CheckedReward(_REGISTRY[spec](**kwargs), spec)
    if callable(spec):
        if kwargs:
            raise ValueError(
                f"keyword arguments {sorted(kwargs)} are only used with a registered reward name, not a callable"
            )
        name = getattr(spec, "__qualname__", None) or getattr(spec, "__name__", None) or type(spec).__name__
        return CheckedReward(spec, name)
    raise ValueError(
        f"reward must be a registered name or a callable, got {type(spec).__name__}; valid names: {available_rewards()}"
    )


# --------------------------------------------------------------------------------------------------
# Host rewards computed in the background
# --------------------------------------------------------------------------------------------------

_reward_worker: ThreadPoolExecutor | None = None
_reward_worker_lock = threading.Lock()


def host_reward(fn: RewardFn) -> RewardFn:
    """Mark ``fn`` as a *host reward*: it computes on the CPU, whatever device the images are on.

    The JPEG rewards are host rewards. :func:`reward_async` runs host rewards of GPU images on a
    background thread, so that the GPU keeps working (e.g. on the next batch of episodes) while the CPU scores the last
    one. Mark a custom reward the same way when it only needs the images on the host (a compressor,
    an external program); rewards that run a network on the images' device should stay unmarked.

    Args:
        fn: the reward function; its attribute ``runs_on_host`` is set to ``True``.

    Returns:
        ``fn`` itself (usable as a decorator).
    """
    fn.runs_on_host = True  # type: ignore[attr-defined]
    return fn


def runs_on_host(reward_fn: RewardFn) -> bool:
    """Whether ``reward_fn`` (or the function a :class:`CheckedReward` wraps) is a :func:`host_reward`."""
    return bool(getattr(reward_fn, "runs_on_host", False))


def _host_snapshot(value: Any) -> Any:
    """A host copy of a tensor that the caller may overwrite next.

    CUDA tensors are copied into pinned memory without blocking (ordered on the current stream);
    CPU tensors are cloned; anything else (prompts, ``None``) is returned as is.
    """
    if not isinstance(value, Tensor):
        return value
    value = value.detach()
    if value.device.type != "cuda":
        return value.clone()
    host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
    return host.copy_(value, non_blocking=True)


def _get_reward_worker() -> ThreadPoolExecutor:
    global _reward_worker
    with _reward_worker_lock:
        if _reward_worker is None:  # one thread: batches are scored in submission order
            _reward_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffusion_gym-reward")
        return _reward_worker


def reward_async(
    reward_fn: RewardFn, images: Tensor, conditions: Any = None, background: bool | None = None
) -> Future[Tensor]:
    """Start ``reward_fn(images, conditions)`` and return its future, without waiting for the device.

    With ``background``, the reward is scored on a background thread: CUDA images and class ids are
    first copied into pinned host memory without blocking, and the thread waits for that copy alone
    (a CUDA event), so the caller can go on queueing GPU work, e.g. the next batch's denoising steps,
    while the CPU encodes. The caller may overwrite ``images`` at once. The rewards are those of a
    direct call; the result lies on the host. Otherwise the reward is computed now, on the caller's
    thread, and the returned future is already done.

    By default (``background=None``) only a host reward (:func:`runs_on_host`) of CUDA images goes
    to the background. A reward network would compete for the GPU anyway; and with CPU images the
    rollout itself runs on the CPU, where a second thread's torch ops also slow the main thread's
    OpenMP: measured on 2 cores, the JPEG quantisation run once on another thread made the embedded
    UNet's forwards 25-45% slower for the rest of the process (libgomp throttles its spin-waits once
    more threads exist than cores).

    Args:
        reward_fn: a reward function (see :data:`RewardFn`).
        images: ``(B, C, H, W)`` images in ``[0, 1]``.
        conditions: class ids, prompts or ``None``.
        background: score on the background thread (``None``: a host reward of CUDA images).

    Returns:
        A future of the ``(B,)`` float32 rewards; ``result()`` re-raises any error of the reward.
    """
    if background is None:
        background = runs_on_host(reward_fn) and images.device.type == "cuda"
    if not background:
        future: Future[Tensor] = Future()
        try:
            future.set_result(reward_fn(images, conditions))
        except Exception as error:  # noqa: BLE001 - delivered by result(), as from the background
            future.set_exception(error)
        return future
    devices = {v.device for v in (images, conditions) if isinstance(v, Tensor) and v.device.type == "cuda"}
    images, conditions = _host_snapshot(images), _host_snapshot(conditions)
    events = []
    for device in devices:  # the copies were queued on each device's current stream
        events.append(torch.cuda.Event())
        events[-1].record(torch.cuda.current_stream(device))

    def score() -> Tensor:
        for event in events:
            event.synchronize()  # this thread waits for the copies; the caller's stream keeps running
        return reward_fn(images, conditions)

    return _get_reward_worker().submit(score)


# --------------------------------------------------------------------------------------------------
# JPEG compressibility (ddpo-pytorch's convention)
# --------------------------------------------------------------------------------------------------

JPEG_QUALITY = 95

_jpeg_pool: ThreadPoolExecutor | None = None
_jpeg_pool_size: int = min(8, os.cpu_count() or 1)
_jpeg_pool_lock = threading.Lock()


def set_jpeg_workers(num_workers: int) -> None:
    """Set the number of threads that encode JPEGs (default: ``min(8, cpu_count)``).

    The current pool, if any, is shut down (after finishing its work) and a new one of the new size
    is created on the next call of :func:`jpeg_size_kb`.

    Args:
        num_workers: threads in the pool; 1 encodes on the calling thread.

    Raises:
        ValueError: if ``num_workers`` < 1.
    """
    global _jpeg_pool, _jpeg_pool_size
    if int(num_workers) < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    with _jpeg_pool_lock:
        old, _jpeg_pool, _jpeg_pool_size = _jpeg_pool, None, int(num_workers)
    if old is not None:
        old.shutdown(wait=True)


def _forget_pools_after_fork() -> None:
    # A forked child inherits the pool objects but not their threads: start fresh pools there.
    global _jpeg_pool, _jpeg_pool_lock, _reward_worker, _reward_worker_lock
    _jpeg_pool, _jpeg_pool_lock = None, threading.Lock()
    _reward_worker, _reward_worker_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools_after_fork)


def _get_jpeg_pool() -> ThreadPoolExecutor:
    global _jpeg_pool
    with _jpeg_pool_lock:
        if _jpeg_pool is None:
            _jpeg_pool = ThreadPoolExecutor(max_workers=_jpeg_pool_size, thread_name_prefix="diffusion_gym-jpeg")
        return _jpeg_pool


def _encoded_jpeg_bytes(pixels: np.ndarray, quality: int) -> int:
    """Size in bytes of one uint8 image (``(H, W)`` grey or ``(H, W, 3)`` RGB) saved as JPEG."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.tell()


def jpeg_size_kb(images: Tensor, quality: int = JPEG_QUALITY) -> Tensor:
    """Size in kB (bytes / 1000) of each image saved by PIL as JPEG, as in ddpo-pytorch.

    Each image is quantised with ``(x * 255).round().clamp(0, 255)`` (in float32), converted to a PIL
    image (mode ``"L"`` for 1 channel, ``"RGB"`` for 3) and saved with ``quality`` into memory. The
    images of a batch are encoded on a shared thread pool (see :func:`set_jpeg_workers`); the
    results are in batch order.

    Args:
        images: ``(B, C, H, W)`` images in ``[0, 1]``, ``C`` = 1 or 3, on any device.
        quality: JPEG quality (95 in DDPO).

    Returns:
        ``(B,)`` float32 sizes in kB on ``images.device`` (not differentiable).

    Raises:
        ValueError: for a shape other than ``(B, 1 or 3, H, W)``.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (B, 1 or 3, H, W), got {tuple(images.shape)}")
    pixels = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    if pixels.shape[1] == 1:
        arrays = [np.ascontiguousarray(p[0]) for p in pixels]  # (H, W) -> mode "L"
    else:
        arrays = [np.ascontiguousarray(p.transpose(1, 2, 0)) for p in pixels]  # (H, W, 3) -> "RGB"
    if len(arrays) <= 1 or _jpeg_pool_size <= 1:
        sizes = [_encoded_jpeg_bytes(a, quality) for a in arrays]
    else:
        sizes = list(_get_jpeg_pool().map(_encoded_jpeg_bytes, arrays, [quality] * len(arrays)))
    return torch.tensor([s / 1000 for s in sizes], dtype=torch.float32, device=images.device)


def jpeg_incompressibility(quality: int = JPEG_QUALITY) -> RewardFn:
    """Reward = +JPEG size in kB (larger files score higher); conditions are ignored.

    Args:
        quality: JPEG quality (95 in DDPO).

    Returns:
        The reward function.
    """

    def jpeg_incompressibility_reward(images: Tensor, conditions: Any = None) -> Tensor:
        return jpeg_size_kb(images, quality)

    return host_reward(jpeg_incompressibility_reward)


def jpeg_compressibility(quality: int = JPEG_QUALITY) -> RewardFn:
    """Reward = −JPEG size in kB (smaller files score higher); conditions are ignored.

    Args:
        quality: JPEG quality (95 in DDPO).

    Returns:
        The reward function.
    """

    def jpeg_compressibility_reward(images: Tensor, conditions: Any = None) -> Tensor:
        return -jpeg_size_kb(images, quality)

    return host_reward(jpeg_compressibility_reward)


# --------------------------------------------------------------------------------------------------
# LAION aesthetic predictor
# --------------------------------------------------------------------------------------------------

AESTHETIC_MLP_FILENAME = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_MLP_ENV = "DIFFUSION_GYM_AESTHETIC_MLP"
CLIP_WEIGHTS_ENV = "DIFFUSION_GYM_CLIP_WEIGHTS"

# Hugging Face hub copies of the MLP, looked up (cache only) in this order:
# - camenduru/improved-aesthetic-predictor mirrors christophschuhmann/improved-aesthetic-predictor
#   with the original file name;
# - trl-lib/ddpo-aesthetic-predictor is the file TRL's DDPO example loads into the same MLP
#   (renamed "aesthetic-model.pth").
AESTHETIC_MLP_HUB_FILES: tuple[tuple[str, str], ...] = (
    ("camenduru/improved-aesthetic-predictor", AESTHETIC_MLP_FILENAME),
    ("trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth"),
)

CLIP_MODEL_NAME = "ViT-L-14"
CLIP_PRETRAINED_TAG = "openai"
CLIP_IMAGE_SIZE = 224
CLIP_EMBED_DIM = 768


def _hf_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> str:
    """The Hugging Face hub cache directory, read from the environment at call time."""
    if cache_dir is not None:
        return os.fspath(cache_dir)
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.environ[var]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _cached_hub_file(repo_id: str, filename: str, cache_dir: str) -> str | None:
    """Path of ``filename`` of ``repo_id`` in the local hub cache, or ``None``; never downloads."""
    from huggingface_hub import try_to_load_from_cache

    try:
        path = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir)
    except Exception:  # noqa: BLE001 - a malformed cache counts as a miss
        return None
    return path if isinstance(path, str) and os.path.isfile(path) else None


def clip_hub_files() -> list[tuple[str, str]]:
    """Hub ``(repo_id, filename)`` candidates of open_clip's ``'openai'`` ViT-L-14 weights, in order.

    Read from open_clip's pretrained registry (``hf_hub`` of ``ViT-L-14`` / ``openai``, currently
    ``timm/vit_large_patch14_clip_224.openai``); as open_clip does, the safetensors file is preferred
    to the pickled one.
    """
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
    from open_clip.pretrained import get_pretrained_cfg

    hub = get_pretrained_cfg(CLIP_MODEL_NAME, CLIP_PRETRAINED_TAG).get("hf_hub") or (
        "timm/vit_large_patch14_clip_224.openai/"
    )
    # open_clip's convention: "org/repo/filename", or "org/repo/" for its default file name.
    repo_id, filename = os.path.split(hub)
    if not filename or filename == HF_WEIGHTS_NAME:
        names = [HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME]
    elif filename.endswith((".bin", ".pth")):
        names = [filename[:-4] + ".safetensors", filename]
    else:
        names = [filename]
    return [(repo_id, name) for name in names]


def _explicit_path(value: str | os.PathLike[str], what: str, how: str) -> str:
    path = Path(value).expanduser()
    if not path.is_file():
        raise MissingWeightsError(f"{what} not found: {path} does not exist or is not a file. {how}")
    return str(path)


def _resolve_clip_weights(clip_weights: str | os.PathLike[str] | None, cache: str) -> tuple[str | None, str]:
    """A path to the CLIP checkpoint, or ``(None, description of what is missing)``."""
    how = (
        "Pass clip_weights=/path/to/open_clip_model.safetensors (an open_clip ViT-L-14 'openai' checkpoint) "
        f"or set {CLIP_WEIGHTS_ENV}."
    )
    if clip_weights is not None:
        return _explicit_path(clip_weights, "CLIP ViT-L-14 weights", how), ""
    if os.environ.get(CLIP_WEIGHTS_ENV):
        return _explicit_path(os.environ[CLIP_WEIGHTS_ENV], f"CLIP ViT-L-14 weights (${CLIP_WEIGHTS_ENV})", how), ""
    candidates = clip_hub_files()
    for repo_id, filename in candidates:
        path = _cached_hub_file(repo_id, filename, cache)
        if path is not None:
            return path, ""
    repo_id = candidates[0][0]
    names = " or ".join(name for _, name in candidates)
    return None, (
        f"- CLIP ViT-L-14 ('openai') weights: {names} of hub repo {repo_id!r}, looked for in the Hugging Face "
        f"cache {cache}. Provide them with `hf download {repo_id} {candidates[0][1]}` (older huggingface_hub: "
        f"`huggingface-cli download ...`) on a machine with internet and copy "
        f"{os.path.join(cache, 'models--' + repo_id.replace('/', '--'))} into this cache (or set HF_HOME / "
        f"HF_HUB_CACHE), or pass clip_weights=/path/to/file or set {CLIP_WEIGHTS_ENV}."
    )


def _resolve_mlp_weights(mlp_weights: str | os.PathLike[str] | None, cache: str) -> tuple[str | None, str]:
    """A path to the aesthetic MLP's ``.pth``, or ``(None, description of what is missing)``."""
    how = f"Pass mlp_weights=/path/to/{AESTHETIC_MLP_FILENAME} or set {AESTHETIC_MLP_ENV}."
    if mlp_weights is not None:
        return _explicit_path(mlp_weights, "aesthetic MLP weights", how), ""
    if os.environ.get(AESTHETIC_MLP_ENV):
        return _explicit_path(os.environ[AESTHETIC_MLP_ENV], f"aesthetic MLP weights (${AESTHETIC_MLP_ENV})", how), ""
    for repo_id, filename in AESTHETIC_MLP_HUB_FILES:
        path = _cached_hub_file(repo_id, filename, cache)
        if path is not None:
            return path, ""
    places = ", ".join(f"{name} of hub repo {repo!r}" for repo, name in AESTHETIC_MLP_HUB_FILES)
    repo_id, filename = AESTHETIC_MLP_HUB_FILES[0]
    return None, (
        f"- LAION aesthetic MLP weights {AESTHETIC_MLP_FILENAME}: looked for {places} in the Hugging Face cache "
        f"{cache}, and ${AESTHETIC_MLP_ENV} is unset. Provide them with `hf download {repo_id} {filename}` "
        "(older huggingface_hub: `huggingface-cli download ...`) on a machine with internet and copy the "
        "cache folder here, or download the file from "
        "https://github.com/christophschuhmann/improved-aesthetic-predictor and pass "
        f"mlp_weights=/path/to/{AESTHETIC_MLP_FILENAME} or set {AESTHETIC_MLP_ENV}=/path/to/it."
    )


class AestheticMLP(nn.Module):
    """The LAION "sac+logos+ava1-l14-linearMSE" head: 768 → 1024 → 128 → 64 → 16 → 1.

    Linear layers with dropout in between and no activations (so, in eval mode, an affine map),
    stored as ``layers`` so that the state dict keys (``layers.0.weight`` … ``layers.7.bias``)
    match the original ``.pth`` file.
    """

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(CLIP_EMBED_DIM, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: Tensor) -> Tensor:
        """Scores ``(B, 1)`` of (normalised) CLIP embeddings ``(B, 768)``."""
        return self.layers(embeddings)


def _load_mlp_state(path: str) -> dict[str, Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict of the aesthetic MLP (got {type(state).__name__})")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if state and not any(k.startswith("layers.") for k in state):  # saved from a bare nn.Sequential
        state = {f"layers.{k}": v for k, v in state.items()}
    return state


def _build_clip_visual(checkpoint: str | None, quick_gelu: bool) -> nn.Module:
    """open_clip's ViT-L-14 image tower, from a checkpoint or randomly initialised."""
    import open_clip

    if checkpoint is None:
        try:  # only the image tower: half the time and memory of the full CLIP model
            from open_clip.model import _build_vision_tower

            config = open_clip.get_model_config(CLIP_MODEL_NAME)
            return _build_vision_tower(config["embed_dim"], config["vision_cfg"], quick_gelu=quick_gelu)
        except (ImportError, AttributeError, KeyError, TypeError):
            model = open_clip.create_model(CLIP_MODEL_NAME, pretrained=None, force_quick_gelu=quick_gelu)
    else:
        model = open_clip.create_model(CLIP_MODEL_NAME, pretrained=checkpoint, force_quick_gelu=quick_gelu)
    return model.visual


class ClipImageEncoder(nn.Module):
    """OpenAI CLIP ViT-L/14 image embeddings of images in ``[0, 1]``, with CLIP's preprocessing in torch.

    The pipeline (differentiable with respect to the images): grey images are repeated to 3 channels;
    the shorter side is resized to 224 (bicubic, antialiased) and the centre 224×224 cropped; pixels
    are clamped to ``[0, 1]`` and normalised with CLIP's mean/std; open_clip's ViT-L-14 image tower
    embeds them. :meth:`embed` (also :meth:`features` and the module's call) returns the unnormalised
    ``(B, 768)`` embeddings in float32, so the encoder can stand in wherever a
    :class:`~diffusion_gym.digits.DigitClassifier`'s ``features`` are used (e.g. the Vendi score on
    embeddings, whose cosine kernel normalises them). It has no classification head.

    The model is frozen (``requires_grad`` off, eval mode); gradients still reach the input images.
    Weights are never downloaded: see ``clip_weights``.

    Args:
        clip_weights: path to an open_clip ViT-L-14 checkpoint with OpenAI's weights. ``None``: the
            file named by ``$DIFFUSION_GYM_CLIP_WEIGHTS``, else open_clip's ``'openai'`` ViT-L-14
            weights in the local Hugging Face cache (see :func:`clip_hub_files`).
        random_init: random weights of the real shapes (seeded by torch's global RNG); no file is
            needed. For tests and benchmarks.
        device: where to put the model.
        dtype: parameter dtype of the CLIP tower (embeddings are returned in float32).
        cache_dir: the Hugging Face hub cache to look in (default: ``$HF_HUB_CACHE`` /
            ``$HF_HOME/hub`` / ``~/.cache/huggingface/hub``).
        quick_gelu: use QuickGELU in the tower, as OpenAI's CLIP was trained with.

    Raises:
        MissingWeightsError: when the CLIP weights cannot be found locally; the message names the
            file, where it was looked for and how to provide it.
    """

    def __init__(
        self,
        clip_weights: str | os.PathLike[str] | None = None,
        *,
        random_init: bool = False,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        cache_dir: str | os.PathLike[str] | None = None,
        quick_gelu: bool = True,
    ) -> None:
        super().__init__()
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        clip_path: str | None = None
        if not random_init:
            clip_path, clip_missing = _resolve_clip_weights(clip_weights, _hf_cache_dir(cache_dir))
            if clip_missing:
                raise MissingWeightsError(
                    "Weights of the CLIP ViT-L-14 image encoder are missing (they are never downloaded at run "
                    f"time):\n{clip_missing}\nFor tests and benchmarks, random_init=True needs no files."
                )
        self.visual = _build_clip_visual(clip_path, quick_gelu)
        self.register_buffer("mean", torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1), persistent=False)
        self.image_size = CLIP_IMAGE_SIZE
        self.requires_grad_(False)
        self.eval()
        self.to(device=device)
        self.visual.to(dtype=dtype)

    def train(self, mode: bool = True) -> ClipImageEncoder:
        """Keep the model in eval mode (dropout off); ``train(True)`` is ignored."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        """Device of the model."""
        return self.mean.device

    @property
    def clip_dtype(self) -> torch.dtype:
        """Parameter dtype of the CLIP tower."""
        return next(self.visual.parameters()).dtype

    def preprocess(self, images: Tensor) -> Tensor:
        """CLIP's preprocessing, differentiably: ``(B, 1|3, H, W)`` in ``[0, 1]`` → ``(B, 3, 224, 224)``.

        Args:
            images: images in ``[0, 1]``, grey or RGB, any size.

        Returns:
            Normalised float32 pixels on the model's device.

        Raises:
            ValueError: for a shape other than ``(B, 1 or 3, H, W)``.
        """
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images of shape (B, 1 or 3, H, W) in [0, 1], got {tuple(images.shape)}")
        x = images.to(device=self.device, dtype=torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        size = self.image_size
        height, width = x.shape[-2:]
        scale = size / min(height, width)
        new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
        if (new_h, new_w) != (height, width):
            x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
        top, left = int(round((new_h - size) / 2)), int(round((new_w - size) / 2))
        x = x[..., top : top + size, left : left + size].clamp(0.0, 1.0)
        return (x - self.mean) / self.std

    def embed(self, images: Tensor) -> Tensor:
        """Unnormalised CLIP image embeddings ``(B, 768)`` (float32) of images in ``[0, 1]``."""
        pixels = self.preprocess(images).to(self.clip_dtype)
        return self.visual(pixels).float()

    def features(self, images: Tensor) -> Tensor:
        """The same as :meth:`embed`: unnormalised ``(B, 768)`` float32 embeddings of images in ``[0, 1]``."""
        return self.embed(images)

    def forward(self, images: Tensor) -> Tensor:
        """The same as :meth:`embed`: unnormalised ``(B, 768)`` float32 embeddings of images in ``[0, 1]``."""
        return self.embed(images)


class LaionAestheticScorer(ClipImageEncoder):
    """LAION aesthetic score of images in ``[0, 1]``: CLIP ViT-L/14 embedding → linear MLP.

    A :class:`ClipImageEncoder` (its preprocessing and :meth:`embed`) whose embedding is
    L2-normalised (in float32) and scored by :class:`AestheticMLP`; calling the scorer returns the
    scores (``features`` / ``embed`` still return the embeddings). All in torch, so differentiable
    with respect to the images. Unlike ddpo-pytorch the images are not quantised to uint8 first and
    the resize is torch's, not PIL's, so scores differ from it slightly.

    The model is frozen (``requires_grad`` off, eval mode); gradients still reach the input images.
    Weights are never downloaded: see ``clip_weights`` / ``mlp_weights``.

    Args:
        clip_weights: path to an open_clip ViT-L-14 checkpoint with OpenAI's weights. ``None``: the
            file named by ``$DIFFUSION_GYM_CLIP_WEIGHTS``, else open_clip's ``'openai'`` ViT-L-14
            weights in the local Hugging Face cache (see :func:`clip_hub_files`).
        mlp_weights: path to ``sac+logos+ava1-l14-linearMSE.pth``. ``None``: the file named by
            ``$DIFFUSION_GYM_AESTHETIC_MLP``, else a copy in the local Hugging Face cache (see
            ``AESTHETIC_MLP_HUB_FILES``).
        random_init: random weights of the real shapes (seeded by torch's global RNG); no files are
            needed. For tests and benchmarks.
        device: where to put the model.
        dtype: parameter dtype of the CLIP tower (the MLP stays float32).
        cache_dir: the Hugging Face hub cache to look in (default: ``$HF_HUB_CACHE`` /
            ``$HF_HOME/hub`` / ``~/.cache/huggingface/hub``).
        quick_gelu: use QuickGELU in the tower, as OpenAI's CLIP was trained with.

    Raises:
        MissingWeightsError: when a weights file cannot be found locally; the message names every
            missing file, where it was looked for and how to provide it.
    """

    def __init__(
        self,
        clip_weights: str | os.PathLike[str] | None = None,
        mlp_weights: str | os.PathLike[str] | None = None,
        *,
        random_init: bool = False,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        cache_dir: str | os.PathLike[str] | None = None,
        quick_gelu: bool = True,
    ) -> None:
        clip_path: str | None = None
        mlp_path: str | None = None
        if not random_init:
            # Both files are resolved before anything is built, so one error lists all that is missing.
            cache = _hf_cache_dir(cache_dir)
            clip_path, clip_missing = _resolve_clip_weights(clip_weights, cache)
            mlp_path, mlp_missing = _resolve_mlp_weights(mlp_weights, cache)
            missing = [m for m in (clip_missing, mlp_missing) if m]
            if missing:
                raise MissingWeightsError(
                    "Weights of the laion_aesthetic reward are missing (they are never downloaded at run "
                    "time):\n" + "\n".join(missing) + "\nFor tests and benchmarks, random_init=True needs no files."
                )
        super().__init__(
            clip_path, random_init=random_init, device=device, dtype=dtype, cache_dir=cache_dir, quick_gelu=quick_gelu
        )
        self.mlp = AestheticMLP()
        if mlp_path is not None:
            self.mlp.load_state_dict(_load_mlp_state(mlp_path), strict=True)
        self.mlp.requires_grad_(False)
        self.mlp.eval()
        self.mlp.to(device=device)

    def score_embeddings(self, embeddings: Tensor) -> Tensor:
        """Aesthetic scores ``(B,)`` of CLIP embeddings, which are L2-normalised first.

        Args:
            embeddings: ``(B, 768)`` image embeddings (any scale).

        Returns:
            ``(B,)`` float32 scores on the scorer's device.
        """
        embeddings = embeddings.to(device=self.device, dtype=torch.float32)
        embeddings = embeddings / torch.linalg.vector_norm(embeddings, dim=-1, keepdim=True).clamp_min(1e-12)
        return self.mlp(embeddings).squeeze(-1)

    def forward(self, images: Tensor) -> Tensor:
        """Aesthetic scores of images in ``[0, 1]``.

        Args:
            images: ``(B, 1 or 3, H, W)`` images in ``[0, 1]`` on any device.

        Returns:
            ``(B,)`` float32 scores on ``images.device`` (differentiable w.r.t. ``images``).
        """
        return self.score_embeddings(self.embed(images)).to(images.device)


def laion_aesthetic(
    *,
    differentiable: bool = False,
    scorer: LaionAestheticScorer | None = None,
    **scorer_kwargs: Any,
) -> RewardFn:
    """Reward = LAION aesthetic score (about 1–10 with the real weights); conditions are ignored.

    Builds :class:`LaionAestheticScorer` once (or uses ``scorer``) and returns a reward function
    that has it as its ``scorer`` attribute.

    Args:
        differentiable: keep the autograd graph so that rewards can be backpropagated to the images;
            by default they are computed under ``torch.no_grad()``.
        scorer: an already built scorer to use instead of building one.
        **scorer_kwargs: :class:`LaionAestheticScorer`'s arguments (``clip_weights``, ``mlp_weights``,
            ``random_init``, ``device``, ``dtype``, ``cache_dir``, ``quick_gelu``).

    Returns:
        The reward function.

    Raises:
        MissingWeightsError: when the weights are not available locally.
        ValueError: if both ``scorer`` and scorer arguments are given.
    """
    if scorer is not None and scorer_kwargs:
        raise ValueError(f"pass either scorer= or the scorer's arguments, not both (got {sorted(scorer_kwargs)})")
    model = scorer if scorer is not None else LaionAestheticScorer(**scorer_kwargs)

    def laion_aesthetic_reward(images: Tensor, conditions: Any = None) -> Tensor:
        if differentiable:
            return model(images)
        with torch.no_grad():
            return model(images)

    laion_aesthetic_reward.scorer = model  # type: ignore[attr-defined]
    return laion_aesthetic_reward


# --------------------------------------------------------------------------------------------------
# Digit classifier confidence (embedded digits model)
# --------------------------------------------------------------------------------------------------


def _class_ids(conditions: Any, batch: int, num_classes: int, device: torch.device) -> Tensor:
    error = (
        "reward 'digit_confidence' needs class-id conditions: a (B,) integer tensor (or list of ints) of "
        f"digits 0..{num_classes - 1}, one per image"
    )
    if conditions is None:
        raise ValueError(f"{error}; got None (unconditional sampling)")
    if isinstance(conditions, Tensor):
        ids = conditions
    elif isinstance(conditions, Sequence) and not isinstance(conditions, str):
        if not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in conditions):
            raise ValueError(f"{error}; got a list of {sorted({type(c).__name__ for c in conditions})}")
        ids = torch.tensor(list(conditions), dtype=torch.long)
    elif isinstance(conditions, np.ndarray):
        ids = torch.from_numpy(conditions)
    else:
        raise ValueError(f"{error}; got {type(conditions).__name__}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"{error}; got dtype {ids.dtype}")
    if tuple(ids.shape) != (batch,):
        raise ValueError(f"{error}; got shape {tuple(ids.shape)} for {batch} images")
    ids = ids.to(device=device, dtype=torch.long)
    if batch and (int(ids.min()) < 0 or int(ids.max()) >= num_classes):
        raise ValueError(f"{error}; got values in [{int(ids.min())}, {int(ids.max())}]")
    return ids


def digit_confidence(path: str | os.PathLike[str] | None = None, *, differentiable: bool = False) -> RewardFn:
    """Reward = probability the digit classifier gives to the conditioned class.

    Uses :func:`diffusion_gym.digits.load_digit_classifier` (the shipped classifier, or the one
    saved at ``path``), loaded once and moved to the images' device when needed.

    Args:
        path: directory of a saved :class:`~diffusion_gym.digits.DigitClassifier`; default: shipped.
        differentiable: keep the autograd graph (default: computed under ``torch.no_grad()``).

    Returns:
        The reward function; its ``classifier`` attribute is the model. It raises ``ValueError``
        when the conditions are not one class id in ``0..9`` per image.

    Raises:
        FileNotFoundError: when the classifier is missing.
    """
    from diffusion_gym.digits import load_digit_classifier

    classifier = load_digit_classifier(path)
    classifier.requires_grad_(False)
    num_classes = int(classifier.config.num_classes)

    def digit_confidence_reward(images: Tensor, conditions: Any = None) -> Tensor:
        nonlocal classifier
        ids = _class_ids(conditions, images.shape[0], num_classes, images.device)
        if classifier.device != images.device:
            classifier = classifier.to(images.device)
            digit_confidence_reward.classifier = classifier  # type: ignore[attr-defined]
        with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
            probs = classifier(images).float().softmax(dim=-1)
            return probs.gather(1, ids[:, None]).squeeze(1)

    digit_confidence_reward.classifier = classifier  # type: ignore[attr-defined]
    return digit_confidence_reward


register_reward("jpeg_compressibility", jpeg_compressibility)
register_reward("jpeg_incompressibility", jpeg_incompressibility)
register_reward("laion_aesthetic", laion_aesthetic)
register_reward("digit_confidence", digit_confidence)
