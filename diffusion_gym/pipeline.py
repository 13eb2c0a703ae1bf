"""A diffusers pipeline that samples with this library's policy math: from a checkpoint to images in three lines.

::

    from diffusion_gym import ClassConditionalPipeline

    pipe = ClassConditionalPipeline.from_pretrained("runs/my_run/checkpoints/epoch-000010")
    images = pipe(class_labels=[3, 3, 7], seed=0).images  # a list of PIL images

:class:`ClassConditionalPipeline` is a diffusers ``DiffusionPipeline`` with two components, ``unet`` (a
``UNet2DModel``, class-conditional or not) and ``scheduler`` (its ``DDPMScheduler`` or ``DDIMScheduler``),
so ``save_pretrained`` / ``from_pretrained`` work as for diffusers' ``DDPMPipeline``; it loads training
checkpoints (``agents/common/checkpoint.py`` names it in their ``model_index.json``), the embedded digits
model (:data:`diffusion_gym.models.EMBEDDED_DIR`) and any ``DDPMPipeline`` folder. Unlike ``DDPMPipeline``
it passes class labels to a class-conditional UNet.

Sampling is the library's own (:func:`diffusion_gym.sampling.make_schedule` and
:func:`~diffusion_gym.sampling.denoise_chain`): by default DDIM with ``eta`` built from the saved
scheduler's config, as ``load_model`` and ``diffusion-gym sample`` do. With ``seed=s`` the images are
exactly those of :func:`diffusion_gym.sampling.generate` (and so of ``diffusion-gym sample --seed s``
and of the evaluation with that seed) for the same labels, steps, eta and chain size.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor

from diffusion_gym import sampling
from diffusion_gym.models import SCHEDULER_KINDS

__all__ = ["OUTPUT_TYPES", "ClassConditionalPipeline", "ClassConditionalPipelineOutput"]

OUTPUT_TYPES = ("pil", "np", "pt")
"""What ``__call__`` returns as ``images``: PIL images, an ``(N, H, W, C)`` float array, an ``(N, C, H, W)`` tensor."""

ClassLabels = int | Sequence[int] | Tensor | None


@dataclass
class ClassConditionalPipelineOutput(ImagePipelineOutput):
    """The images (``images``, per ``output_type``, values in ``[0, 1]``) and the class label of each."""

    class_labels: Tensor | None = None
    """``(N,)`` int64 class id of each image (``None`` for an unconditional model)."""


def _as_labels(class_labels: int | Sequence[int] | Tensor) -> Tensor:
    """Class labels as an int64 tensor of 0 or 1 dimensions (CPU); ``ValueError`` for anything but integers."""
    if isinstance(class_labels, bool):
        raise ValueError(f"class_labels must be integer class ids, got the bool {class_labels!r}")
    try:
        labels = torch.as_tensor(class_labels)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(
            f"class_labels must be an int, a sequence of ints or an int tensor, got {class_labels!r}"
        ) from None
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"class_labels must be integer class ids, got dtype {labels.dtype}: {class_labels!r}")
    if labels.ndim > 1 or (labels.ndim == 1 and len(labels) == 0):
        raise ValueError(f"class_labels must be an int or a non-empty 1-D sequence, got shape {tuple(labels.shape)}")
    return labels.to(device="cpu", dtype=torch.int64)


def _check_count(name: str, value: int | None, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


class ClassConditionalPipeline(DiffusionPipeline):
    """Sample a (class-conditional or unconditional) ``UNet2DModel`` with the policy of :mod:`diffusion_gym.sampling`.

    Args:
        unet: the denoising network; class-conditional when its config has ``num_class_embeds``.
        scheduler: the model's noise scheduler (``DDPMScheduler`` or ``DDIMScheduler``); the sampler of
            each call is built from its config, and it is saved as it is.
    """

    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin) -> None:
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @property
    def num_classes(self) -> int | None:
        """The number of classes of a class-conditional UNet (``num_class_embeds``), else ``None``."""
        return getattr(self.unet.config, "num_class_embeds", None)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images the UNet denoises."""
        size = self.unet.config.sample_size
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return int(self.unet.config.in_channels), int(height), int(width)

    def resolve_labels(self, class_labels: ClassLabels = None, batch_size: int | None = None) -> Tensor | None:
        """The ``(N,)`` class label of every image a call with these arguments draws (``None``: unconditional).

        Args:
            class_labels: ``None`` (cycle through the classes: ``0, 1, …``), one class id for every image, or
                one id per image.
            batch_size: the number of images; default: one per label given, the number of classes when no
                label is given, 1 for an unconditional model.

        Raises:
            ValueError: for labels outside ``[0, num_classes - 1]`` (the message names the range), labels that
                are not integers, labels given to an unconditional model, or a ``batch_size`` that disagrees
                with the number of labels.
        """
        _check_count("batch_size", batch_size)
        if getattr(self.unet.config, "class_embed_type", None) is not None and self.num_classes is None:
            raise ValueError(
                f"this UNet's class_embed_type {self.unet.config.class_embed_type!r} takes embeddings, not class ids; "
                "this pipeline supports UNets with num_class_embeds or unconditional ones"
            )
        if self.num_classes is None:
            if class_labels is not None:
                raise ValueError(
                    f"this model is unconditional (its UNet has no num_class_embeds): pass class_labels=None, "
                    f"got {class_labels!r}"
                )
            return None
        if class_labels is None:
            return torch.arange(self.num_classes if batch_size is None else batch_size) % self.num_classes
        labels = _as_labels(class_labels)
        if labels.ndim == 0:
            labels = labels.expand(1 if batch_size is None else batch_size).clone()
        elif batch_size is not None and batch_size != len(labels):
            raise ValueError(f"batch_size={batch_size} disagrees with the {len(labels)} class_labels given")
        bad = labels[(labels < 0) | (labels >= self.num_classes)]
        if len(bad):
            raise ValueError(
                f"class_labels must lie in [0, {self.num_classes - 1}] (this model has {self.num_classes} classes), "
                f"got {sorted(set(bad.tolist()))}"
            )
        return labels

    def _denoiser(self, progress: Any) -> sampling.Denoiser:
        """The UNet as a :data:`~diffusion_gym.sampling.Denoiser` that ticks ``progress`` and casts to its dtype."""
        base = sampling.unet_denoiser(self.unet)
        dtype = self.unet.dtype

        def denoise(x: Tensor, t: Tensor, c: Tensor | None) -> Tensor:
            progress.update(1)
            return base(x if x.dtype == dtype else x.to(dtype), t, c)

        return denoise

    def _sample(
        self,
        schedule: sampling.DenoisingSchedule,
        labels: Tensor | None,
        n: int,
        seed: int | None,
        generator: torch.Generator | None,
        chain_batch_size: int,
    ) -> Tensor:
        """``n`` images in ``[-1, 1]``: :func:`sampling.generate` for a seed, else noise from ``generator``."""
        chains = -(-n // chain_batch_size)
        with self.progress_bar(total=chains * schedule.num_steps) as progress:
            denoiser = self._denoiser(progress)
            if seed is not None:
                return sampling.generate(
                    denoiser,
                    schedule,
                    n,
                    self.sample_shape,
                    labels,
                    seed=seed,
                    device=self.device,
                    batch_size=chain_batch_size,
                )
            # diffusers' convention: the initial noise, then every step's noise, from one generator (or the global RNG)
            where = generator.device if generator is not None else self.device
            x_all = torch.randn((n, *self.sample_shape), generator=generator, device=where)
            noise = sampling.GeneratorNoise(generator)
            out = []
            for start in range(0, n, chain_batch_size):
                x = x_all[start : start + chain_batch_size].to(self.device)
                c = None if labels is None else labels[start : start + chain_batch_size].to(self.device)
                out.append(sampling.denoise_chain(denoiser, x, schedule, c, noise=noise))
            return torch.cat(out)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: ClassLabels = None,
        batch_size: int | None = None,
        num_inference_steps: int = 40,
        eta: float = 1.0,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        *,
        sampler: str = "ddim",
        chain_batch_size: int = 256,
    ) -> ClassConditionalPipelineOutput | tuple:
        """Draw images, conditioned on ``class_labels`` for a class-conditional model.

        Args:
            class_labels: see :meth:`resolve_labels` (``None``: one image per class, cycling).
            batch_size: the number of images (see :meth:`resolve_labels`).
            num_inference_steps: K, the number of denoising steps.
            eta: DDIM's eta in ``[0, 1]`` (1: the stochastic policy the models are fine-tuned as; 0: deterministic).
            generator: diffusers' way to seed: the initial noise and then each step's noise are drawn from it.
            seed: the library's way: exactly the images of ``sampling.generate(..., seed=seed)`` (initial
                noise from ``seed``, policy noise from ``seed + 1``). Neither given: torch's global RNG.
            output_type: ``"pil"`` (a list of PIL images), ``"np"`` (``(N, H, W, C)`` float32) or ``"pt"``
                (``(N, C, H, W)`` float32 on the pipeline's device); values in ``[0, 1]``.
            return_dict: return a :class:`ClassConditionalPipelineOutput`; otherwise the tuple ``(images,)``.
            sampler: ``"ddim"`` (default, with ``eta``) or ``"ddpm"`` (the ancestral sampler, ``eta`` unused),
                built from the saved scheduler's config.
            chain_batch_size: images denoised together (``sampling.generate``'s ``batch_size``): seeded
                images depend on it when there are more images than this.

        Raises:
            ValueError: for bad labels (see :meth:`resolve_labels`), both ``seed`` and ``generator``, a
                negative seed, or an unknown ``output_type`` / ``sampler``, naming the valid choices.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}; valid choices: {OUTPUT_TYPES}")
        if sampler not in SCHEDULER_KINDS:
            raise ValueError(f"unknown sampler {sampler!r}; valid choices: {sorted(SCHEDULER_KINDS)}")
        if seed is not None and generator is not None:
            raise ValueError("pass seed or generator, not both")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        _check_count("chain_batch_size", chain_batch_size, allow_none=False)
        labels = self.resolve_labels(class_labels, batch_size)
        n = len(labels) if labels is not None else (batch_size or 1)
        scheduler = SCHEDULER_KINDS[sampler].from_config(self.scheduler.config)
        schedule = sampling.make_schedule(scheduler, num_inference_steps, eta=eta, device=self.device)
        x = self._sample(schedule, labels, n, seed, generator, chain_batch_size)
        images = sampling.to_unit_range(x)
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ClassConditionalPipelineOutput(images=images, class_labels=labels)
