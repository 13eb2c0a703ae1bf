"""The latent text-to-image family: Stable Diffusion 1.x/2.x and SDXL.

Components: a ``UNet2DConditionModel`` (the trainable denoiser), an ``AutoencoderKL``, CLIP text
encoder(s) and tokenizer(s) (``transformers``, the ``text`` extra) and a ``DDIMScheduler`` built from
the pipeline's scheduler config, so that :func:`diffusion_gym.sampling.make_schedule` serves it
(eps- and v-prediction alike).

The conditioning follows diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``
exactly (a chain of :meth:`LatentTextFamily.model_output` and ``sampling.denoise_step`` reproduces
their latents, ``tests/test_families.py``):

* SD: each prompt is padded to the tokenizer's ``model_max_length``; the embeddings are the text
  encoder's last hidden state.
* SDXL: the prompt goes through both encoders; the embeddings are the *penultimate* hidden states of
  both, concatenated along the feature axis, and the pooled embeddings (``text_embeds``) are the
  projected output of the second encoder (``CLIPTextModelWithProjection``). The micro-conditioning
  ``time_ids`` are ``(original height, original width, crop top, crop left, target height, target
  width)`` = ``(H, W, 0, 0, H, W)`` for the generated resolution, the same for both guidance branches.
* Negative prompts default to diffusers' default unconditional input: the empty prompt ``""``, except
  for SDXL pipelines with ``force_zeros_for_empty_prompt`` (SDXL base), whose unconditional
  embeddings are then all zeros. An explicit ``negative=""`` encodes the empty prompt.
* Classifier-free guidance runs the UNet once on the batch ``[unconditional, conditional]`` and returns
  ``ε_u + g·(ε_c − ε_u)``. At ``g = 1`` only the conditional half runs (as diffusers does). Diffusers
  skips guidance for every ``g <= 1``; here ``g < 1`` applies the formula (``g = 0`` is the
  unconditional model).

:meth:`LatentTextFamily.decode` divides latents by the VAE's ``scaling_factor`` and decodes them to
``[0, 1]``; :meth:`LatentTextFamily.encode_images` encodes images to the *mean* of the VAE's latent
distribution times the scaling factor. The mean (the distribution's mode), not a sample, makes the
encoding deterministic: a reference image gives the same ``x_0`` in every epoch, and an HRF start
adds only the diffusion noise, not the VAE's posterior noise as well.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor, nn

from diffusion_gym.families.base import (
    Conditioning,
    ModelFamily,
    Network,
    batch_timesteps,
    check_guidance_scale,
    classifier_free_guidance,
)
from diffusion_gym.families.vae import VaeLatents

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

VARIANTS = ("sd", "sdxl")
"""``"sd"``: one text encoder (SD 1.x/2.x); ``"sdxl"``: two, pooled embeddings and time ids."""
DEFAULT_GUIDANCE = {"sd": 7.5, "sdxl": 5.0}
"""The pipelines' default guidance scales."""


def as_prompts(prompts: str | Sequence[str], what: str = "prompts") -> list[str]:
    """A list of prompts (a single string is one prompt).

    Raises:
        ValueError: when ``prompts`` is not a string or a sequence of strings.
    """
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, Tensor) or not isinstance(prompts, Sequence):
        raise ValueError(f"{what} must be a string or a sequence of strings, got {type(prompts).__name__}")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"{what} must be strings, got {bad[0]!r} ({type(bad[0]).__name__})")
    return list(prompts)


def _variant(unet: UNet2DConditionModel, text_encoders: Sequence[nn.Module], tokenizers: Sequence[Any]) -> str:
    """``"sd"`` or ``"sdxl"`` from the UNet's config, checked against the number of encoders and tokenizers."""
    config = unet.config
    if getattr(config, "time_cond_proj_dim", None) is not None:
        raise ValueError(
            f"unsupported UNet: time_cond_proj_dim={config.time_cond_proj_dim} (guidance-distilled models "
            "embed the guidance scale); valid choice: None"
        )
    embed_type = getattr(config, "addition_embed_type", None)
    if embed_type not in (None, "text_time"):
        raise ValueError(
            f"unsupported UNet addition_embed_type {embed_type!r}; valid choices: None (SD), 'text_time' (SDXL)"
        )
    variant = "sdxl" if embed_type == "text_time" else "sd"
    wanted = 2 if variant == "sdxl" else 1
    if len(text_encoders) != wanted or len(tokenizers) != wanted:
        raise ValueError(
            f"a {variant} UNet needs {wanted} text encoder(s) and tokenizer(s), got {len(text_encoders)} and "
            f"{len(tokenizers)}"
        )
    return variant


class LatentTextFamily(VaeLatents, ModelFamily):
    """A latent text-to-image model (SD 1.x/2.x or SDXL); see the module docstring.

    The VAE and text encoders are frozen (``requires_grad_(False)``, eval mode); the UNet is put in
    eval mode. Components keep their devices and dtypes.

    Args:
        unet: the denoiser.
        vae: the autoencoder between latents and images.
        text_encoders: ``[CLIPTextModel]`` (SD) or ``[CLIPTextModel, CLIPTextModelWithProjection]`` (SDXL).
        tokenizers: one CLIP tokenizer per text encoder.
        scheduler: a ``DDIMScheduler`` (or ``DDPMScheduler``) with the pipeline's config.
        force_zeros_for_empty_prompt: SDXL: no negative prompt means all-zero unconditional embeddings
            (diffusers' pipeline config of that name; True for SDXL base).
        resolution: ``(height, width)`` of the generated images (default: the UNet's sample size times
            the VAE's scale factor, as the pipelines).

    Raises:
        ValueError: for an unsupported UNet, mismatched components or a resolution the VAE cannot
            produce.
    """

    name = "latent-text"
    text_conditioned = True

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoders: Sequence[PreTrainedModel],
        tokenizers: Sequence[PreTrainedTokenizerBase],
        scheduler: SchedulerMixin,
        *,
        force_zeros_for_empty_prompt: bool = False,
        resolution: tuple[int, int] | None = None,
    ) -> None:
        self.variant = _variant(unet, text_encoders, tokenizers)
        """``"sd"`` or ``"sdxl"``."""
        self.denoiser = unet.eval()
        self.vae = vae.requires_grad_(False).eval()
        self.text_encoders = [encoder.requires_grad_(False).eval() for encoder in text_encoders]
        self.tokenizers = list(tokenizers)
        self.scheduler = scheduler
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt) and self.variant == "sdxl"
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        size = unet.config.sample_size
        default = (size, size) if isinstance(size, int) else tuple(size)
        height, width = resolution or (default[0] * self.vae_scale_factor, default[1] * self.vae_scale_factor)
        if height % self.vae_scale_factor or width % self.vae_scale_factor or min(height, width) <= 0:
            raise ValueError(
                f"resolution must be positive multiples of the VAE's scale factor {self.vae_scale_factor}, "
                f"got {(height, width)}"
            )
        self.resolution = (int(height), int(width))
        if self.variant == "sdxl":
            self._check_time_embedding()

    def _check_time_embedding(self) -> None:
        """SDXL: the UNet's added-embedding width must equal 6 time ids plus the pooled embedding's width."""
        config = self.denoiser.config
        projection_dim = int(self.text_encoders[-1].config.projection_dim)
        passed = int(config.addition_time_embed_dim) * 6 + projection_dim
        expected = int(self.denoiser.add_embedding.linear_1.in_features)
        if passed != expected:
            raise ValueError(
                f"the UNet's added embedding takes {expected} features, but 6 time ids × addition_time_embed_dim "
                f"{config.addition_time_embed_dim} + the second text encoder's projection_dim {projection_dim} "
                f"= {passed}"
            )

    @property
    def default_guidance_scale(self) -> float:
        """7.5 (SD) or 5.0 (SDXL), the pipelines' defaults."""
        return DEFAULT_GUIDANCE[self.variant]

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> tuple[Tensor, Tensor | None]:
        """Prompt embeddings ``(B, L, D)`` and (SDXL) pooled embeddings ``(B, P)``, as the pipelines compute them."""
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            tokens = tokenizer(
                prompts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            )
            ids = tokens.input_ids.to(encoder.device)
            if self.variant == "sd":
                use_mask = getattr(encoder.config, "use_attention_mask", False)
                mask = tokens.attention_mask.to(encoder.device) if use_mask else None
                hidden.append(encoder(ids, attention_mask=mask)[0])
                continue
            out = encoder(ids, output_hidden_states=True)
            if out[0].ndim == 2:  # CLIPTextModelWithProjection: the projected pooled output comes first
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled

    def _negative_prompts(self, negative: str | Sequence[str] | None, batch: int) -> list[str] | None:
        """The negative prompts of a batch (``None``: all-zero unconditional embeddings)."""
        if negative is None:
            return None if self.force_zeros_for_empty_prompt else [""] * batch
        if isinstance(negative, str):
            return [negative] * batch
        prompts = as_prompts(negative, "negative prompts")
        if len(prompts) != batch:
            raise ValueError(
                f"got {len(prompts)} negative prompts for {batch} prompts; pass one per prompt or one string"
            )
        return prompts

    def time_ids(self, batch: int) -> Tensor:
        """SDXL's ``(batch, 6)`` micro-conditioning ``(H, W, 0, 0, H, W)`` at :attr:`resolution`."""
        height, width = self.resolution
        row = torch.tensor([[height, width, 0, 0, height, width]], dtype=self.dtype, device=self.device)
        return row.repeat(batch, 1)

    def encode_conditions(
        self, conditions: str | Sequence[str], negative: str | Sequence[str] | None = None
    ) -> Conditioning:
        """Encode prompts and negative prompts (see the module docstring), on :attr:`device` in the UNet's dtype.

        Args:
            conditions: the prompts (a string is one prompt).
            negative: one negative prompt per prompt, or one string for all; ``None``: the pipeline's
                default unconditional input (``""``, or zeros for SDXL with ``force_zeros_for_empty_prompt``).

        Returns:
            A :class:`Conditioning` with ``embeds`` and ``negative_embeds`` (SDXL also ``pooled``,
            ``negative_pooled``, ``time_ids`` and ``negative_time_ids``).

        Raises:
            ValueError: for no prompts, prompts that are not strings, or a negative-prompt count that
                differs from the prompts'.
        """
        prompts = as_prompts(conditions)
        if not prompts:
            raise ValueError("conditions must hold at least one prompt, got none")
        negatives = self._negative_prompts(negative, len(prompts))
        embeds, pooled = self.encode_text(prompts)
        if negatives is None:
            negative_embeds, negative_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        else:
            negative_embeds, negative_pooled = self.encode_text(negatives)
        fields: dict[str, Tensor | None] = {"embeds": embeds, "negative_embeds": negative_embeds}
        if self.variant == "sdxl":
            time_ids = self.time_ids(len(prompts))
            fields.update(pooled=pooled, negative_pooled=negative_pooled, time_ids=time_ids, negative_time_ids=time_ids)
        return Conditioning(**fields).to(self.device, self.dtype)

    def _call(
        self, net: Network, x: Tensor, t: Tensor, embeds: Tensor, pooled: Tensor | None, time_ids: Tensor | None
    ) -> Tensor:
        added = {"text_embeds": pooled, "time_ids": time_ids} if self.variant == "sdxl" else None
        return net(x, t, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False)[0]

    def model_output(
        self,
        x: Tensor,
        t: Tensor | int,
        cond: Conditioning,
        guidance_scale: float = 1.0,
        *,
        network: Network | None = None,
    ) -> Tensor:
        """The guided UNet prediction (see :meth:`ModelFamily.model_output` and the module docstring).

        Raises:
            ValueError: for a bad guidance scale, a conditioning without prompt embeddings, or (for
                ``g != 1``) without the unconditional branch.
        """
        g = check_guidance_scale(guidance_scale)
        if cond.embeds is None or (self.variant == "sdxl" and (cond.pooled is None or cond.time_ids is None)):
            needs = "embeds, pooled and time_ids" if self.variant == "sdxl" else "embeds"
            raise ValueError(
                f"a {self.variant} conditioning needs {needs} (from encode_conditions), "
                f"got fields {sorted(cond.tensors())}"
            )
        net = self.denoiser if network is None else network

        def call(x: Tensor, t: Tensor, embeds: Tensor, pooled: Tensor | None, time_ids: Tensor | None) -> Tensor:
            return self._call(net, x, t, embeds, pooled, time_ids)

        return classifier_free_guidance(
            call,
            x.to(self.dtype),
            batch_timesteps(t, x),
            (cond.embeds, cond.pooled, cond.time_ids),
            (cond.negative_embeds, cond.negative_pooled, cond.negative_time_ids),
            g,
        )

    def pipeline(self) -> Any:
        """The diffusers ``StableDiffusionPipeline`` (SDXL: ``StableDiffusionXLPipeline``) over these components.

        The components are shared, not copied (training the family's UNet changes the pipeline's); the
        scheduler is a fresh ``DDIMScheduler`` of the family's config; no safety checker, no watermark.
        The progress bar is off.
        """
        from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

        scheduler = DDIMScheduler.from_config(self.scheduler.config)
        if self.variant == "sd":
            pipe = StableDiffusionPipeline(
                vae=self.vae,
                text_encoder=self.text_encoders[0],
                tokenizer=self.tokenizers[0],
                unet=self.denoiser,
                scheduler=scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        else:
            pipe = StableDiffusionXLPipeline(
                vae=self.vae,
                text_encoder=self.text_encoders[0],
                text_encoder_2=self.text_encoders[1],
                tokenizer=self.tokenizers[0],
                tokenizer_2=self.tokenizers[1],
                unet=self.denoiser,
                scheduler=scheduler,
                force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt,
                add_watermarker=False,
            )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def save_lora_weights(self, folder: Path, lora_state: dict[str, Tensor], adapter_config: dict[str, Any]) -> None:
        """Write the UNet's LoRA adapters as diffusers' LoRA format into ``folder``.

        ``pytorch_lora_weights.safetensors`` with the ``unet.``-prefixed PEFT keys and the adapter's
        config as metadata, which ``StableDiffusionPipeline.load_lora_weights(folder)`` (SDXL:
        ``StableDiffusionXLPipeline``) loads.

        Args:
            folder: the output folder (created).
            lora_state: ``peft.get_peft_model_state_dict(unet)``.
            adapter_config: the adapter's ``LoraConfig`` as a dict (rank, alpha, target modules).
        """
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        pipeline = StableDiffusionXLPipeline if self.variant == "sdxl" else StableDiffusionPipeline
        folder.mkdir(parents=True, exist_ok=True)
        pipeline.save_lora_weights(
            folder, unet_lora_layers=lora_state, unet_lora_adapter_metadata=adapter_config, safe_serialization=True
        )
