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
    differentiable; the images of a batch are encoded on a thread pool. ``quality=`` (an integer in
    ``[1, 100]``) sets another JPEG quality.
``laion_aesthetic``
    The LAION aesthetic predictor ("sac+logos+ava1-l14-linearMSE"): a linear MLP on the
    L2-normalised OpenAI CLIP ViT-L/14 image embedding (:class:`LaionAestheticScorer`, a
    :class:`~diffusion_gym.nets.ClipImageEncoder` with the MLP on top; the encoder alone also serves the Vendi score).
    Differentiable with respect to the images. Weights come from the local Hugging Face cache or a
    path, never from the network; ``random_init=True`` gives random weights of the real shapes.
``digit_confidence``
    For the embedded digits model: the probability the shipped digit classifier gives to the class
    each image was conditioned on. Needs class-id conditions.
``prompt_color`` / ``prompt_brightness``
    Prompt-dependent toys for text-to-image models (:mod:`~diffusion_gym.rewards.prompt_toys`): for
    a prompt with a red (blue) word, mean red minus mean blue (its negative); for a prompt with a
    bright (dark) word, how far the mean brightness lies above (below) mid-grey; 0 otherwise. They
    need prompts, and show in minutes on a CPU that a policy learns per prompt.
``prompt_match`` / ``prompt_match_smooth``
    Prompt following of the embedded text-to-image model (:mod:`~diffusion_gym.rewards.prompt_match`):
    1 when the image shows the prompted digit (the shipped classifier) with the prompted stroke
    weight (ink above / below the digit's median), else 0; the smooth variant ``p(digit) ·
    σ(±ink margin / 4)`` for training.

``image_reward``
    ImageReward (:mod:`~diffusion_gym.rewards.image_reward`): BLIP's ViT-L and cross-attention BERT from
    transformers with the published ``ImageReward.pt`` and its normalisation; the package itself does
    not install next to this project's dependencies.
``clip_score`` / ``pickscore`` / ``hpsv2``
    Image–prompt preference rewards on CLIP-style dual encoders (:mod:`~diffusion_gym.rewards.preference`):
    ``max(100 · cos, 0)`` on OpenAI's CLIP ViT-L-14; PickScore's ``exp(logit_scale) · cos``; HPS v2.1's
    ``cos`` on open_clip's ViT-H-14. Weights from a path or the Hugging Face cache, never downloaded;
    ``random_init=True`` for tests.
``ocr`` / ``face_confidence`` / ``brisque``
    Rewards whose models ship in their packages (:mod:`~diffusion_gym.rewards.vision`; extras ``ocr``,
    ``faces``, ``quality``): edit similarity of the text read by PP-OCR to the prompt's quoted text;
    the highest YuNet face confidence (0 without a face); minus the BRISQUE no-reference quality score.
``remote``
    A reward scored by a server in another process or on another machine, over a small HTTP protocol
    (:mod:`~diffusion_gym.rewards.remote`; ``python -m diffusion_gym.rewards.remote --reward NAME``
    serves any registered reward), with timeouts and retries.

Several rewards
---------------
A mapping of names to weights (``make_reward({"jpeg_compressibility": 1.0, "digit_confidence": 2.0},
normalize="rank")``; in YAML ``reward: {pickscore: 1.0, ocr: 0.5}``) builds a
:class:`~diffusion_gym.rewards.multi.WeightedRewards`: the weighted sum of the rewards, each normalised
first (``"none"``, ``"running"`` mean/std, or ``"rank"`` in the batch), with each component's raw
values kept for logging.

Modules
-------
:mod:`~diffusion_gym.rewards.registry` (:data:`RewardFn`, :func:`register_reward`,
:func:`make_reward`, :class:`CheckedReward`), :mod:`~diffusion_gym.rewards.multi` (:class:`WeightedRewards`),
:mod:`~diffusion_gym.rewards.remote` (:class:`RemoteReward`, :func:`serve_reward`),
:mod:`~diffusion_gym.rewards.vision`, :mod:`~diffusion_gym.rewards.preference`,
:mod:`~diffusion_gym.rewards.image_reward`,
:mod:`~diffusion_gym.rewards.host` (:func:`host_reward`,
:func:`reward_async`), :mod:`~diffusion_gym.rewards.jpeg`, :mod:`~diffusion_gym.rewards.aesthetic`,
:mod:`~diffusion_gym.rewards.digits`, :mod:`~diffusion_gym.rewards.prompt_toys` and
:mod:`~diffusion_gym.rewards.prompt_match`; the CLIP encoder
lives in :mod:`diffusion_gym.nets`. All
their public names are importable from here.
"""

from __future__ import annotations

from diffusion_gym.nets import CLIP_WEIGHTS_ENV, ClipImageEncoder, clip_hub_files
from diffusion_gym.nets import _resolve_clip_weights as _resolve_clip_weights
from diffusion_gym.rewards.aesthetic import (
    AESTHETIC_MLP_ENV,
    AESTHETIC_MLP_FILENAME,
    AESTHETIC_MLP_HUB_FILES,
    AestheticMLP,
    LaionAestheticScorer,
    laion_aesthetic,
)
from diffusion_gym.rewards.aesthetic import _load_mlp_state as _load_mlp_state
from diffusion_gym.rewards.aesthetic import _resolve_mlp_weights as _resolve_mlp_weights
from diffusion_gym.rewards.digits import digit_confidence
from diffusion_gym.rewards.host import host_reward, reward_async, runs_on_host
from diffusion_gym.rewards.image_reward import ImageRewardScorer, image_reward
from diffusion_gym.rewards.jpeg import (
    JPEG_QUALITY,
    JPEG_QUALITY_RANGE,
    jpeg_compressibility,
    jpeg_incompressibility,
    jpeg_size_kb,
    set_jpeg_workers,
)
from diffusion_gym.rewards.multi import NORMALIZATIONS, WeightedRewards, evaluation_mode, weighted_rewards_of
from diffusion_gym.rewards.preference import DualEncoderScorer, clip_score, hpsv2, pickscore
from diffusion_gym.rewards.prompt_match import prompt_match, prompt_match_smooth
from diffusion_gym.rewards.prompt_toys import prompt_brightness, prompt_color
from diffusion_gym.rewards.registry import _REGISTRY as _REGISTRY
from diffusion_gym.rewards.registry import CheckedReward, RewardFn, available_rewards, make_reward, register_reward
from diffusion_gym.rewards.remote import RemoteReward, RemoteRewardError, serve_reward
from diffusion_gym.rewards.vision import brisque, face_confidence, ocr

__all__ = [
    "AESTHETIC_MLP_ENV",
    "AESTHETIC_MLP_FILENAME",
    "AESTHETIC_MLP_HUB_FILES",
    "CLIP_WEIGHTS_ENV",
    "JPEG_QUALITY",
    "JPEG_QUALITY_RANGE",
    "NORMALIZATIONS",
    "AestheticMLP",
    "CheckedReward",
    "DualEncoderScorer",
    "ClipImageEncoder",
    "ImageRewardScorer",
    "LaionAestheticScorer",
    "RemoteReward",
    "RemoteRewardError",
    "RewardFn",
    "WeightedRewards",
    "available_rewards",
    "brisque",
    "clip_hub_files",
    "clip_score",
    "digit_confidence",
    "evaluation_mode",
    "face_confidence",
    "host_reward",
    "hpsv2",
    "image_reward",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "jpeg_size_kb",
    "laion_aesthetic",
    "make_reward",
    "ocr",
    "pickscore",
    "prompt_brightness",
    "prompt_color",
    "prompt_match",
    "prompt_match_smooth",
    "register_reward",
    "reward_async",
    "runs_on_host",
    "serve_reward",
    "set_jpeg_workers",
    "weighted_rewards_of",
]

register_reward("jpeg_compressibility", jpeg_compressibility)
register_reward("jpeg_incompressibility", jpeg_incompressibility)
register_reward("laion_aesthetic", laion_aesthetic)
register_reward("digit_confidence", digit_confidence)
register_reward("prompt_brightness", prompt_brightness)
register_reward("prompt_color", prompt_color)
register_reward("prompt_match", prompt_match)
register_reward("prompt_match_smooth", prompt_match_smooth)
register_reward("remote", RemoteReward)
register_reward("clip_score", clip_score)
register_reward("pickscore", pickscore)
register_reward("hpsv2", hpsv2)
register_reward("image_reward", image_reward)
register_reward("ocr", ocr)
register_reward("face_confidence", face_confidence)
register_reward("brisque", brisque)
