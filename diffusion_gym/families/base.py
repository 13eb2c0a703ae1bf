"""The interface every model family implements, and the conditioning it hands its denoiser.

A *model family* is what the env and the agents need to know about a diffusion model beyond the
policy math of :mod:`diffusion_gym.sampling`: how a condition (a class id, a prompt) becomes network
inputs (:meth:`ModelFamily.encode_conditions`), how the trainable network is called, classifier-free
guidance included (:meth:`ModelFamily.model_output`), how a state ``x`` becomes images for a reward
(:meth:`ModelFamily.decode`) and how reference images become clean states for HRF starts
(:meth:`ModelFamily.encode_images`). The env and the agents call these methods and never branch on
the family's name.

Every family's :class:`Conditioning` is the same dataclass, so callers slice, move and concatenate
conditions without knowing what they hold.
"""

from __future__ import annotations

import abc
import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor, nn

from diffusion_gym.sampling import Denoiser

Network = Callable[..., Any]
"""Something called like the family's denoiser module (the module itself, a DDP wrapper, a compiled
``forward``): it takes the same arguments and returns what the module returns."""

RowIndex = int | slice | Sequence[int] | Tensor


@dataclass(frozen=True)
class Conditioning:
    """A batch of encoded conditions, on the denoiser's device; every tensor's first dimension is the batch.

    Fields a family does not use stay ``None``: the pixel family fills ``labels`` (``None`` for an
    unconditional model); text families fill the embeddings, SDXL also the pooled embeddings and the
    time ids. The ``negative_*`` fields are the unconditional branch of classifier-free guidance.
    """

    labels: Tensor | None = None
    """``(B,)`` int64 class ids (pixel family)."""
    embeds: Tensor | None = None
    """``(B, L, D)`` prompt embeddings, the UNet's ``encoder_hidden_states``."""
    negative_embeds: Tensor | None = None
    """``(B, L, D)`` embeddings of the negative (unconditional) prompts."""
    pooled: Tensor | None = None
    """``(B, P)`` pooled prompt embeddings (SDXL's ``text_embeds``)."""
    negative_pooled: Tensor | None = None
    """``(B, P)`` pooled negative-prompt embeddings."""
    time_ids: Tensor | None = None
    """``(B, 6)`` SDXL micro-conditioning: original size, crop top-left, target size (``time_ids``)."""
    negative_time_ids: Tensor | None = None
    """``(B, 6)`` the time ids of the unconditional branch."""

    def tensors(self) -> dict[str, Tensor]:
        """The fields that are set, by name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    @property
    def batch_size(self) -> int | None:
        """Rows of the batch (``None`` when no field is set: an unconditional model's conditioning)."""
        values = list(self.tensors().values())
        return int(values[0].shape[0]) if values else None

    @property
    def has_negative(self) -> bool:
        """Whether the unconditional branch of classifier-free guidance is available."""
        return self.negative_embeds is not None

    def __getitem__(self, index: RowIndex) -> Conditioning:
        """The rows ``index`` of every field (an int keeps the batch dimension: one row)."""
        if isinstance(index, int) and not isinstance(index, bool):
            index = slice(index, index + 1) if index != -1 else slice(-1, None)
        return Conditioning(**{name: value[index] for name, value in self.tensors().items()})

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """A copy on ``device``; ``dtype`` applies to the floating-point fields only (class ids stay int64)."""
        moved = {}
        for name, value in self.tensors().items():
            target = dtype if dtype is not None and value.is_floating_point() else None
            moved[name] = value.to(device=device, dtype=target)
        return Conditioning(**moved)

    def repeat_interleave(self, repeats: int) -> Conditioning:
        """Each row ``repeats`` times in a row (e.g. several samples per prompt)."""
        if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
            raise ValueError(f"repeats must be a positive int, got {repeats!r}")
        return Conditioning(**{k: v.repeat_interleave(repeats, dim=0) for k, v in self.tensors().items()})

    @staticmethod
    def cat(parts: Sequence[Conditioning]) -> Conditioning:
        """Concatenate batches that set the same fields.

        Raises:
            ValueError: for no parts, or parts that set different fields.
        """
        if not parts:
            raise ValueError("Conditioning.cat needs at least one part, got none")
        names = sorted(parts[0].tensors())
        for part in parts[1:]:
            if sorted(part.tensors()) != names:
                raise ValueError(
                    f"cannot concatenate conditionings with different fields: {names} and {sorted(part.tensors())}"
                )
        return Conditioning(**{name: torch.cat([getattr(p, name) for p in parts]) for name in names})


def check_guidance_scale(guidance_scale: float) -> float:
    """``guidance_scale`` as a float, or ``ValueError`` unless it is a finite number >= 0."""
    ok = isinstance(guidance_scale, int | float) and not isinstance(guidance_scale, bool)
    if not ok or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
    return float(guidance_scale)


def batch_timesteps(t: Tensor | int, x: Tensor) -> Tensor:
    """Timesteps as a ``(B,)`` tensor on ``x``'s device (a scalar is repeated for every row of ``x``).

    Raises:
        ValueError: when ``t`` is neither a scalar nor one timestep per row of ``x``.
    """
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        return t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"timesteps must be a scalar or have shape ({x.shape[0]},), got shape {tuple(t.shape)}")
    return t


def classifier_free_guidance(
    call: Callable[..., Tensor],
    x: Tensor,
    t: Tensor,
    positive: Sequence[Tensor | None],
    negative: Sequence[Tensor | None],
    guidance_scale: float,
) -> Tensor:
    """``out_u + g·(out_c − out_u)`` from one ``call(x, t, *conditions)`` on the batch ``[negative, positive]``.

    At ``g = 1`` only the conditional half runs (as diffusers' pipelines do). Fields that are ``None``
    in ``positive`` stay ``None``.

    Raises:
        ValueError: for ``g != 1`` when a set field of ``positive`` has no negative counterpart.
    """
    if guidance_scale == 1.0:
        return call(x, t, *positive)
    if any(p is not None and n is None for p, n in zip(positive, negative, strict=True)):
        raise ValueError(
            f"guidance_scale {guidance_scale} needs the unconditional branch: the conditioning has no negatives"
        )
    both = [None if p is None else torch.cat([n, p]) for p, n in zip(positive, negative, strict=True)]
    uncond, cond = call(torch.cat([x, x]), torch.cat([t, t]), *both).chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def in_chunks(fn: Callable[[Tensor], Tensor], x: Tensor, batch_size: int) -> list[Tensor]:
    """``fn`` applied to ``x`` in chunks of ``batch_size`` rows."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return [fn(chunk) for chunk in x.split(batch_size)]


def place(module: nn.Module, device: str | torch.device, dtype: torch.dtype) -> nn.Module:
    """``module`` moved to ``device``, and cast to ``dtype`` only if its parameters have another dtype.

    (Diffusers warns on every dtype cast, even a no-op one.)
    """
    module = module.to(device)
    if any(p.dtype != dtype for p in module.parameters()):
        module = module.to(dtype)
    return module


class ModelFamily(abc.ABC):
    """A diffusion model as the env and the agents see it (see the module docstring).

    Subclasses set :attr:`name`, :attr:`scheduler` and :attr:`denoiser` and implement the abstract
    members. The scheduler is a diffusers ``DDIMScheduler`` (or ``DDPMScheduler``) that
    :func:`diffusion_gym.sampling.make_schedule` turns into the policy's coefficients.
    """

    name: str = ""
    """The family's name (``"pixel"``, ``"latent-text"``): for messages and records, never for branching."""
    scheduler: SchedulerMixin
    """The noise scheduler whose config defines the chain (``make_schedule(family.scheduler, K, eta)``)."""
    denoiser: nn.Module
    """The trainable network (the UNet); every other component is frozen."""

    @property
    @abc.abstractmethod
    def sample_shape(self) -> tuple[int, ...]:
        """``(C, H, W)`` of a state ``x_t`` (pixels or latents)."""

    @property
    @abc.abstractmethod
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images :meth:`decode` returns and :meth:`encode_images` takes."""

    text_conditioned: bool = False
    """Whether the model is conditioned on prompts (:class:`~diffusion_gym.conditions.PromptConditions`)."""

    @property
    def default_guidance_scale(self) -> float:
        """The guidance scale the model's own pipeline uses by default (1.0: no guidance)."""
        return 1.0

    @property
    def device(self) -> torch.device:
        """Where the denoiser's parameters live."""
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The denoiser's parameter dtype."""
        return next(self.denoiser.parameters()).dtype

    @abc.abstractmethod
    def encode_conditions(self, conditions: Any, negative: Any = None) -> Conditioning:
        """Encode a batch of conditions (class ids, prompts) for :meth:`model_output`, on :attr:`device`.

        Args:
            conditions: what the family is conditioned on (see the subclass).
            negative: the negative prompts of text families (see the subclass).
        """

    @abc.abstractmethod
    def model_output(
        self,
        x: Tensor,
        t: Tensor | int,
        cond: Conditioning,
        guidance_scale: float = 1.0,
        *,
        network: Network | None = None,
    ) -> Tensor:
        """The (guided) network prediction at states ``x``, timesteps ``t``, conditions ``cond``.

        Args:
            x: ``(B, *sample_shape)`` states.
            t: scheduler timesteps, a scalar or ``(B,)``.
            cond: from :meth:`encode_conditions`, ``B`` rows.
            guidance_scale: classifier-free guidance scale ``g``: ``ε_u + g·(ε_c − ε_u)``.
            network: called instead of :attr:`denoiser` (a DDP wrapper, a compiled forward, a frozen
                reference); it takes the denoiser's arguments.

        Returns:
            ``(B, *sample_shape)``: what the scheduler's ``prediction_type`` says (ε, x0 or v).
        """

    @abc.abstractmethod
    def decode(self, x: Tensor, batch_size: int = 16) -> Tensor:
        """Images in ``[0, 1]`` (float32, ``x``'s device) from clean states ``x``, without gradients, in chunks."""

    @abc.abstractmethod
    def encode_images(self, images: Tensor, batch_size: int = 16) -> Tensor:
        """Clean states ``x_0`` from images in ``[0, 1]`` (HRF references), without gradients, in chunks."""

    def with_denoiser(self, network: nn.Module) -> ModelFamily:
        """This family with ``network`` as its denoiser (e.g. a frozen copy: the reference of a KL penalty).

        The other components (VAE, text encoders, scheduler) are shared, not copied.
        """
        other = copy.copy(self)
        other.denoiser = network
        return other

    def chain_denoiser(self, guidance_scale: float | None = None, network: Network | None = None) -> Denoiser:
        """This family as a :data:`diffusion_gym.sampling.Denoiser` ``(x, t, cond) -> model_output``.

        The result runs in :func:`diffusion_gym.sampling.denoise_chain` and ``generate``, with a
        :class:`Conditioning` as the chain's condition (a tensor of class ids and ``None`` are read as
        ``Conditioning(labels=ids)`` and ``Conditioning()``).

        Args:
            guidance_scale: default: :attr:`default_guidance_scale`.
            network: see :meth:`model_output`.
        """
        scale = self.default_guidance_scale if guidance_scale is None else check_guidance_scale(guidance_scale)

        def denoise(x: Tensor, t: Tensor, cond: Any) -> Tensor:
            if cond is None:
                cond = Conditioning()
            elif isinstance(cond, Tensor):
                cond = Conditioning(labels=cond)
            return self.model_output(x, t, cond, scale, network=network)

        return denoise
