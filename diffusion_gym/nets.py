"""The feature networks that rewards and metrics use: CLIP ViT-L/14, InceptionV3, and their loaders.

Every network here works on images in ``[0, 1]`` (grey or RGB, any size) through the two methods
that the embedded :class:`~diffusion_gym.digits.DigitClassifier` has too:

* ``features(images)``: images ``(N, C, H, W)`` in ``[0, 1]`` → ``(N, D)``;
* ``head(features)``: ``(N, D)`` → class logits ``(N, K)`` (only for the Inception Score).

The module holds:

* :class:`ClipImageEncoder`: OpenAI CLIP ViT-L/14 image embeddings (768-d), for the Vendi score on
  embeddings and, with an MLP on top, the ``laion_aesthetic`` reward
  (:class:`~diffusion_gym.rewards.LaionAestheticScorer`).
* :func:`load_inception_v3`: torchvision's InceptionV3 with its ImageNet weights: 2048-d pooled
  features and the 1000-way logits, for the Inception Score.
* :func:`load_clip_image_encoder`: the CLIP encoder, for the Vendi score.
* :func:`load_metric_nets`: the pair of metric networks for a kind of data (digits or full size);
  for digits, the shipped :class:`~diffusion_gym.digits.DigitClassifier` serves both.

Weights are never downloaded: each loader looks for its file locally and raises
:class:`~diffusion_gym.models.MissingWeightsError` (naming the file, the places looked in and how
to provide it) when it is missing; ``random_init=True`` builds random weights of the real shapes
and needs no file (for tests and benchmarks).

Note:
    The InceptionV3 weights are torchvision's, not torch-fidelity's "FID Inception", so Inception
    Scores may differ slightly from torch-fidelity's (see ``docs/design_notes.md``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_gym.models import MissingWeightsError

from .extras import require

__all__ = [
    "CLIP_EMBED_DIM",
    "CLIP_IMAGE_SIZE",
    "CLIP_MODEL_NAME",
    "CLIP_PRETRAINED_TAG",
    "CLIP_WEIGHTS_ENV",
    "INCEPTION_IMAGE_SIZE",
    "INCEPTION_WEIGHTS_ENV",
    "INCEPTION_WEIGHTS_FILENAME",
    "INCEPTION_WEIGHTS_URL",
    "METRIC_NET_KINDS",
    "ClipImageEncoder",
    "InceptionV3Features",
    "MetricNets",
    "clip_hub_files",
    "default_inception_weights_path",
    "load_clip_image_encoder",
    "load_inception_v3",
    "load_metric_nets",
]

# --------------------------------------------------------------------------------------------------
# CLIP ViT-L/14 image encoder (open_clip's 'openai' weights)
# --------------------------------------------------------------------------------------------------

CLIP_WEIGHTS_ENV = "DIFFUSION_GYM_CLIP_WEIGHTS"
"""Environment variable naming the CLIP ViT-L-14 checkpoint."""
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
    require("open_clip", "clip", "the CLIP image encoder (laion_aesthetic, CLIP metrics)")
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


def _build_clip_visual(checkpoint: str | None, quick_gelu: bool) -> nn.Module:
    """open_clip's ViT-L-14 image tower, from a checkpoint or randomly initialised."""
    open_clip = require("open_clip", "clip", "the CLIP image encoder (laion_aesthetic, CLIP metrics)")

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


def _rgb_float(images: Tensor, device: torch.device) -> Tensor:
    """``(N, 1 or 3, H, W)`` images as float32 RGB on ``device`` (grey is repeated over the channels).

    Raises:
        ValueError: for another shape.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (N, 1 or 3, H, W) in [0, 1], got {tuple(images.shape)}")
    x = images.to(device=device, dtype=torch.float32)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


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
        x = _rgb_float(images, self.device)
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


# --------------------------------------------------------------------------------------------------
# InceptionV3 (Inception Score)
# --------------------------------------------------------------------------------------------------

INCEPTION_WEIGHTS_FILENAME = "inception_v3_google-0cc3c7bd.pth"
"""File name of torchvision's ``Inception_V3_Weights.IMAGENET1K_V1`` (as torch hub caches it)."""
INCEPTION_WEIGHTS_URL = f"https://download.pytorch.org/models/{INCEPTION_WEIGHTS_FILENAME}"
"""Where torchvision downloads those weights from (on a machine with internet)."""
INCEPTION_WEIGHTS_ENV = "DIFFUSION_GYM_INCEPTION_WEIGHTS"
"""Environment variable naming the InceptionV3 weights file."""
INCEPTION_IMAGE_SIZE = 299
INCEPTION_FEATURE_DIM = 2048
INCEPTION_NUM_CLASSES = 1000

METRIC_NET_KINDS = ("auto", "digits", "inception")
"""Valid ``kind`` values of :func:`load_metric_nets`."""

# Inception3's blocks from the input to the 2048-d global average pool, in order (the auxiliary
# classifier, which sits between Mixed_6e and Mixed_7a, only matters in training).
_INCEPTION_TRUNK = (
    "Conv2d_1a_3x3",
    "Conv2d_2a_3x3",
    "Conv2d_2b_3x3",
    "maxpool1",
    "Conv2d_3b_1x1",
    "Conv2d_4a_3x3",
    "maxpool2",
    "Mixed_5b",
    "Mixed_5c",
    "Mixed_5d",
    "Mixed_6a",
    "Mixed_6b",
    "Mixed_6c",
    "Mixed_6d",
    "Mixed_6e",
    "Mixed_7a",
    "Mixed_7b",
    "Mixed_7c",
    "avgpool",
)


class InceptionV3Features(nn.Module):
    """torchvision's InceptionV3 as a feature extractor + classifier head for images in ``[0, 1]``.

    Preprocessing (in torch, differentiable): grey images are repeated to 3 channels and all images
    are resized bilinearly to 299×299. torchvision's pipeline for the ``IMAGENET1K_V1`` weights
    normalises with the ImageNet mean/std and then, with ``transform_input=True`` (which it sets for
    these weights), maps the result back to ``(x - 0.5) / 0.5`` per channel; the two steps compose
    to ``2 x - 1``, which is what is applied here (with ``transform_input`` off in the network).

    Frozen (``requires_grad`` off) and always in eval mode (batch norm uses its running statistics,
    dropout is off). Build it with :func:`load_inception_v3`.

    Args:
        network: a torchvision ``Inception3`` built with ``transform_input=False``; its ``fc`` layer
            is the head.
    """

    feature_dim = INCEPTION_FEATURE_DIM
    num_classes = INCEPTION_NUM_CLASSES
    image_size = INCEPTION_IMAGE_SIZE

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        if getattr(network, "transform_input", False):
            raise ValueError("build the Inception3 network with transform_input=False (the wrapper normalises)")
        self.network = network
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> InceptionV3Features:
        """Keep the network in eval mode; ``train(True)`` is ignored."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        """Device of the network's parameters."""
        return self.network.fc.weight.device

    def preprocess(self, images: Tensor) -> Tensor:
        """``(N, 1|3, H, W)`` images in ``[0, 1]`` → ``(N, 3, 299, 299)`` network inputs in ``[-1, 1]``.

        Args:
            images: grey or RGB images in ``[0, 1]``, any size, on any device.

        Returns:
            float32 inputs on the network's device.

        Raises:
            ValueError: for a shape other than ``(N, 1 or 3, H, W)``.
        """
        x = _rgb_float(images, self.device)
        size = self.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        return x * 2.0 - 1.0

    def features(self, images: Tensor) -> Tensor:
        """The 2048-d globally pooled features ``(N, 2048)`` (float32) of images in ``[0, 1]``."""
        x = self.preprocess(images)
        for name in _INCEPTION_TRUNK:
            x = getattr(self.network, name)(x)
        return torch.flatten(x, 1)

    def head(self, features: Tensor) -> Tensor:
        """ImageNet logits ``(N, 1000)`` of pooled features ``(N, 2048)`` (the network's ``fc`` layer)."""
        return self.network.fc(features.to(device=self.device, dtype=self.network.fc.weight.dtype))

    def forward(self, images: Tensor) -> Tensor:
        """ImageNet logits ``(N, 1000)`` of images in ``[0, 1]``."""
        return self.head(self.features(images))


def default_inception_weights_path() -> Path:
    """Where torchvision caches the InceptionV3 weights: ``torch.hub.get_dir()/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILENAME


def _inception_how_to() -> str:
    return (
        f"To provide them: download {INCEPTION_WEIGHTS_URL} on a machine with internet (torchvision's "
        f"Inception_V3_Weights.IMAGENET1K_V1) and copy it to {default_inception_weights_path()} "
        f"(torch hub's cache), or pass its path as weights= / inception_weights= (CLI: --inception-weights) "
        f"or set {INCEPTION_WEIGHTS_ENV}=/path/to/{INCEPTION_WEIGHTS_FILENAME}. "
        "For tests and benchmarks, random_init=True needs no file."
    )


def _resolve_inception_weights(weights: str | os.PathLike[str] | None) -> Path:
    """The InceptionV3 weights file: ``weights``, else ``$DIFFUSION_GYM_INCEPTION_WEIGHTS``, else torch hub's cache."""
    if weights is not None:
        path, origin = Path(weights).expanduser(), "weights="
    elif os.environ.get(INCEPTION_WEIGHTS_ENV):
        path, origin = Path(os.environ[INCEPTION_WEIGHTS_ENV]).expanduser(), f"${INCEPTION_WEIGHTS_ENV}"
    else:
        path = default_inception_weights_path()
        if path.is_file():
            return path
        raise MissingWeightsError(
            f"InceptionV3 weights {INCEPTION_WEIGHTS_FILENAME} are missing (they are never downloaded at run "
            f"time). Looked in: {path} (torch hub's cache, torch.hub.get_dir()/checkpoints); "
            f"${INCEPTION_WEIGHTS_ENV} is unset and no weights= path was given. {_inception_how_to()}"
        )
    if not path.is_file():
        raise MissingWeightsError(
            f"InceptionV3 weights ({INCEPTION_WEIGHTS_FILENAME}) not found: {path} (from {origin}) does not exist "
            f"or is not a file. {_inception_how_to()}"
        )
    return path


def _inception_state_dict(path: Path) -> dict[str, Tensor]:
    """The InceptionV3 state dict (torchvision's keys) from ``path``, without the auxiliary classifier."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold an InceptionV3 state dict (got {type(state).__name__})")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}


def load_inception_v3(
    weights: str | os.PathLike[str] | None = None,
    *,
    random_init: bool = False,
    device: str | torch.device = "cpu",
) -> InceptionV3Features:
    """InceptionV3 (torchvision's) with its ImageNet weights, for the Inception Score.

    The weights file is torchvision's ``IMAGENET1K_V1`` state dict (``inception_v3_google-0cc3c7bd.pth``,
    saved with the auxiliary classifier, whose weights are dropped here since it is unused in eval
    mode). It is looked up, never downloaded, at ``weights`` if given, else at
    ``$DIFFUSION_GYM_INCEPTION_WEIGHTS``, else in torch hub's cache
    (``torch.hub.get_dir()/checkpoints/inception_v3_google-0cc3c7bd.pth``, where torchvision puts it).

    These are torchvision's weights, not torch-fidelity's "FID Inception": Inception Scores are
    comparable within this library but may differ slightly from torch-fidelity's absolute numbers.

    Args:
        weights: path to the weights file (see above).
        random_init: random weights of the real shapes (torch's default initialisation, seeded by
            its global RNG); no file is needed. For tests and benchmarks.
        device: where to put the network.

    Returns:
        The frozen network in eval mode: ``features(images)`` → ``(N, 2048)``, ``head(features)`` →
        ``(N, 1000)`` logits.

    Raises:
        MissingWeightsError: when the weights file is missing; the message names the file, the
            places looked in and how to provide it.
        RuntimeError: when the file does not hold InceptionV3's parameters (``load_state_dict``).
    """
    from torchvision.models.inception import Inception3

    state = None if random_init else _inception_state_dict(_resolve_inception_weights(weights))
    network = Inception3(num_classes=INCEPTION_NUM_CLASSES, aux_logits=False, transform_input=False, init_weights=False)
    if state is not None:
        network.load_state_dict(state, strict=True)
    return InceptionV3Features(network).to(device)


def load_clip_image_encoder(
    clip_weights: str | os.PathLike[str] | None = None,
    *,
    random_init: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike[str] | None = None,
) -> ClipImageEncoder:
    """OpenAI CLIP ViT-L/14 image encoder, for the Vendi score on embeddings.

    Its ``features(images)`` are the unnormalised ``(N, 768)`` float32 CLIP image embeddings of
    images in ``[0, 1]`` (the Vendi score's cosine kernel normalises them); it has no ``head``.
    Weights are resolved as for the ``laion_aesthetic`` reward (see
    :class:`ClipImageEncoder`), never downloaded.

    Args:
        clip_weights: path to an open_clip ViT-L-14 ``'openai'`` checkpoint; ``None``: the file named
            by ``$DIFFUSION_GYM_CLIP_WEIGHTS``, else the local Hugging Face cache.
        random_init: random weights of the real shapes; no file is needed. For tests and benchmarks.
        device: where to put the model.
        dtype: parameter dtype of the CLIP tower (features are float32 in any case).
        cache_dir: the Hugging Face hub cache to look in (default: the usual one).

    Returns:
        The frozen encoder in eval mode.

    Raises:
        MissingWeightsError: when the CLIP weights are missing; the message names the file, where it
            was looked for and how to provide it.
    """
    return ClipImageEncoder(clip_weights, random_init=random_init, device=device, dtype=dtype, cache_dir=cache_dir)


class MetricNets(NamedTuple):
    """What :func:`load_metric_nets` returns."""

    classifier: nn.Module
    """Network with ``features`` and ``head``, for the Inception Score."""
    embedder: nn.Module
    """Network with ``features``, for the Vendi score on embeddings."""
    classifier_name: str
    """Name of ``classifier`` for reports (``"digit-classifier"`` or ``"inception-v3"``)."""
    embedder_name: str
    """Name of ``embedder`` for reports (``"digit-classifier"`` or ``"clip-vit-l-14"``)."""


def load_metric_nets(
    kind: str = "auto",
    *,
    image_shape: tuple[int, ...] | None = None,
    inception_weights: str | os.PathLike[str] | None = None,
    clip_weights: str | os.PathLike[str] | None = None,
    random_init: bool = False,
    device: str | torch.device = "cpu",
) -> MetricNets:
    """The networks of the evaluation metrics for a kind of images.

    Args:
        kind: ``"digits"``: the embedded digit classifier for both the Inception Score and the
            embeddings (offline, shipped with the library). ``"inception"``: InceptionV3 for the
            Inception Score and CLIP ViT-L/14 for the embeddings (full-size images; needs their
            weights, see :func:`load_inception_v3` / :func:`load_clip_image_encoder`). ``"auto"``:
            ``"digits"`` when ``image_shape`` is the embedded digits model's ``(1, 16, 16)``, else
            ``"inception"``.
        image_shape: ``(C, H, W)`` of the images to evaluate, used by ``"auto"``.
        inception_weights: path to InceptionV3's weights (``"inception"`` only).
        clip_weights: path to CLIP's weights (``"inception"`` only).
        random_init: random weights for InceptionV3 and CLIP, no files needed (tests); the digit
            classifier is always the shipped one.
        device: where to put the networks.

    Returns:
        The networks and their names.

    Raises:
        ValueError: for an unknown ``kind`` (the message lists the valid choices).
        MissingWeightsError: when the InceptionV3 or CLIP weights are missing.
        FileNotFoundError: when the digit classifier is missing.
    """
    from diffusion_gym.digits import DIGITS_SIZE

    if kind not in METRIC_NET_KINDS:
        raise ValueError(f"unknown metric networks kind {kind!r}; valid choices: {list(METRIC_NET_KINDS)}")
    if kind == "auto":
        digits_shape = (1, DIGITS_SIZE, DIGITS_SIZE)
        is_digits = image_shape is not None and tuple(int(s) for s in image_shape) == digits_shape
        kind = "digits" if is_digits else "inception"
    if kind == "digits":
        from diffusion_gym.digits import load_digit_classifier

        classifier = load_digit_classifier(device=device)
        classifier.requires_grad_(False)
        return MetricNets(classifier, classifier, "digit-classifier", "digit-classifier")
    inception = load_inception_v3(inception_weights, random_init=random_init, device=device)
    clip = load_clip_image_encoder(clip_weights, random_init=random_init, device=device)
    return MetricNets(inception, clip, "inception-v3", "clip-vit-l-14")
