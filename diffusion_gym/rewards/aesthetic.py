"""The LAION aesthetic predictor ("sac+logos+ava1-l14-linearMSE") and the ``laion_aesthetic`` reward.

A linear MLP (:class:`AestheticMLP`) on the L2-normalised OpenAI CLIP ViT-L/14 image embedding of
:class:`~diffusion_gym.nets.ClipImageEncoder`. Differentiable with respect to the images. Weights
come from the local Hugging Face cache or a path, never from the network; ``random_init=True`` gives
random weights of the real shapes.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from diffusion_gym.models import MissingWeightsError
from diffusion_gym.nets import (
    CLIP_EMBED_DIM,
    ClipImageEncoder,
    _cached_hub_file,
    _explicit_path,
    _hf_cache_dir,
    _resolve_clip_weights,
)
from diffusion_gym.rewards.registry import RewardFn

__all__ = [
    "AESTHETIC_MLP_ENV",
    "AESTHETIC_MLP_FILENAME",
    "AESTHETIC_MLP_HUB_FILES",
    "AestheticMLP",
    "LaionAestheticScorer",
    "laion_aesthetic",
]

AESTHETIC_MLP_FILENAME = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_MLP_ENV = "DIFFUSION_GYM_AESTHETIC_MLP"

# Hugging Face hub copies of the MLP, looked up (cache only) in this order:
# - camenduru/improved-aesthetic-predictor mirrors christophschuhmann/improved-aesthetic-predictor
#   with the original file name;
# - trl-lib/ddpo-aesthetic-predictor is the file TRL's DDPO example loads into the same MLP
#   (renamed "aesthetic-model.pth").
AESTHETIC_MLP_HUB_FILES: tuple[tuple[str, str], ...] = (
    ("camenduru/improved-aesthetic-predictor", AESTHETIC_MLP_FILENAME),
    ("trl-lib/ddpo-aesthetic-predictor", "aesthetic-model.pth"),
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
    match the original ``.pth`` file. ImageReward's head is the same MLP on its text encoder's 768
    ``[CLS]`` features (``input_dim``).
    """

    def __init__(self, input_dim: int = CLIP_EMBED_DIM) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024),
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
