"""The FLUX family: ``FluxTransformer2DModel`` over packed latents, with a T5 and a CLIP text encoder.

Components: a ``FluxTransformer2DModel`` (the trainable denoiser, predicting the velocity ``v = ε −
x0``), an ``AutoencoderKL`` (16 latent channels, ``scaling_factor`` and ``shift_factor``), a
``CLIPTextModel`` (its pooled output only), a ``T5EncoderModel`` (its token embeddings) and a
:class:`~diffusion_gym.sampling.FluxFlowMatchScheduler` (``FluxPipeline``'s sigmas and dynamic shift).

The conditioning and the network call follow diffusers' ``FluxPipeline`` exactly:

* the T5 embeddings of ``max_sequence_length`` tokens are ``encoder_hidden_states``; CLIP's pooled
  output (77 tokens) is ``pooled_projections``; text position ids are zeros;
* states are the env's ``(B, C, h, w)`` latents; the call packs them into ``(B, h/2 · w/2, 4C)``
  tokens of 2×2 patches with image position ids ``(0, row, col)``, and unpacks the velocity back;
* the timestep input is the flow time ``t`` itself (the pipeline's ``timestep / 1000``);
* guidance: FLUX.1-dev is guidance-distilled, so ``guidance_scale`` is a network input (the
  ``guidance`` embedding, 3.5 by default), not classifier-free guidance: one network call per
  step and no negative prompt. A transformer without ``guidance_embeds`` (FLUX.1-schnell) ignores it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from diffusion_gym.families.base import Conditioning, ModelFamily, Network, batch_timesteps, check_guidance_scale
from diffusion_gym.families.flow_text import save_transformer_lora
from diffusion_gym.families.latent_text import as_prompts
from diffusion_gym.families.vae import VaeLatents
from diffusion_gym.sampling import FluxFlowMatchScheduler

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

FLUX_DEFAULT_GUIDANCE = 3.5
"""``FluxPipeline``'s default guidance scale (the guidance embedding of FLUX.1-dev)."""
FLUX_DEFAULT_SAMPLE_SIZE = 128
"""``FluxPipeline``'s default latent size before the VAE factor (1024-pixel images)."""


def pack_latents(x: Tensor) -> Tensor:
    """``(B, C, h, w)`` latents as ``(B, h/2 · w/2, 4C)`` tokens of 2×2 patches (``FluxPipeline``'s layout)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of :func:`pack_latents` for latents of ``height × width``."""
    b, _, features = tokens.shape
    c = features // 4
    return tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def image_position_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``(h/2 · w/2, 3)`` position ids ``(0, row, col)`` of the packed latent tokens."""
    rows = torch.arange(height // 2).view(-1, 1).expand(height // 2, width // 2)
    cols = torch.arange(width // 2).view(1, -1).expand(height // 2, width // 2)
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


class FluxFamily(VaeLatents, ModelFamily):
    """FLUX.1 as a model family (see the module docstring).

    Args:
        transformer: the denoiser (``FluxTransformer2DModel``).
        vae: the autoencoder.
        clip: ``(CLIPTextModel, its tokenizer)``.
        t5: ``(T5EncoderModel, its tokenizer)``.
        scheduler: a ``FlowMatchEulerDiscreteScheduler`` config source (turned into a
            :class:`~diffusion_gym.sampling.FluxFlowMatchScheduler` for this resolution).
        max_sequence_length: T5 tokens (``FluxPipeline``'s default 512).
        resolution: ``(height, width)`` (default: ``FluxPipeline``'s, 128 × the VAE's scale factor: 1024
            for FLUX.1).

    Raises:
        ValueError: for a resolution the VAE and the 2×2 packing cannot produce, or mismatched widths.
    """

    name = "flux"
    text_conditioned = True

    def __init__(
        self,
        transformer: nn.Module,
        vae: nn.Module,
        clip: tuple[PreTrainedModel, PreTrainedTokenizerBase],
        t5: tuple[PreTrainedModel, PreTrainedTokenizerBase],
        scheduler: Any,
        *,
        max_sequence_length: int = 512,
        resolution: tuple[int, int] | None = None,
    ) -> None:
        self.variant = "flux"
        """The flow model's kind (``"flux"``)."""
        self.denoiser = transformer.eval()
        self.vae = vae.requires_grad_(False).eval()
        self.clip = (clip[0].requires_grad_(False).eval(), clip[1])
        self.t5 = (t5[0].requires_grad_(False).eval(), t5[1])
        self.text_encoders = [self.clip[0], self.t5[0]]
        self.max_sequence_length = int(max_sequence_length)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        multiple = self.vae_scale_factor * 2
        size = FLUX_DEFAULT_SAMPLE_SIZE * self.vae_scale_factor
        height, width = resolution or (size, size)
        if height % multiple or width % multiple or min(height, width) <= 0:
            raise ValueError(
                f"resolution must be positive multiples of {multiple} (VAE scale factor × 2 for the 2×2 packing), "
                f"got {(height, width)}"
            )
        self.resolution = (int(height), int(width))
        config = transformer.config
        if int(config.in_channels) != 4 * int(vae.config.latent_channels):
            raise ValueError(
                f"the transformer takes {config.in_channels} features per token; 2×2 patches of the VAE's "
                f"{vae.config.latent_channels} latent channels give {4 * int(vae.config.latent_channels)}"
            )
        self.scheduler = FluxFlowMatchScheduler.from_config(scheduler.config)
        self.scheduler.image_seq_len = (height // multiple) * (width // multiple)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(latent channels, H / f, W / f)``: the unpacked latents the env's states are."""
        height, width = self.resolution
        f = self.vae_scale_factor
        return (int(self.vae.config.latent_channels), height // f, width // f)

    @property
    def default_guidance_scale(self) -> float:
        """3.5, ``FluxPipeline``'s default (the guidance embedding's input)."""
        return FLUX_DEFAULT_GUIDANCE

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """T5 embeddings ``(B, max_sequence_length, D)`` and CLIP's pooled output ``(B, P)``."""
        encoder, tokenizer = self.clip
        ids = tokenizer(
            prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(encoder.device)
        pooled = encoder(ids, output_hidden_states=False).pooler_output
        encoder, tokenizer = self.t5
        ids = tokenizer(
            prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True, return_tensors="pt"
        ).input_ids.to(encoder.device)
        return encoder(ids, output_hidden_states=False)[0], pooled

    def encode_conditions(
        self, conditions: str | Sequence[str], negative: str | Sequence[str] | None = None
    ) -> Conditioning:
        """Prompts as a :class:`Conditioning` (T5 embeds and CLIP pooled; no unconditional branch).

        Raises:
            ValueError: for no prompts, prompts that are not strings, or a negative prompt (FLUX.1's
                guidance is distilled into the network: set ``guidance_scale`` instead).
        """
        prompts = as_prompts(conditions)
        if not prompts:
            raise ValueError("conditions must hold at least one prompt, got none")
        if negative is not None and negative != "":
            raise ValueError(
                f"FLUX takes no negative prompt (got {negative!r}): its guidance is distilled into the network, "
                "set guidance_scale instead"
            )
        embeds, pooled = self.encode_text(prompts)
        return Conditioning(embeds=embeds, pooled=pooled).to(self.device, self.dtype)

    def model_output(
        self,
        x: Tensor,
        t: Tensor | int,
        cond: Conditioning,
        guidance_scale: float = FLUX_DEFAULT_GUIDANCE,
        *,
        network: Network | None = None,
    ) -> Tensor:
        """The velocity at states ``x`` ``(B, C, h, w)`` and scheduler timesteps ``t`` (``t = σ · 1000``).

        Raises:
            ValueError: for a bad guidance scale, or a conditioning without embeds and pooled embeddings.
        """
        g = check_guidance_scale(guidance_scale)
        if cond.embeds is None or cond.pooled is None:
            raise ValueError(f"a FLUX conditioning needs embeds and pooled, got fields {sorted(cond.tensors())}")
        net = self.denoiser if network is None else network
        height, width = x.shape[-2:]
        tokens = pack_latents(x.to(self.dtype))
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full((x.shape[0],), g, device=x.device, dtype=torch.float32)
        out = net(
            hidden_states=tokens,
            timestep=batch_timesteps(t, x).to(tokens.dtype) / 1000,
            guidance=guidance,
            pooled_projections=cond.pooled,
            encoder_hidden_states=cond.embeds,
            txt_ids=torch.zeros((cond.embeds.shape[1], 3), device=x.device, dtype=tokens.dtype),
            img_ids=image_position_ids(height, width, x.device, tokens.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, height, width)

    def save_lora_weights(self, folder: Path, lora_state: dict[str, Tensor], adapter_config: dict[str, Any]) -> None:
        """Write the transformer's LoRA adapters in diffusers' LoRA format (``FluxPipeline.load_lora_weights``).

        Args:
            folder: the output folder (created).
            lora_state: ``peft.get_peft_model_state_dict(transformer)``.
            adapter_config: the adapter's ``LoraConfig`` as a dict.
        """
        from diffusers import FluxPipeline

        save_transformer_lora(FluxPipeline, folder, lora_state, adapter_config)

    def pipeline(self) -> Any:
        """The diffusers ``FluxPipeline`` over these components (shared; a fresh scheduler)."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        pipe = FluxPipeline(
            transformer=self.denoiser,
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config),
            vae=self.vae,
            text_encoder=self.clip[0],
            tokenizer=self.clip[1],
            text_encoder_2=self.t5[0],
            tokenizer_2=self.t5[1],
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe
