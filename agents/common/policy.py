"""The UNet as a Gaussian policy ``π_θ(x_{t-1} | x_t, t, c) = N(μ_θ, σ_t² I)``.

All the math is :mod:`diffusion_gym.sampling`; this module only owns the network: it calls the
UNet (optionally under bf16 autocast, the policy math staying fp32), samples actions, and
recomputes log-probabilities of stored actions with gradients for the PPO-IS update.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from diffusion_gym import sampling
from diffusion_gym.sampling import DenoisingSchedule, StepIndex, StepOutput

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")
"""UNet2DModel layers that get LoRA adapters: attention projections and the ResNet convolutions."""


def add_lora(unet: nn.Module, rank: int, alpha: float | None = None) -> nn.Module:
    """Freeze ``unet`` and inject LoRA adapters (peft) into :data:`LORA_TARGETS`, in place.

    The adapters start at zero (``B = 0``), so the adapted UNet equals the base one until trained.
    """
    from peft import LoraConfig, inject_adapter_in_model

    unet.requires_grad_(False)
    config = LoraConfig(
        r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=list(LORA_TARGETS)
    )
    return inject_adapter_in_model(config, unet)


def has_lora(unet: nn.Module) -> bool:
    """Whether ``unet`` carries peft LoRA layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in unet.modules())


def lora_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only (for checkpoints)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(unet).items()}


def load_lora_state_dict(unet: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load adapter weights written by :func:`lora_state_dict` into a LoRA-injected UNet."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(unet, state)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"LoRA state does not fit this UNet: unexpected keys {result.unexpected_keys[:5]}")


def merged_copy(unet: nn.Module) -> nn.Module:
    """A plain copy of ``unet`` with any LoRA adapters merged into the base weights (diffusers format)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    merged = copy.deepcopy(unet)
    layers = [(name, m) for name, m in merged.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, module in layers:
        module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = merged.get_submodule(parent_name) if parent_name else merged
        setattr(parent, child, module.get_base_layer())
    return merged.requires_grad_(False)


class DiffusionPolicy(nn.Module):
    """A diffusers UNet read as the denoising MDP's Gaussian policy.

    Args:
        unet: a ``UNet2DModel`` (class-conditional or not).
        schedule: the env's :class:`~diffusion_gym.sampling.DenoisingSchedule` (same K and eta).
        autocast_dtype: run the UNet under ``torch.autocast`` with this dtype (e.g.
            ``torch.bfloat16``); ``None`` = full precision. Log-probs are always computed in fp32.
    """

    def __init__(self, unet: nn.Module, schedule: DenoisingSchedule, autocast_dtype: torch.dtype | None = None):
        super().__init__()
        self.unet = unet
        self.schedule = schedule
        self.autocast_dtype = autocast_dtype
        config = unet.config
        self.conditional = getattr(config, "num_class_embeds", None) is not None

    @property
    def device(self) -> torch.device:
        """Device of the UNet's parameters."""
        return next(self.unet.parameters()).device

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def model_output(self, x: Tensor, k: StepIndex, c: Tensor | None) -> Tensor:
        """The UNet's prediction at images ``x``, step index ``k`` and conditions ``c``."""
        t = sampling.timestep_at(k, self.schedule)
        t = t.to(x.device).expand(x.shape[0]) if t.ndim == 0 else t.to(x.device)
        with self._autocast():
            return self.unet(x, t, class_labels=c if self.conditional else None).sample

    @torch.no_grad()
    def act(
        self,
        x: Tensor,
        k: StepIndex,
        c: Tensor | None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> StepOutput:
        """Sample ``x_{t-1}`` and its log-prob (no gradient)."""
        return sampling.denoise_step(self.model_output(x, k, c), x, k, self.schedule, generator=generator, noise=noise)

    def evaluate(self, x: Tensor, k: StepIndex, c: Tensor | None, x_prev: Tensor) -> StepOutput:
        """Recompute the log-prob (and mean) of the stored action ``x_prev`` with gradients."""
        return sampling.denoise_step(self.model_output(x, k, c), x, k, self.schedule, x_prev=x_prev)

    def denoiser(self) -> sampling.Denoiser:
        """A ``(x, t, c) -> output`` callable over the *current* weights (for env probes/references)."""

        def denoise(x: Tensor, t: Tensor, c: Tensor | None) -> Tensor:
            with self._autocast():
                out = self.unet(x, t, class_labels=c if self.conditional else None).sample
            return out.float()

        return denoise

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters with ``requires_grad`` (all of them, or the LoRA adapters)."""
        return (p for p in self.unet.parameters() if p.requires_grad)
