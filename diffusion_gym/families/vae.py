"""The VAE side of latent families: decode states to images for the reward, encode reference images to states.

Latents are ``(VAE posterior mean − shift) × scale`` as diffusers' pipelines define them: SD/SDXL scale
by ``scaling_factor``; SD3/FLUX also subtract ``shift_factor``; a VAE with per-channel
``latents_mean`` / ``latents_std`` uses those. Decoding inverts it and maps ``[-1, 1]`` to ``[0, 1]``.
Encoding takes the posterior's *mean* (its mode), not a sample, so that a reference image gives the
same ``x_0`` every epoch and an HRF start adds only the diffusion noise.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from diffusion_gym.families.base import in_chunks


class VaeLatents:
    """Mixin: decode and encode through the family's ``vae`` (``AutoencoderKL``) at its ``resolution``."""

    vae: Any
    denoiser: Any
    resolution: tuple[int, int]
    vae_scale_factor: int
    dtype: torch.dtype

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(latent channels, H / f, W / f)`` with ``f`` the VAE's scale factor."""
        height, width = self.resolution
        f = self.vae_scale_factor
        return (int(self.denoiser.config.in_channels), height // f, width // f)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(3, H, W)``: the VAE's image channels at :attr:`resolution`."""
        return (int(self.vae.config.in_channels), *self.resolution)

    def _latent_stats(self, like: Tensor) -> tuple[Tensor | float, Tensor | float]:
        """``(shift, scale)`` with latents = (VAE mean − shift) · scale (diffusers' SD/SDXL/SD3 conventions)."""
        config = self.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            view = (1, -1, 1, 1)
            shift = torch.tensor(mean, device=like.device, dtype=like.dtype).view(view)
            scale = config.scaling_factor / torch.tensor(std, device=like.device, dtype=like.dtype).view(view)
            return shift, scale
        return float(getattr(config, "shift_factor", None) or 0.0), float(config.scaling_factor)

    @torch.no_grad()
    def decode(self, x: Tensor, batch_size: int = 16) -> Tensor:
        """Images in ``[0, 1]`` (float32, on ``x``'s device) from latents: ``VAE.decode(x / scaling_factor)``."""
        if x.shape[0] == 0:
            return torch.zeros((0, *self.image_shape), device=x.device)

        def one(chunk: Tensor) -> Tensor:
            latents = chunk.to(self.vae.device, self.vae.dtype)
            shift, scale = self._latent_stats(latents)
            images = self.vae.decode(latents / scale + shift, return_dict=False)[0]
            return (images.float() / 2 + 0.5).clamp(0, 1).to(x.device)

        return torch.cat(in_chunks(one, x, batch_size))

    @torch.no_grad()
    def encode_images(self, images: Tensor, batch_size: int = 16) -> Tensor:
        """Latents ``x_0`` (the denoiser's dtype, on ``images``' device) of images in ``[0, 1]``.

        ``(VAE latent distribution's mean − shift) × scaling_factor``; the mean makes the encoding
        deterministic (see the module docstring).

        Raises:
            ValueError: when the images are not ``(B, *image_shape)``.
        """
        if images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
            expected = ", ".join(map(str, self.image_shape))
            raise ValueError(
                f"images must have shape (B, {expected}) (the family's resolution), got {tuple(images.shape)}"
            )
        if images.shape[0] == 0:
            return torch.zeros((0, *self.sample_shape), device=images.device, dtype=self.dtype)

        def one(chunk: Tensor) -> Tensor:
            pixels = (2 * chunk.float() - 1).to(self.vae.device, self.vae.dtype)
            mean = self.vae.encode(pixels).latent_dist.mean
            shift, scale = self._latent_stats(mean)
            return ((mean - shift) * scale).to(images.device, self.dtype)

        return torch.cat(in_chunks(one, images, batch_size))
