"""The UNet as a Gaussian policy ``π_θ(x_{t-1} | x_t, t, c) = N(μ_θ, σ_t² I)``.

All the math is :mod:`diffusion_gym.sampling`; this module only owns the network: it calls the
UNet through its model family (:mod:`diffusion_gym.families`: class ids for a pixel model; prompt
embeddings and classifier-free guidance for Stable Diffusion / SDXL), optionally under bf16
autocast (the policy math staying fp32), samples actions, and recomputes log-probabilities of stored
actions with gradients for the PPO-IS update.

Conditions are the env's condition ids (class ids or prompt ids); the policy's
:class:`~diffusion_gym.conditions.ConditionSet` turns them into the network's inputs (a text model's
prompt embeddings are computed once per prompt and cached). With classifier-free guidance
(``guidance_scale`` ``g``) the Gaussian's mean comes from the guided prediction
``ε_u + g(ε_c − ε_u)``, both when sampling and when the update recomputes the log-probability, as
ddpo-pytorch does.

Speed options of :class:`DiffusionPolicy` (none changes the math; ``benchmarks/throughput.py``
measures them against a naive diffusers loop):

* ``autocast_dtype=torch.bfloat16``: the UNet runs under ``torch.autocast``; x̂0, μ, σ and the
  log-probabilities are computed in fp32 from its output (:mod:`diffusion_gym.sampling`).
* ``channels_last=True``: UNet weights and inputs in the NHWC memory format (cuDNN's fast
  convolution layout on tensor-core GPUs). Same values up to float rounding (tested to 1e-5).
* ``compile="default" | "reduce-overhead" | "max-autotune"``: the UNet forward goes through
  ``torch.compile`` (the module itself is untouched: state dicts, LoRA, copies and checkpoints see
  the plain UNet). Compilation happens at the first call of each new input shape or grad mode, so
  the first rollout and the first update of a run are slow. ``reduce-overhead`` adds CUDA graphs:
  fastest for a fixed batch shape, but each new shape records a graph, and outputs are only valid
  until the next call (the policy consumes them at once).
* ``gradient_checkpointing=True``: the UNet's blocks recompute their activations in the backward
  pass (diffusers' ``enable_gradient_checkpointing``): less memory per (sample, step) pair, so a
  larger ``train.batch_size`` fits, for about one more forward pass of compute. Only active when
  gradients are on (the update), never in rollouts.

DRIFT's stochastic prompting (``condition_noise``, :class:`~agents.common.drift.ConditionNoise`) is
part of the policy: an episode's noise direction perturbs the class embedding (a text model: every
token of the prompt embeddings, not the negative prompt's) in the rollout and in the update's
recomputation alike, so the log-probabilities stay consistent; :meth:`denoiser` (env probes,
references, evaluation) never adds it.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from diffusion_gym import sampling
from diffusion_gym.conditions import ConditionSet, make_conditions
from diffusion_gym.families import Conditioning, ModelFamily, PixelFamily
from diffusion_gym.families.base import check_guidance_scale
from diffusion_gym.sampling import DenoisingSchedule, StepIndex, StepOutput

from .drift import ConditionNoise

LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "conv1",
    "conv2",
)
"""Denoiser layers that get LoRA adapters: the attention projections (self- and, in Stable Diffusion's
``UNet2DConditionModel``, cross-attention; in SD3's and FLUX's joint attention, the text stream's
``add_*`` projections too, as Flow-GRPO adapts them) and the ResNet blocks' convolutions."""


def add_lora(unet: nn.Module, rank: int, alpha: float | None = None) -> nn.Module:
    """Freeze ``unet`` and inject LoRA adapters (peft) into :data:`LORA_TARGETS`, in place.

    The adapters start at zero (``B = 0``), so the adapted UNet equals the base one until trained.

    Raises:
        MissingExtraError: when peft is not installed (``pip install 'diffusion-gym[lora]'``).
    """
    from diffusion_gym.extras import require

    require("peft", "lora", "LoRA (train.lora_rank > 0)")
    from peft import LoraConfig, inject_adapter_in_model

    unet.requires_grad_(False)
    config = LoraConfig(
        r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=list(LORA_TARGETS)
    )
    return inject_adapter_in_model(config, unet)


def lora_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights only (for checkpoints)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(unet).items()}


def lora_adapter_config(unet: nn.Module) -> dict[str, Any]:
    """The injected adapter's ``LoraConfig`` as a JSON-able dict (rank, alpha, target modules)."""
    config = unet.peft_config["default"].to_dict()
    return {key: sorted(value) if isinstance(value, set) else value for key, value in config.items()}


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


COMPILE_MODES = ("no", "default", "reduce-overhead", "max-autotune")
"""Values of ``DiffusionPolicy(compile=…)``: ``"no"``, or a ``torch.compile`` mode."""


class DiffusionPolicy(nn.Module):
    """A diffusers UNet read as the denoising MDP's Gaussian policy.

    Args:
        unet: a model family (:class:`~diffusion_gym.families.ModelFamily`: its denoiser is the
            trained network), or a pixel ``UNet2DModel`` (class-conditional or not).
            ``channels_last`` and ``gradient_checkpointing`` change the network in place (memory
            format of its weights, a flag); ``compile`` does not.
        schedule: the env's :class:`~diffusion_gym.sampling.DenoisingSchedule` (same K and eta).
        conditions: what the env's condition ids mean (share the env's: ``env.core.conditions``);
            default: the family's class ids (a text family needs its env's prompt conditions).
        guidance_scale: classifier-free guidance scale (default: the family's, 1 for pixel models).
        autocast_dtype: run the UNet under ``torch.autocast`` with this dtype (e.g.
            ``torch.bfloat16``); ``None`` = full precision. Log-probs are always computed in fp32.
        channels_last: keep the UNet's weights and feed its inputs in the ``torch.channels_last``
            memory format.
        compile: ``"no"`` (eager) or the ``torch.compile`` mode of the UNet forward
            (``"default"``, ``"reduce-overhead"``, ``"max-autotune"``).
        gradient_checkpointing: recompute the UNet's activations in the backward pass (less memory in
            the update, about one extra forward of compute).
        condition_noise: DRIFT's annealed noise on the class embedding, applied where a call passes
            per-sample noise directions (``cond_noise``); ``None``: never.

    Raises:
        ValueError: for an unknown ``compile`` mode, or condition noise on a UNet without a class
            embedding.
    """

    def __init__(
        self,
        unet: nn.Module | ModelFamily,
        schedule: DenoisingSchedule,
        autocast_dtype: torch.dtype | None = None,
        *,
        conditions: ConditionSet | None = None,
        guidance_scale: float | None = None,
        channels_last: bool = False,
        compile: str = "no",  # noqa: A002 - the config key's name
        gradient_checkpointing: bool = False,
        condition_noise: ConditionNoise | None = None,
    ):
        super().__init__()
        if compile not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {compile!r}; valid choices: {list(COMPILE_MODES)}")
        family = unet if isinstance(unet, ModelFamily) else PixelFamily(unet, None)
        unet = family.denoiser
        if not family.text_conditioned and condition_noise is not None and unet.class_embedding is None:
            raise ValueError(
                "condition noise (DRIFT's drift.condition_noise) perturbs the class embedding, but this UNet has "
                "none (an unconditional model): set drift.condition_noise to 0"
            )
        self.family = family
        self.conditions = conditions if conditions is not None else make_conditions(family)
        self.guidance_scale = (
            family.default_guidance_scale if guidance_scale is None else check_guidance_scale(guidance_scale)
        )
        self.condition_noise = condition_noise
        self.unet = unet
        self.schedule = schedule
        self.autocast_dtype = autocast_dtype
        self.conditional = self.conditions.conditional
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            unet.to(memory_format=torch.channels_last)
        if gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.compile_mode = compile
        # A compiled *function* over the UNet's forward, not a registered submodule: the state dict,
        # LoRA injection and deep copies keep seeing the plain UNet.
        self._compiled: Callable[..., Any] | None = None
        if compile != "no":
            self._compiled = torch.compile(unet.forward, mode=compile)

    def ensure_memory_format(self) -> None:
        """Re-apply ``channels_last`` to the UNet's weights (after layers were added, e.g. LoRA)."""
        if self.memory_format == torch.channels_last:
            self.unet.to(memory_format=torch.channels_last)

    def conditioning(self, c: Tensor | Conditioning | None) -> Conditioning:
        """The network's conditioning of condition ids ``c`` (a :class:`Conditioning` passes through)."""
        if c is None:
            return Conditioning()
        if isinstance(c, Conditioning):
            return c
        return self.conditions.encode(c)

    def condition_noise_dim(self) -> int:
        """Width of what DRIFT's condition noise perturbs: the prompt embeddings' or the class embedding's."""
        if self.family.text_conditioned:  # a UNet's cross-attention width; a flow transformer's joint width
            config = self.unet.config
            return int(config.get("cross_attention_dim") or config["joint_attention_dim"])
        embedding = self.unet.class_embedding
        dim = getattr(embedding, "embedding_dim", None)
        return int(dim) if dim is not None else int(self.unet.config.block_out_channels[0] * 4)

    def _unet(self, x: Tensor, t: Tensor, c: Tensor | Conditioning | None, cond_noise: Tensor | None = None) -> Tensor:
        """The (compiled, guided) network forward at inputs in the policy's memory format.

        ``cond_noise``: ``(B, D)`` unit-normal directions of DRIFT's condition noise (see
        :class:`~agents.common.drift.ConditionNoise`), added for this call only to the prompt
        embeddings (text models) or, through a forward hook, to the class embedding.
        """
        if self.memory_format == torch.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        forward = self.unet if self._compiled is None else self._compiled
        cond = self.conditioning(c)
        if cond_noise is None or self.condition_noise is None:
            return self.family.model_output(x, t, cond, self.guidance_scale, network=forward)
        noise = self.condition_noise
        weight = noise.weight(t, self.schedule.num_train_timesteps)
        if self.family.text_conditioned:
            cond = dataclasses.replace(cond, embeds=noise.perturb(cond.embeds, cond_noise, weight))
            return self.family.model_output(x, t, cond, self.guidance_scale, network=forward)
        hook = self.unet.class_embedding.register_forward_hook(
            lambda module, args, out: noise.perturb(out, cond_noise, weight)
        )
        try:
            return self.family.model_output(x, t, cond, self.guidance_scale, network=forward)
        finally:
            hook.remove()

    @property
    def device(self) -> torch.device:
        """Device of the UNet's parameters."""
        return next(self.unet.parameters()).device

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def model_output(self, x: Tensor, k: StepIndex, c: Tensor | None, cond_noise: Tensor | None = None) -> Tensor:
        """The (guided) network prediction at states ``x``, step index ``k`` and condition ids ``c``.

        ``cond_noise``: per-sample directions of the condition noise (``None``: none).
        """
        t = sampling.timestep_at(k, self.schedule)
        t = t.to(x.device).expand(x.shape[0]) if t.ndim == 0 else t.to(x.device)
        with self._autocast():
            return self._unet(x, t, c, cond_noise)

    @torch.no_grad()
    def act(
        self,
        x: Tensor,
        k: StepIndex,
        c: Tensor | None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        cond_noise: Tensor | None = None,
        schedule: sampling.Schedule | None = None,
    ) -> StepOutput:
        """Sample ``x_{t-1}`` and its log-prob (no gradient).

        ``schedule``: the chain of this batch when it differs from the policy's in which steps are
        stochastic (a flow env's SDE window, ``env.core.schedule``); default: the policy's.
        """
        out = self.model_output(x, k, c, cond_noise)
        chain = self.schedule if schedule is None else schedule
        return sampling.denoise_step(out, x, k, chain, generator=generator, noise=noise)

    def evaluate(
        self, x: Tensor, k: StepIndex, c: Tensor | None, x_prev: Tensor, cond_noise: Tensor | None = None
    ) -> StepOutput:
        """Recompute the log-prob (and mean) of the stored action ``x_prev`` with gradients."""
        return sampling.denoise_step(self.model_output(x, k, c, cond_noise), x, k, self.schedule, x_prev=x_prev)

    def denoiser(self) -> sampling.Denoiser:
        """A ``(x, t, c) -> output`` callable over the *current* weights (for env probes/references)."""

        def denoise(x: Tensor, t: Tensor, c: Tensor | Conditioning | None) -> Tensor:
            with self._autocast():
                out = self._unet(x, t, c)
            return out.float()

        return denoise

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters with ``requires_grad`` (all of them, or the LoRA adapters)."""
        return (p for p in self.unet.parameters() if p.requires_grad)
