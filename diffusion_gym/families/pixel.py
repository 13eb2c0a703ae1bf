"""The pixel family: a diffusers ``UNet2DModel`` denoising images directly, conditioned on class ids (or nothing).

This is what :func:`diffusion_gym.models.load_model` loads (the embedded digits model, google's DDPMs,
``random:`` architectures). States are images in ``[-1, 1]``, so :meth:`PixelFamily.decode` is
``(x + 1) / 2`` and :meth:`PixelFamily.encode_images` its inverse. The model has no unconditional
branch, so the only guidance scale is 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor

from diffusion_gym.families.base import (
    Conditioning,
    ModelFamily,
    Network,
    batch_timesteps,
    check_guidance_scale,
)
from diffusion_gym.models import LoadedModel
from diffusion_gym.sampling import to_unit_range


def _class_ids(conditions: Tensor | Sequence[int], num_classes: int) -> Tensor:
    """Class ids as a ``(B,)`` int64 tensor, checked to be integers in ``[0, num_classes)``."""
    if isinstance(conditions, Tensor):
        if conditions.dtype == torch.bool or conditions.is_floating_point() or conditions.is_complex():
            raise ValueError(f"class ids must be an integer tensor, got dtype {conditions.dtype}")
        if conditions.ndim != 1:
            raise ValueError(f"class ids must be a (B,) tensor, got shape {tuple(conditions.shape)}")
        ids = conditions.long()
    else:
        values = list(conditions)
        bad = [v for v in values if not isinstance(v, int) or isinstance(v, bool)]
        if bad:
            raise ValueError(f"class ids must be ints, got {bad[0]!r} ({type(bad[0]).__name__})")
        ids = torch.tensor(values, dtype=torch.long)
    if ids.numel() and bool(((ids < 0) | (ids >= num_classes)).any()):
        outside = ids[(ids < 0) | (ids >= num_classes)].tolist()
        raise ValueError(f"class ids must lie in [0, {num_classes - 1}], got {outside}")
    return ids


class PixelFamily(ModelFamily):
    """A pixel-space ``UNet2DModel`` and its scheduler.

    Args:
        unet: the denoiser (class-conditional through ``num_class_embeds``, or unconditional).
        scheduler: its ``DDIMScheduler`` / ``DDPMScheduler``.
    """

    name = "pixel"

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin) -> None:
        self.denoiser = unet
        self.scheduler = scheduler
        config = unet.config
        self.num_classes: int | None = getattr(config, "num_class_embeds", None)
        """Number of class ids (``None`` for an unconditional model)."""
        if self.num_classes is None and getattr(config, "class_embed_type", None) is not None:
            raise ValueError(
                f"unsupported UNet2DModel class_embed_type {config.class_embed_type!r}; valid choices: None "
                "(with num_class_embeds for class ids)"
            )

    @classmethod
    def from_loaded(cls, loaded: LoadedModel) -> PixelFamily:
        """The family of what :func:`diffusion_gym.models.load_model` returned."""
        return cls(loaded.unet, loaded.scheduler)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the UNet's images."""
        config = self.denoiser.config
        size = config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (int(config.in_channels), int(height), int(width))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """The states are the images: :attr:`sample_shape`."""
        return self.sample_shape

    def encode_conditions(self, conditions: Tensor | Sequence[int] | None, negative: Any = None) -> Conditioning:
        """Class ids as a :class:`Conditioning` with ``labels`` (empty for an unconditional model).

        Args:
            conditions: ``(B,)`` integer class ids (a tensor or a sequence of ints); ``None`` for an
                unconditional model.
            negative: must be ``None`` (negative prompts belong to text families).

        Raises:
            ValueError: for negative prompts, class ids that are not integers in ``[0, num_classes)``,
                missing ids for a class-conditional model or ids for an unconditional one.
        """
        if negative is not None:
            raise ValueError(f"the pixel family takes no negative prompts, got {negative!r}")
        if self.num_classes is None:
            if conditions is not None:
                raise ValueError("this UNet is unconditional: conditions must be None, got class ids")
            return Conditioning()
        if conditions is None:
            raise ValueError(f"this UNet is class-conditional: pass class ids in [0, {self.num_classes - 1}], got None")
        return Conditioning(labels=_class_ids(conditions, self.num_classes).to(self.device))

    def model_output(
        self,
        x: Tensor,
        t: Tensor | int,
        cond: Conditioning,
        guidance_scale: float = 1.0,
        *,
        network: Network | None = None,
    ) -> Tensor:
        """The UNet's prediction at ``(x, t, class ids)`` (see :meth:`ModelFamily.model_output`).

        Raises:
            ValueError: for a guidance scale other than 1 (the model has no unconditional branch), or
                missing class ids for a class-conditional model.
        """
        if check_guidance_scale(guidance_scale) != 1.0:
            raise ValueError(
                f"the pixel family has no unconditional branch: guidance_scale must be 1.0, got {guidance_scale!r}"
            )
        if self.num_classes is not None and cond.labels is None:
            raise ValueError("this UNet is class-conditional: the conditioning holds no class ids (labels)")
        net = self.denoiser if network is None else network
        labels = cond.labels if self.num_classes is not None else None
        return net(x, batch_timesteps(t, x), class_labels=labels, return_dict=False)[0]

    @torch.no_grad()
    def decode(self, x: Tensor, batch_size: int = 16) -> Tensor:
        """``(x + 1) / 2`` clamped to ``[0, 1]``, float32 (``batch_size`` is accepted for the interface)."""
        return to_unit_range(x)

    @torch.no_grad()
    def encode_images(self, images: Tensor, batch_size: int = 16) -> Tensor:
        """``2·images − 1`` in the denoiser's dtype: the states of images in ``[0, 1]`` (no chunks needed).

        Raises:
            ValueError: when the images are not ``(B, *image_shape)``.
        """
        if images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
            expected = ", ".join(map(str, self.image_shape))
            raise ValueError(f"images must have shape (B, {expected}), got {tuple(images.shape)}")
        return (2 * images.float() - 1).to(self.dtype)
