"""The flow-matching text-to-image family: Stable Diffusion 3 / 3.5 (``SD3Transformer2DModel``).

Components: an ``SD3Transformer2DModel`` (the trainable denoiser, predicting the velocity ``v = ε −
x0``), an ``AutoencoderKL`` (16 latent channels in SD3, with a ``shift_factor``), two CLIP text
encoders with projection (CLIP-L, CLIP-G) and, optionally, a T5 encoder, and a
``FlowMatchEulerDiscreteScheduler`` from the pipeline's config, which
:func:`diffusion_gym.sampling.make_schedule` turns into a :class:`~diffusion_gym.sampling.FlowSchedule`
(Flow-GRPO's SDE step; noise level 0 is the pipeline's Euler ODE).

The conditioning follows diffusers' ``StableDiffusion3Pipeline`` exactly:

* each CLIP encoder's penultimate hidden states, concatenated along the features and zero-padded to
  the transformer's ``joint_attention_dim``, then the T5 token embeddings appended along the sequence
  (``max_sequence_length`` tokens; zeros when the pipeline has no T5 encoder, as diffusers does);
* the pooled embeddings: both CLIP encoders' projected outputs, concatenated;
* the negative prompt defaults to ``""``; classifier-free guidance runs the transformer once on
  ``[negative, positive]`` and returns ``v_u + g·(v_c − v_u)`` (``g = 1``: the conditional half only).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
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
from diffusion_gym.families.latent_text import as_prompts
from diffusion_gym.families.vae import VaeLatents

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SD3_DEFAULT_GUIDANCE = 7.0
"""``StableDiffusion3Pipeline``'s default guidance scale."""


def clip_hidden_and_pooled(
    tokenizer: PreTrainedTokenizerBase, encoder: PreTrainedModel, prompts: list[str]
) -> tuple[Tensor, Tensor]:
    """A projected CLIP encoder's penultimate hidden states ``(B, L, D)`` and projected pooled output ``(B, P)``.

    The prompts are padded to the tokenizer's ``model_max_length`` (SDXL's and SD3's pipelines).
    """
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(encoder.device)
    out = encoder(ids, output_hidden_states=True)
    return out.hidden_states[-2], out[0]


def save_transformer_lora(
    pipeline_class: Any, folder: Path, lora_state: dict[str, Tensor], adapter_config: dict[str, Any]
) -> None:
    """Write a transformer's LoRA adapters with ``pipeline_class.save_lora_weights`` (safetensors, with its config)."""
    folder.mkdir(parents=True, exist_ok=True)
    pipeline_class.save_lora_weights(
        folder,
        transformer_lora_layers=lora_state,
        transformer_lora_adapter_metadata=adapter_config,
        safe_serialization=True,
    )


class FlowTextFamily(VaeLatents, ModelFamily):
    """Stable Diffusion 3 / 3.5 as a model family (see the module docstring).

    Args:
        transformer: the denoiser (``SD3Transformer2DModel``).
        vae: the autoencoder.
        text_encoders: ``[CLIPTextModelWithProjection, CLIPTextModelWithProjection]`` (CLIP-L, CLIP-G).
        tokenizers: their CLIP tokenizers.
        scheduler: a ``FlowMatchEulerDiscreteScheduler``.
        t5: the T5 encoder and its tokenizer, or ``None`` (zero T5 embeddings, as the pipeline without it).
        max_sequence_length: T5 tokens (the pipeline's default 256; zero embeddings without a T5 encoder).
        resolution: ``(height, width)`` (default: the transformer's sample size times the VAE's scale factor).
        default_guidance_scale: the guidance scale when none is given (SD3's pipeline: 7.0).

    Raises:
        ValueError: for mismatched components or a resolution the VAE and patches cannot produce.
    """

    name = "flow-text"
    text_conditioned = True

    def __init__(
        self,
        transformer: nn.Module,
        vae: nn.Module,
        text_encoders: Sequence[PreTrainedModel],
        tokenizers: Sequence[PreTrainedTokenizerBase],
        scheduler: SchedulerMixin,
        *,
        t5: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None,
        max_sequence_length: int = 256,
        resolution: tuple[int, int] | None = None,
        default_guidance_scale: float = SD3_DEFAULT_GUIDANCE,
    ) -> None:
        if len(text_encoders) != 2 or len(tokenizers) != 2:
            raise ValueError(
                f"SD3 needs two CLIP text encoders and tokenizers, got {len(text_encoders)} and {len(tokenizers)}"
            )
        self.variant = "sd3"
        """The flow model's kind (``"sd3"``)."""
        self.denoiser = transformer.eval()
        self.vae = vae.requires_grad_(False).eval()
        self.text_encoders = [encoder.requires_grad_(False).eval() for encoder in text_encoders]
        self.tokenizers = list(tokenizers)
        self.t5 = None if t5 is None else (t5[0].requires_grad_(False).eval(), t5[1])
        self.scheduler = scheduler
        self.max_sequence_length = int(max_sequence_length)
        self._default_guidance = check_guidance_scale(default_guidance_scale)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        config = transformer.config
        multiple = self.vae_scale_factor * int(config.patch_size)
        size = int(config.sample_size) * self.vae_scale_factor
        height, width = resolution or (size, size)
        if height % multiple or width % multiple or min(height, width) <= 0:
            raise ValueError(
                f"resolution must be positive multiples of {multiple} (VAE scale factor × patch size), got "
                f"{(height, width)}"
            )
        self.resolution = (int(height), int(width))
        clip_width = sum(int(e.config.hidden_size) for e in self.text_encoders)
        pooled = sum(int(e.config.projection_dim) for e in self.text_encoders)
        if clip_width > config.joint_attention_dim or pooled != config.pooled_projection_dim:
            raise ValueError(
                f"the text encoders give {clip_width} features and {pooled} pooled ones; the transformer takes at most "
                f"{config.joint_attention_dim} and exactly {config.pooled_projection_dim}"
            )

    @property
    def default_guidance_scale(self) -> float:
        """The constructor's (7.0 by default, ``StableDiffusion3Pipeline``'s)."""
        return self._default_guidance

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """Prompt embeddings ``(B, 77 + max_sequence_length, joint_attention_dim)`` and pooled ``(B, P)``."""
        return self.text_features(prompts)

    def text_features(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """:meth:`encode_text` with autograd on (to train the text encoders, as the embedded model's script does)."""
        pairs = [
            clip_hidden_and_pooled(tok, enc, prompts)
            for tok, enc in zip(self.tokenizers, self.text_encoders, strict=True)
        ]
        clip = torch.cat([hidden for hidden, _ in pairs], dim=-1)
        width = int(self.denoiser.config.joint_attention_dim)
        clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))
        if self.t5 is None:
            t5 = torch.zeros((len(prompts), self.max_sequence_length, width), device=clip.device, dtype=clip.dtype)
        else:
            encoder, tokenizer = self.t5
            ids = tokenizer(
                prompts,
                padding="max_length",
                max_length=self.max_sequence_length,
                truncation=True,
                add_special_tokens=True,
                return_tensors="pt",
            ).input_ids.to(encoder.device)
            t5 = encoder(ids)[0].to(clip.dtype)
        return torch.cat([clip, t5], dim=-2), torch.cat([pooled for _, pooled in pairs], dim=-1)

    def encode_conditions(
        self, conditions: str | Sequence[str], negative: str | Sequence[str] | None = None
    ) -> Conditioning:
        """Prompts and negative prompts (default ``""``) as a :class:`Conditioning` (embeds and pooled, both branches).

        Raises:
            ValueError: for no prompts, prompts that are not strings, or a negative-prompt count that
                differs from the prompts'.
        """
        prompts = as_prompts(conditions)
        if not prompts:
            raise ValueError("conditions must hold at least one prompt, got none")
        if negative is None or isinstance(negative, str):
            negatives = [negative or ""] * len(prompts)
        else:
            negatives = as_prompts(negative, "negative prompts")
            if len(negatives) != len(prompts):
                raise ValueError(
                    f"got {len(negatives)} negative prompts for {len(prompts)} prompts; pass one per prompt or "
                    "one string"
                )
        embeds, pooled = self.encode_text(prompts)
        negative_embeds, negative_pooled = self.encode_text(negatives)
        return Conditioning(
            embeds=embeds, negative_embeds=negative_embeds, pooled=pooled, negative_pooled=negative_pooled
        ).to(self.device, self.dtype)

    def model_output(
        self,
        x: Tensor,
        t: Tensor | int,
        cond: Conditioning,
        guidance_scale: float = 1.0,
        *,
        network: Network | None = None,
    ) -> Tensor:
        """The (guided) velocity at states ``x`` and scheduler timesteps ``t`` (``t = σ · 1000``).

        Raises:
            ValueError: for a bad guidance scale, or a conditioning without embeds and pooled embeddings.
        """
        g = check_guidance_scale(guidance_scale)
        if cond.embeds is None or cond.pooled is None:
            raise ValueError(f"an SD3 conditioning needs embeds and pooled, got fields {sorted(cond.tensors())}")
        net = self.denoiser if network is None else network

        def call(x: Tensor, t: Tensor, embeds: Tensor, pooled: Tensor) -> Tensor:
            out = net(
                hidden_states=x, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False
            )
            return out[0]

        positive, negative = (cond.embeds, cond.pooled), (cond.negative_embeds, cond.negative_pooled)
        return classifier_free_guidance(call, x.to(self.dtype), batch_timesteps(t, x), positive, negative, g)

    def save_lora_weights(self, folder: Path, lora_state: dict[str, Tensor], adapter_config: dict[str, Any]) -> None:
        """Write the transformer's LoRA adapters in diffusers' LoRA format (SD3's ``load_lora_weights`` reads them).

        Args:
            folder: the output folder (created).
            lora_state: ``peft.get_peft_model_state_dict(transformer)``.
            adapter_config: the adapter's ``LoraConfig`` as a dict.
        """
        from diffusers import StableDiffusion3Pipeline

        save_transformer_lora(StableDiffusion3Pipeline, folder, lora_state, adapter_config)

    def pipeline(self) -> Any:
        """The diffusers ``StableDiffusion3Pipeline`` over these components (shared; a fresh scheduler)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

        encoder_3, tokenizer_3 = self.t5 if self.t5 is not None else (None, None)
        pipe = StableDiffusion3Pipeline(
            transformer=self.denoiser,
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config),
            vae=self.vae,
            text_encoder=self.text_encoders[0],
            tokenizer=self.tokenizers[0],
            text_encoder_2=self.text_encoders[1],
            tokenizer_2=self.tokenizers[1],
            text_encoder_3=encoder_3,
            tokenizer_3=tokenizer_3,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe
