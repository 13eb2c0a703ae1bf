"""The policy math of the denoising MDP, as pure functions over tensors.

A K-step sampling chain of a diffusers scheduler is turned into a :class:`DenoisingSchedule`: one
coefficient per *step index* ``k`` (``k = 0`` is the noisiest step, ``k = K - 1`` the last). Every
function below takes the model output (the UNet's prediction), the current image ``x`` and a step
index ``k`` — a Python int, or a ``(B,)`` integer tensor when the samples of a batch sit at
different steps — and is batched over any device and dtype.

The policy at step ``k`` is the Gaussian ``π(x_prev | x, k, c) = N(μ, σ_k² I)`` with

* DDIM (``eta``), as diffusers' ``DDIMScheduler.step``::

      x̂0 = (x − sqrt(1−ᾱ_t)·ε) / sqrt(ᾱ_t)              (clipped / thresholded if configured)
      σ² = eta² · (1−ᾱ_t')/(1−ᾱ_t) · (1 − ᾱ_t/ᾱ_t')
      μ  = sqrt(ᾱ_t')·x̂0 + sqrt(1−ᾱ_t'−σ²)·ε

  with ``t' = t − T/K`` and ``ᾱ_t' = final_alpha_cumprod`` when ``t' < 0``;
* DDPM, the posterior ``q(x_t' | x_t, x̂0)`` as diffusers' ``DDPMScheduler.step``.

``mean + std · z`` equals diffusers' ``step(..., variance_noise=z).prev_sample`` (tested to 1e-5 in
fp32). Log-probabilities are **averaged over pixels** (as ddpo-pytorch does; a sum over 256²·3
dimensions makes PPO ratios explode). Steps whose σ is exactly 0 (the last DDIM step with
``set_alpha_to_one=True``, the last DDPM step, every step at ``eta = 0``) are deterministic: they
are not stochastic actions, :func:`log_prob` returns 0 for them and
:attr:`DenoisingSchedule.deterministic` flags them so that policy losses can mask them out. No
epsilon is ever added to σ.

Flow-matching models (SD3, FLUX: ``FlowMatchEulerDiscreteScheduler``) get a :class:`FlowSchedule`
from :func:`make_flow_schedule` and the same functions. Their deterministic Euler sampler has no
log-probability, so each step becomes the SDE step of Flow-GRPO (Liu et al., arXiv 2505.05470) with
the same marginals. Conventions (diffusers'): ``t`` runs from 1 (noise) to 0 (data), ``x_t = (1 − t)·x0
+ t·ε``, the network predicts the velocity ``v = ε − x0``, and a step goes from ``t_k`` to ``t_{k+1} <
t_k`` (``Δt = t_{k+1} − t_k < 0``)::

      σ_t = a · sqrt(t / (1 − t))                        (a: the noise level)
      μ   = x + [v + σ_t² / (2t) · (x + (1 − t)·v)] · Δt
      std = σ_t · sqrt(−Δt)

``a = 0`` is the ODE (diffusers' Euler step ``x + v·Δt``, σ = 0: deterministic). At ``t = 1`` (the first
step of a schedule without shift) ``1 − t`` is 0; ``σ_t`` then takes ``1 − t_1`` of the next step in its
denominator, as Flow-GRPO's code does. ``σ_t² / (2t) = a² / (2(1 − t))`` is computed in that form, finite
as ``t → 0``.

Computations run in float32 (float64 if the inputs are float64), whatever the input dtype, so a
bf16 UNet output still gets fp32 policy math.

Whole chains run through one loop, :func:`denoise_chain`; what differs between its callers is where
each step's policy noise comes from (a :class:`NoiseSource`: :class:`GeneratorNoise`,
:class:`GlobalBatchNoise` for one process's rows of a shared batch, :class:`PrecomputedNoise`, or
none for a deterministic chain). :func:`run_chain` and :func:`generate` are its two common uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, NamedTuple, Protocol

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
DDPM_VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large")
StepIndex = int | Tensor

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class _PerStepTable:
    """What both schedule kinds share: K, the deterministic steps, the device, a copy on another device."""

    timesteps: Tensor
    std: Tensor

    @property
    def num_steps(self) -> int:
        """K, the number of denoising steps."""
        return int(self.timesteps.shape[0])

    @property
    def deterministic(self) -> Tensor:
        """``(K,)`` bool mask of the steps whose σ is 0 (not stochastic actions; a flow chain's ODE steps)."""
        return self.std == 0

    @property
    def device(self) -> torch.device:
        """Device of the coefficient tensors."""
        return self.std.device

    def to(self, device: str | torch.device) -> Any:
        """A copy with every tensor on ``device``."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}  # type: ignore[arg-type]
        return type(self)(**{k: v.to(device) if isinstance(v, Tensor) else v for k, v in values.items()})


@dataclass(frozen=True)
class DenoisingSchedule(_PerStepTable):
    """Per-step-index coefficients of a K-step DDIM(eta) or DDPM sampling chain.

    Build one with :func:`make_schedule`. Tensors have shape ``(K,)``; index them with the step
    index ``k`` (0 = noisiest).
    """

    kind: str
    """``"ddim"`` or ``"ddpm"``."""
    timesteps: Tensor
    """``t_k``, the scheduler (training) timestep at each step index, int64."""
    alpha_prod: Tensor
    """``ᾱ_{t_k}``."""
    alpha_prod_prev: Tensor
    """``ᾱ`` at the timestep the step moves to (1 or ``final_alpha_cumprod`` after the last one)."""
    std: Tensor
    """``σ_k``, the policy's standard deviation at each step index (0 where deterministic)."""
    eta: float
    """DDIM's eta (1.0 for DDPM, whose variance is set by ``variance_type``)."""
    prediction_type: str
    """What the model predicts: ``"epsilon"``, ``"sample"`` or ``"v_prediction"``."""
    clip_sample: bool
    """Whether x̂0 is clipped to ``±clip_sample_range``."""
    clip_sample_range: float
    """The clipping range of x̂0."""
    thresholding: bool
    """Whether x̂0 is dynamically thresholded (Imagen) instead of clipped."""
    dynamic_thresholding_ratio: float
    """Percentile of ``|x̂0|`` used by dynamic thresholding."""
    sample_max_value: float
    """Upper bound of the dynamic threshold."""
    num_train_timesteps: int
    """Number of training timesteps of the scheduler (T)."""


@dataclass(frozen=True)
class FlowSchedule(_PerStepTable):
    """Per-step-index coefficients of a K-step flow-matching chain with Flow-GRPO's SDE steps.

    Build one with :func:`make_flow_schedule`. Tensors have shape ``(K,)`` (``sigmas``: ``(K + 1,)``),
    indexed by the step index ``k`` (0 = noisiest). Steps whose noise level is 0 (``a = 0``, or outside
    the SDE window ``sde_steps``) are ODE steps: σ = 0, deterministic, not stochastic actions.
    """

    kind: str
    """``"flow"``."""
    timesteps: Tensor
    """The network's timestep input at each step index: ``t_k · num_train_timesteps`` (float)."""
    sigmas: Tensor
    """``t_0 = 1 (or less with a shift) > t_1 > … > t_K = 0``: the flow times."""
    dt: Tensor
    """``Δt_k = t_{k+1} − t_k`` (negative)."""
    drift: Tensor
    """``σ_{t_k}² / (2 t_k) = a_k² / (2(1 − t_k))``, the SDE's extra drift coefficient (0 at ODE steps)."""
    std: Tensor
    """``σ_{t_k} · sqrt(−Δt_k)``, the policy's standard deviation (0 at ODE steps)."""
    noise_level: Tensor
    """``a_k``: the noise level of each step (0 at ODE steps)."""
    eta: float
    """The noise level ``a`` of the SDE steps (named as DDIM's eta for callers that log either)."""
    num_train_timesteps: int
    """The scheduler's number of training timesteps (``timesteps = t · num_train_timesteps``)."""
    prediction_type: str = "flow"
    """What the network predicts: the velocity ``v = ε − x0``."""

    def with_sde_steps(self, sde_steps: Tensor) -> FlowSchedule:
        """This schedule with only the steps of the ``(K,)`` bool mask ``sde_steps`` left stochastic.

        The kept steps' coefficients are this schedule's own, so a step's log-probability is the same
        whichever window holds it; the others become ODE steps (σ = 0, no extra drift).
        """
        mask = torch.as_tensor(sde_steps, device=self.std.device)
        if mask.dtype != torch.bool or mask.shape != self.std.shape:
            raise ValueError(
                f"sde_steps must be a ({self.num_steps},) bool mask, got {mask.dtype} of shape {tuple(mask.shape)}"
            )
        zero = torch.zeros_like(self.std)
        return replace(
            self,
            std=torch.where(mask, self.std, zero),
            drift=torch.where(mask, self.drift, zero),
            noise_level=torch.where(mask, self.noise_level, zero),
        )


Schedule = DenoisingSchedule | FlowSchedule
"""Either kind of chain: the functions of this module take both."""


def flux_shift_mu(image_seq_len: int, config: Any) -> float:
    """FLUX's dynamic shift ``mu``, linear in the image's token count.

    ``base_shift`` at ``base_image_seq_len`` tokens, ``max_shift`` at ``max_image_seq_len`` (defaults:
    0.5 at 256, 1.15 at 4096).
    """
    lo_len, hi_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    lo, hi = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    return lo + (hi - lo) * (image_seq_len - lo_len) / (hi_len - lo_len)


class FluxFlowMatchScheduler(FlowMatchEulerDiscreteScheduler):
    """A ``FlowMatchEulerDiscreteScheduler`` that sets ``FluxPipeline``'s timesteps by itself.

    ``FluxPipeline`` passes its scheduler ``sigmas = linspace(1, 1/K, K)`` and the dynamic shift
    ``mu`` of the image's packed-token count; this scheduler fills both in when a caller (e.g.
    :func:`make_flow_schedule`) gives neither. Its config is the pipeline's scheduler config.

    Build it with ``FluxFlowMatchScheduler.from_config(config)`` and set :attr:`image_seq_len`.
    """

    image_seq_len: int = 256
    """The packed latent tokens of one image, ``(H / 16) · (W / 16)`` for FLUX.1's VAE."""

    def timing(self, num_steps: int) -> dict[str, Any]:
        """``{"sigmas": …, "mu": …}`` as ``FluxPipeline`` passes them for ``num_steps`` steps."""
        config = self.config
        sigmas = None if config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps, num_steps)
        mu = flux_shift_mu(self.image_seq_len, config) if config.get("use_dynamic_shifting", False) else None
        return {"sigmas": sigmas, "mu": mu}

    def set_timesteps(  # type: ignore[override]
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: list[float] | None = None,
        mu: float | None = None,
        timesteps: list[float] | None = None,
    ) -> None:
        """Set the timesteps as diffusers does, with FLUX's ``sigmas`` and ``mu`` when none are given."""
        if sigmas is None and timesteps is None and num_inference_steps is not None:
            timing = self.timing(num_inference_steps)
            sigmas, mu = timing["sigmas"], timing["mu"] if mu is None else mu
        super().set_timesteps(num_inference_steps, device, sigmas=sigmas, mu=mu, timesteps=timesteps)


def make_flow_schedule(
    scheduler: SchedulerMixin,
    num_steps: int,
    noise_level: float = 0.7,
    *,
    sde_steps: Tensor | None = None,
    mu: float | None = None,
    device: str | torch.device | None = None,
) -> FlowSchedule:
    """Build the :class:`FlowSchedule` of a ``FlowMatchEulerDiscreteScheduler`` with ``num_steps`` steps.

    The scheduler is not modified: a fresh copy from its config runs ``set_timesteps(num_steps,
    mu=mu)``, so its shift (SD3's 3.0) or dynamic shifting (FLUX, which needs ``mu``) applies; a
    :class:`FluxFlowMatchScheduler` gives ``FluxPipeline``'s sigmas and ``mu`` itself.

    Args:
        scheduler: a ``FlowMatchEulerDiscreteScheduler``.
        num_steps: K.
        noise_level: ``a >= 0`` of the SDE steps (Flow-GRPO: 0.7); 0 gives the ODE everywhere.
        sde_steps: ``(K,)`` bool mask of the steps that are SDE steps (the others are ODE steps);
            ``None``: every step.
        mu: the dynamic shift's ``mu`` (FLUX computes it from the image's sequence length).
        device: where the tensors live (default: CPU).

    Raises:
        ValueError: for another scheduler, a bad ``num_steps``, ``noise_level`` or ``sde_steps``, or
            dynamic shifting without ``mu``.
    """
    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        raise ValueError(
            f"unsupported scheduler {type(scheduler).__name__} for a flow schedule; valid choice: "
            "FlowMatchEulerDiscreteScheduler"
        )
    total = int(scheduler.config.num_train_timesteps)
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or not 1 <= num_steps <= total:
        raise ValueError(f"num_steps must be an int in [1, {total}], got {num_steps!r}")
    ok = isinstance(noise_level, int | float) and not isinstance(noise_level, bool)
    if not ok or not math.isfinite(noise_level) or noise_level < 0:
        raise ValueError(f"noise_level must be a finite number >= 0, got {noise_level!r}")
    timing = scheduler.timing(num_steps) if isinstance(scheduler, FluxFlowMatchScheduler) else {"sigmas": None}
    mu = timing.get("mu") if mu is None else mu
    if scheduler.config.get("use_dynamic_shifting", False) and mu is None:
        raise ValueError(
            "this scheduler shifts its sigmas dynamically (FLUX): pass mu (from the image sequence length)"
        )
    mask = torch.ones(num_steps, dtype=torch.bool) if sde_steps is None else torch.as_tensor(sde_steps)
    if mask.dtype != torch.bool or mask.shape != (num_steps,):
        raise ValueError(f"sde_steps must be a ({num_steps},) bool mask, got {mask.dtype} of shape {tuple(mask.shape)}")
    fresh = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    fresh.set_timesteps(num_steps, sigmas=timing["sigmas"], mu=mu)
    sigmas = fresh.sigmas.to(torch.float64).cpu()
    t, t_next = sigmas[:-1], sigmas[1:]
    dt = t_next - t
    one_minus_t = torch.where(t >= 1, 1 - sigmas[1].expand_as(t), 1 - t)  # Flow-GRPO's convention at t = 1
    a = torch.where(mask, torch.full_like(t, float(noise_level)), torch.zeros_like(t))
    sigma_t = a * (t / one_minus_t).sqrt()
    return FlowSchedule(
        kind="flow",
        timesteps=fresh.timesteps.to(torch.float32).cpu(),
        sigmas=sigmas.float(),
        dt=dt.float(),
        drift=(a**2 / (2 * one_minus_t)).float(),
        std=(sigma_t * (-dt).sqrt()).float(),
        noise_level=a.float(),
        eta=float(noise_level),
        num_train_timesteps=total,
    ).to(device or "cpu")


def _schedule_kind(scheduler: SchedulerMixin) -> str:
    """``"ddim"`` or ``"ddpm"`` for a supported diffusers scheduler."""
    if isinstance(scheduler, DDIMScheduler):
        return "ddim"
    if isinstance(scheduler, DDPMScheduler):
        return "ddpm"
    raise ValueError(f"unsupported scheduler {type(scheduler).__name__}; valid choices: DDIMScheduler, DDPMScheduler")


def _check_schedule_args(config: Any, num_steps: int, eta: float) -> None:
    """Raise ``ValueError`` for a bad prediction type, ``num_steps`` or ``eta`` (see :func:`make_schedule`)."""
    if config.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unsupported prediction_type {config.prediction_type!r}; valid choices: {PREDICTION_TYPES}")
    total = int(config.num_train_timesteps)
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or not 1 <= num_steps <= total:
        raise ValueError(f"num_steps must be an int in [1, {total}], got {num_steps!r}")
    # σ² = eta²·posterior variance stays <= 1 − ᾱ_prev (the mean's sqrt(1 − ᾱ_prev − σ²)) exactly when eta <= 1.
    if isinstance(eta, bool) or not isinstance(eta, int | float) or not 0 <= eta <= 1:
        raise ValueError(
            f"eta must be a number in [0, 1], got {eta!r} (above 1, DDIM's σ² exceeds 1 − ᾱ_prev at the last steps "
            "and the chain turns to NaN)"
        )


def _ddpm_std(config: Any, timesteps: Tensor, current_beta: Tensor, posterior_var: Tensor) -> Tensor:
    """σ of each step of a DDPM chain, from the scheduler's ``variance_type`` (0 at ``t = 0``)."""
    variance_type = config.variance_type
    if variance_type not in DDPM_VARIANCE_TYPES:
        raise ValueError(
            f"unsupported DDPM variance_type {variance_type!r} (a learned variance is not a fixed-σ policy); "
            f"valid choices: {DDPM_VARIANCE_TYPES}"
        )
    if variance_type == "fixed_large":
        var = current_beta
    else:
        var = posterior_var.clamp(min=1e-20)  # diffusers clamps before its log
    return torch.where(timesteps > 0, var.sqrt(), torch.zeros_like(var))  # no noise is added at t = 0


def sde_window_mask(window: tuple[int, int] | None, num_steps: int) -> Tensor | None:
    """The ``(K,)`` bool mask of the step indices ``[a, b)`` of an SDE window (``None``: every step).

    Raises:
        ValueError: for a window that is not ``0 <= a < b <= num_steps``.
    """
    if window is None:
        return None
    a, b = (int(v) for v in window)
    if not 0 <= a < b <= num_steps:
        raise ValueError(f"sde_window must be step indices (a, b) with 0 <= a < b <= {num_steps}, got {tuple(window)}")
    mask = torch.zeros(num_steps, dtype=torch.bool)
    mask[a:b] = True
    return mask


def make_schedule(
    scheduler: SchedulerMixin,
    num_steps: int,
    eta: float = 1.0,
    device: str | torch.device | None = None,
    sde_window: tuple[int, int] | None = None,
) -> DenoisingSchedule:
    """Build the :class:`DenoisingSchedule` of a diffusers scheduler with ``num_steps`` steps.

    The scheduler is not modified (a fresh copy is built from its config).

    Args:
        scheduler: a ``DDIMScheduler`` or ``DDPMScheduler`` (or a subclass); a
            ``FlowMatchEulerDiscreteScheduler`` gives :func:`make_flow_schedule`'s :class:`FlowSchedule`
            with ``eta`` as its noise level ``a``.
        num_steps: K, the number of denoising steps (``set_timesteps(K)``).
        eta: DDIM's eta in ``[0, 1]`` (checked for DDPM too, which ignores it: its variance comes from
            its config). ``eta = 1`` gives σ² = the posterior variance; above 1, σ² exceeds
            ``1 − ᾱ_prev`` and the mean's ``sqrt(1 − ᾱ_prev − σ²)`` is NaN.
        device: where the coefficient tensors live (default: CPU).
        sde_window: flow schedulers only: the step indices ``[a, b)`` that are SDE steps (the others are
            ODE steps: deterministic, not stored, not trained), as Flow-GRPO-Fast; ``None``: every step.

    Raises:
        ValueError: for an unsupported scheduler, prediction type, variance type, ``num_steps``,
            ``eta``, or an SDE window (bad, or for a DDIM/DDPM scheduler).
    """
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        mask = sde_window_mask(sde_window, num_steps)
        return make_flow_schedule(scheduler, num_steps, eta, sde_steps=mask, device=device)  # type: ignore[return-value]
    if sde_window is not None:
        raise ValueError(
            f"sde_window applies to flow-matching schedulers (SD3); this {type(scheduler).__name__} chain takes None"
        )
    kind = _schedule_kind(scheduler)
    config = scheduler.config
    _check_schedule_args(config, num_steps, eta)
    total = int(config.num_train_timesteps)

    fresh = type(scheduler).from_config(config)
    fresh.set_timesteps(num_steps)
    timesteps = fresh.timesteps.to(torch.int64)
    alphas = fresh.alphas_cumprod.to(torch.float64)
    alpha_prod = alphas[timesteps]
    if kind == "ddim":
        prev_t = timesteps - total // num_steps
        final = float(fresh.final_alpha_cumprod)
    else:
        prev_t = torch.cat([timesteps[1:], torch.tensor([-1])])
        final = 1.0
    alpha_prod_prev = torch.where(prev_t >= 0, alphas[prev_t.clamp(min=0)], torch.full_like(alpha_prod, final))

    beta_t = 1 - alpha_prod
    beta_prev = 1 - alpha_prod_prev
    current_beta = 1 - alpha_prod / alpha_prod_prev
    posterior_var = beta_prev / beta_t * current_beta
    if kind == "ddim":
        std = float(eta) * posterior_var.clamp(min=0).sqrt()
    else:
        std = _ddpm_std(config, timesteps, current_beta, posterior_var)
        eta = 1.0

    return DenoisingSchedule(
        kind=kind,
        timesteps=timesteps,
        alpha_prod=alpha_prod.float(),
        alpha_prod_prev=alpha_prod_prev.float(),
        std=std.float(),
        eta=float(eta),
        prediction_type=config.prediction_type,
        clip_sample=bool(config.clip_sample),
        clip_sample_range=float(getattr(config, "clip_sample_range", 1.0)),
        thresholding=bool(getattr(config, "thresholding", False)),
        dynamic_thresholding_ratio=float(getattr(config, "dynamic_thresholding_ratio", 0.995)),
        sample_max_value=float(getattr(config, "sample_max_value", 1.0)),
        num_train_timesteps=total,
    ).to(device or "cpu")


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _at(coef: Tensor, k: StepIndex, like: Tensor) -> Tensor:
    """``coef[k]`` on ``like``'s device, shaped to broadcast against the ``(B, …)`` batch ``like``."""
    if isinstance(k, Tensor):
        k = k.to(device=coef.device, dtype=torch.long)
        value = coef[k]
        if value.ndim == 1:
            value = value.view(-1, *([1] * (like.ndim - 1)))
    else:
        value = coef[int(k)]
    return value.to(device=like.device, dtype=_compute_dtype(like))


def _check_index(k: StepIndex, schedule: DenoisingSchedule) -> None:
    if isinstance(k, Tensor):
        if k.device.type != "cpu":
            return  # range-checking indices on an accelerator would cost a host sync per step
        bad = (k < 0) | (k >= schedule.num_steps)
        if k.numel() and bool(bad.any()):
            raise IndexError(f"step indices must lie in [0, {schedule.num_steps - 1}], got {k.tolist()}")
    elif not 0 <= int(k) < schedule.num_steps:
        raise IndexError(f"step index must lie in [0, {schedule.num_steps - 1}], got {k}")


def timestep_at(k: StepIndex, schedule: DenoisingSchedule) -> Tensor:
    """The scheduler timestep ``t_k`` to feed the UNet at step index ``k`` (int64 tensor)."""
    _check_index(k, schedule)
    if isinstance(k, Tensor):
        return schedule.timesteps.to(k.device)[k.long()]
    return schedule.timesteps[int(k)]


def _threshold(x0: Tensor, schedule: DenoisingSchedule) -> Tensor:
    """Imagen's dynamic thresholding, per sample (as diffusers' ``_threshold_sample``)."""
    flat = x0.reshape(x0.shape[0], -1)
    s = torch.quantile(flat.abs(), schedule.dynamic_thresholding_ratio, dim=1)
    s = s.clamp(min=1, max=schedule.sample_max_value).view(-1, *([1] * (x0.ndim - 1)))
    return torch.clamp(x0, -s, s) / s


def predict_x0_eps(
    model_output: Tensor,
    x: Tensor,
    k: StepIndex,
    schedule: DenoisingSchedule,
    *,
    clip: bool = True,
    use_clipped_model_output: bool = False,
) -> tuple[Tensor, Tensor]:
    """The model's predictions of the clean image x̂0 and of the noise ε at step index ``k``.

    Args:
        model_output: the UNet's output (ε, x0 or v, per the schedule's ``prediction_type``).
        x: the current noisy image ``x_{t_k}``, ``(B, C, H, W)``.
        k: step index, int or ``(B,)`` tensor.
        schedule: from :func:`make_schedule`.
        clip: apply the scheduler's ``clip_sample`` / ``thresholding`` to x̂0.
        use_clipped_model_output: recompute ε from the clipped x̂0 (diffusers' option of that name).

    Returns:
        ``(x0, eps)`` in float32 (float64 for float64 inputs).
    """
    _check_index(k, schedule)
    dtype = _compute_dtype(x)
    out, x = model_output.to(dtype), x.to(dtype)
    if isinstance(schedule, FlowSchedule):  # v = ε − x0 and x = (1 − t)·x0 + t·ε
        t = _at(schedule.sigmas, k, x)
        return x - t * out, x + (1 - t) * out
    a = _at(schedule.alpha_prod, k, x)
    sqrt_a, sqrt_b = a.sqrt(), (1 - a).sqrt()
    if schedule.prediction_type == "epsilon":
        x0, eps = (x - sqrt_b * out) / sqrt_a, out
    elif schedule.prediction_type == "sample":
        x0 = out
        eps = (x - sqrt_a * x0) / sqrt_b
    else:  # v_prediction
        x0 = sqrt_a * x - sqrt_b * out
        eps = sqrt_a * out + sqrt_b * x
    if clip and schedule.thresholding:
        x0 = _threshold(x0, schedule)
    elif clip and schedule.clip_sample:
        x0 = x0.clamp(-schedule.clip_sample_range, schedule.clip_sample_range)
    if use_clipped_model_output:
        eps = (x - sqrt_a * x0) / sqrt_b
    return x0, eps


def step_std(k: StepIndex, schedule: DenoisingSchedule, like: Tensor) -> Tensor:
    """σ_k, shaped to broadcast against the batch ``like`` (0 at deterministic steps)."""
    _check_index(k, schedule)
    return _at(schedule.std, k, like)


def _mean_from(x0: Tensor, eps: Tensor, x: Tensor, k: StepIndex, schedule: DenoisingSchedule) -> Tensor:
    a_prev = _at(schedule.alpha_prod_prev, k, x0)
    if schedule.kind == "ddim":
        std = _at(schedule.std, k, x0)
        return a_prev.sqrt() * x0 + (1 - a_prev - std**2).sqrt() * eps
    a = _at(schedule.alpha_prod, k, x0)
    current_alpha = a / a_prev
    coef_x0 = a_prev.sqrt() * (1 - current_alpha) / (1 - a)
    coef_x = current_alpha.sqrt() * (1 - a_prev) / (1 - a)
    return coef_x0 * x0 + coef_x * x.to(x0.dtype)


def step_mean(
    model_output: Tensor,
    x: Tensor,
    k: StepIndex,
    schedule: DenoisingSchedule,
    *,
    use_clipped_model_output: bool = False,
) -> Tensor:
    """μ, the mean of the policy ``π(x_prev | x, k)`` (DDIM(eta), the DDPM posterior or the flow SDE step)."""
    if isinstance(schedule, FlowSchedule):
        return _flow_mean(model_output, x, k, schedule)
    x0, eps = predict_x0_eps(model_output, x, k, schedule, use_clipped_model_output=use_clipped_model_output)
    return _mean_from(x0, eps, x, k, schedule)


def _flow_mean(v: Tensor, x: Tensor, k: StepIndex, schedule: FlowSchedule) -> Tensor:
    """``x + [v + σ_t²/(2t)·(x + (1 − t)·v)]·Δt`` (the module docstring)."""
    _check_index(k, schedule)
    dtype = _compute_dtype(x)
    v, x = v.to(dtype), x.to(dtype)
    t, dt, drift = _at(schedule.sigmas, k, x), _at(schedule.dt, k, x), _at(schedule.drift, k, x)
    return x + (v + drift * (x + (1 - t) * v)) * dt


def log_prob(x_prev: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Gaussian log-density of ``x_prev`` under ``N(mean, std²)``, **averaged over pixels**.

    Args:
        x_prev: the action, ``(B, …)``.
        mean: μ, same shape.
        std: σ, broadcastable (e.g. ``(B, 1, 1, 1)`` or a scalar tensor).

    Returns:
        ``(B,)`` float32 (float64 for float64 inputs); exactly 0 for samples whose σ is 0
        (deterministic steps carry no log-probability and must be masked out of policy losses).
    """
    dtype = _compute_dtype(mean)
    x_prev, mean = x_prev.to(dtype), mean.to(dtype)
    std = torch.broadcast_to(std.to(dtype), x_prev.shape)
    zero = std == 0
    safe_std = torch.where(zero, torch.ones_like(std), std)
    per_pixel = -((x_prev - mean) ** 2) / (2 * safe_std**2) - safe_std.log() - _HALF_LOG_2PI
    lp = per_pixel.flatten(1).mean(dim=1)
    return torch.where(zero.flatten(1).all(dim=1), torch.zeros_like(lp), lp)


def kl_same_std(mean: Tensor, ref_mean: Tensor, std: Tensor, reduction: Literal["mean", "sum"] = "mean") -> Tensor:
    """``KL(N(μ, σ²) ‖ N(μ_ref, σ²))`` per sample: ``mean((μ − μ_ref)² / 2σ²)`` over the image's dimensions.

    The KL of a policy step to a reference model's step at the same state (both Gaussians share
    the scheduler's σ). Deterministic steps (σ = 0) have KL 0.

    Args:
        mean: ``(B, …)`` the policy's means.
        ref_mean: ``(B, …)`` the reference's means.
        std: σ, broadcastable to ``mean`` with a leading batch dimension.
        reduction: ``mean`` over the dimensions (the scale of the per-pixel log-probs, PPO-IS's
            ``kl_coef`` and ``eval/kl_to_base``) or ``sum``: the Gaussian KL of the whole sample,
            ``D`` times larger for ``D`` dimensions (VARD's, next to a per-sample value).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    zero = std == 0
    safe = torch.where(zero, torch.ones_like(std), std)
    per_dim = ((mean - ref_mean) ** 2 / (2 * safe**2)).flatten(1)
    kl = per_dim.mean(1) if reduction == "mean" else per_dim.sum(1)
    return torch.where(zero.flatten(1).all(1), torch.zeros_like(kl), kl)


def add_noise(x0: Tensor, noise: Tensor, k: StepIndex, schedule: DenoisingSchedule) -> Tensor:
    """Noise clean images to step index ``k``: ``sqrt(ᾱ_{t_k})·x0 + sqrt(1 − ᾱ_{t_k})·noise``.

    Equals diffusers' ``scheduler.add_noise(x0, noise, t_k)``; for a flow schedule ``(1 − t_k)·x0 +
    t_k·noise`` (``scale_noise``). Returned in ``x0``'s dtype.
    """
    _check_index(k, schedule)
    if isinstance(schedule, FlowSchedule):  # x_t = (1 − t)·x0 + t·ε, as FlowMatchEulerDiscreteScheduler.scale_noise
        t = _at(schedule.sigmas, k, x0)
        return ((1 - t) * x0.to(t.dtype) + t * noise.to(t.dtype)).to(x0.dtype)
    a = _at(schedule.alpha_prod, k, x0)
    return (a.sqrt() * x0.to(a.dtype) + (1 - a).sqrt() * noise.to(a.dtype)).to(x0.dtype)


class StepOutput(NamedTuple):
    """The result of one policy step (:func:`denoise_step`)."""

    x_prev: Tensor
    """The action: the next, less noisy image (input dtype)."""
    log_prob: Tensor
    """``(B,)`` log π(x_prev | x, k), averaged over pixels (0 at deterministic steps)."""
    mean: Tensor
    """μ (compute dtype)."""
    std: Tensor
    """σ, broadcastable to the batch."""
    x0: Tensor
    """The model's x̂0 prediction at this step (clipped as configured)."""


def denoise_step(
    model_output: Tensor,
    x: Tensor,
    k: StepIndex,
    schedule: DenoisingSchedule,
    *,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    x_prev: Tensor | None = None,
    use_clipped_model_output: bool = False,
) -> StepOutput:
    """One step of the Gaussian policy: sample ``x_prev`` (or score a given one) and its log-prob.

    Args:
        model_output: the network's output at ``(x, t_k, c)`` (ε, x0 or v; a flow model's velocity).
        x: current images ``(B, C, H, W)``.
        k: step index, int or ``(B,)`` tensor.
        schedule: from :func:`make_schedule` (or :func:`make_flow_schedule`).
        noise: the standard normal ``z`` of the action ``μ + σ·z`` (drawn if not given).
        generator: RNG for drawing ``z``.
        x_prev: an action to score instead of sampling one (PPO's recomputation).
        use_clipped_model_output: see :func:`predict_x0_eps`.
    """
    x0, eps = predict_x0_eps(model_output, x, k, schedule, use_clipped_model_output=use_clipped_model_output)
    if isinstance(schedule, FlowSchedule):
        mean = _flow_mean(model_output, x, k, schedule)
    else:
        mean = _mean_from(x0, eps, x, k, schedule)
    std = step_std(k, schedule, mean)
    if x_prev is None:
        if noise is None:  # drawn where the generator lives (a CPU generator gives device-independent draws)
            where = generator.device if generator is not None else x.device
            noise = torch.randn(x.shape, generator=generator, device=where, dtype=mean.dtype).to(x.device)
        x_prev = (mean + std * noise.to(mean.dtype)).to(x.dtype)
    return StepOutput(x_prev, log_prob(x_prev, mean, std), mean, std, x0)


Denoiser = Callable[[Tensor, Tensor, Tensor | None], Tensor]
"""``(x, t, c) -> model_output``: a UNet call (or any network) at images ``x``, timesteps ``t`` ``(B,)``
and conditions ``c`` (class ids ``(B,)``, or ``None`` for an unconditional model)."""


def unet_denoiser(unet: torch.nn.Module) -> Denoiser:
    """Wrap a diffusers ``UNet2DModel`` as a :data:`Denoiser` (class labels passed when it has them)."""
    conditional = getattr(unet.config, "num_class_embeds", None) is not None or (
        getattr(unet.config, "class_embed_type", None) is not None
    )

    def denoise(x: Tensor, t: Tensor, c: Tensor | None) -> Tensor:
        if conditional and c is None:
            raise ValueError("this UNet is class-conditional: pass conditions (class ids), got None")
        return unet(x, t, class_labels=c if conditional else None).sample

    return denoise


class NoiseSource(Protocol):
    """Where the policy noise of a chain's steps comes from (see :func:`denoise_chain`).

    ``noise(k, x)`` returns the standard-normal ``z`` of the action ``μ + σ·z`` at step index ``k``
    for the batch ``x`` (same shape as ``x``, any device: the chain moves it to ``x``'s). It is called
    once per step, in step order, so the sources below keep their RNG streams in a fixed order.
    """

    def __call__(self, k: int, x: Tensor) -> Tensor:
        """The noise ``z`` of step index ``k`` for the batch ``x``."""
        ...


class GeneratorNoise:
    """Policy noise drawn from ``generator`` on *its* device, one ``x``-shaped draw per step.

    A CPU generator gives the same images on every device. ``None`` draws from torch's global RNG
    on ``x``'s device. The draw's dtype is the policy's compute dtype (float32, float64 for float64
    images).

    Args:
        generator: the RNG, or ``None`` for the global one.
    """

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def __call__(self, k: int, x: Tensor) -> Tensor:
        """A fresh draw shaped like ``x`` (``k`` is not used: draws follow the call order)."""
        where = self.generator.device if self.generator is not None else x.device
        return torch.randn(x.shape, generator=self.generator, device=where, dtype=_compute_dtype(x))


class GlobalBatchNoise:
    """One process's rows of the policy noise of a batch that several processes denoise together.

    Each step draws the noise of the whole ``batch_size``-row batch from ``generator`` (as
    :class:`GeneratorNoise` would for that batch) and keeps ``rows``, so that processes sharing the
    generator's state denoise their rows exactly as one process would denoise the whole batch.

    Args:
        generator: the RNG every process holds in the same state.
        batch_size: rows of the global batch.
        rows: this process's rows of it.
    """

    def __init__(self, generator: torch.Generator, batch_size: int, rows: slice) -> None:
        self.generator = generator
        self.batch_size = batch_size
        self.rows = rows

    def __call__(self, k: int, x: Tensor) -> Tensor:
        """The global draw's ``rows`` (``x`` holds them; it may have none)."""
        shape = (self.batch_size, *x.shape[1:])
        z = torch.randn(shape, generator=self.generator, device=self.generator.device, dtype=_compute_dtype(x))
        return z[self.rows]


class PrecomputedNoise:
    """Policy noise drawn in advance: step index ``k`` uses ``noise[k]``.

    Chains that must share their noise step by step (e.g. chains that switch models mid-way) read
    it from one tensor.

    Args:
        noise: ``(K, B, C, H, W)`` standard-normal draws, one batch per step index.
    """

    def __init__(self, noise: Tensor) -> None:
        self.noise = noise

    def __call__(self, k: int, x: Tensor) -> Tensor:
        """``noise[k]``."""
        return self.noise[k]


StepCallback = Callable[[int, StepOutput], None]
"""``on_step(k, step)``: called after each step of a chain with the step index and its :class:`StepOutput`."""


def _chain_range(schedule: DenoisingSchedule, start: int, stop: int | None, noise: NoiseSource | None) -> int:
    """Check a chain's step range (and that a stochastic one has a noise source); return ``stop``."""
    stop = schedule.num_steps if stop is None else stop
    if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= schedule.num_steps):
        raise ValueError(
            f"a chain needs int step indices 0 <= start <= stop <= {schedule.num_steps}, got start={start!r}, "
            f"stop={stop!r}"
        )
    if noise is None and not bool(schedule.deterministic[start:stop].all()):
        stochastic = [start + i for i, d in enumerate(schedule.deterministic[start:stop].tolist()) if not d]
        raise ValueError(
            f"noise=None makes a deterministic chain, but the steps {stochastic} of this schedule "
            f"(eta={schedule.eta}) are stochastic: pass a noise source (e.g. GeneratorNoise(generator)) or use eta=0"
        )
    return stop


@torch.no_grad()
def denoise_chain(
    denoiser: Denoiser,
    x: Tensor,
    schedule: DenoisingSchedule,
    condition: Tensor | None = None,
    *,
    start: int = 0,
    stop: int | None = None,
    noise: NoiseSource | None = None,
    on_step: StepCallback | None = None,
) -> Tensor:
    """Run the policy from step index ``start`` through ``stop - 1``: the one denoising loop of the library.

    Each step calls ``denoiser`` at ``(x, t_k, condition)``, then takes ``noise(k, x)`` and makes the
    step ``x ← μ + σ_k·z`` (:func:`denoise_step`). A batch with no rows calls no denoiser but still
    draws each step's noise, so that processes that share a noise stream stay in step. Runs without
    gradients.

    Args:
        denoiser: the network, see :data:`Denoiser`.
        x: images at step index ``start`` (pure noise for ``start = 0``).
        schedule: from :func:`make_schedule`.
        condition: conditions passed to the denoiser.
        start: first step index.
        stop: one past the last step index (default: the end of the chain).
        noise: where each step's policy noise comes from: :class:`GeneratorNoise`,
            :class:`GlobalBatchNoise`, :class:`PrecomputedNoise` or any :class:`NoiseSource`; ``None``
            for a deterministic chain (every step in the range has σ = 0, e.g. DDIM with ``eta = 0``).
        on_step: called with ``(k, StepOutput)`` after every step (e.g. to record the x̂0 predictions).

    Returns:
        The images after the last step, in ``x``'s dtype.

    Raises:
        ValueError: for a bad step range, or ``noise=None`` with a stochastic step in the range.
    """
    stop = _chain_range(schedule, start, stop, noise)
    for k in range(start, stop):
        if x.shape[0] == 0:
            if noise is not None:
                noise(k, x)
            continue
        t = timestep_at(k, schedule).to(x.device).expand(x.shape[0])
        output = denoiser(x, t, condition)
        z = torch.zeros_like(x) if noise is None else noise(k, x).to(x.device)
        step = denoise_step(output, x, k, schedule, noise=z)
        if on_step is not None:
            on_step(k, step)
        x = step.x_prev
    return x


def run_chain(
    denoiser: Denoiser,
    x: Tensor,
    schedule: DenoisingSchedule,
    condition: Tensor | None = None,
    start: int = 0,
    stop: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Denoise ``x`` from step index ``start`` through ``stop - 1`` (default: to the end) with the policy.

    :func:`denoise_chain` with :class:`GeneratorNoise`: noise is drawn at every step, also at
    deterministic ones (with ``generator=None`` the global RNG advances as it always did). With a DDIM
    schedule of ``eta = 0`` the chain is deterministic (HRF-D's probes).

    Args:
        denoiser: the network, see :data:`Denoiser`.
        x: images at step index ``start`` (pure noise for ``start = 0``).
        schedule: from :func:`make_schedule`.
        condition: conditions passed to the denoiser.
        start: first step index.
        stop: one past the last step index.
        generator: RNG of the policy noise (drawn on the generator's device, then moved to ``x``'s).

    Returns:
        The images after the last step, in ``x``'s dtype.
    """
    return denoise_chain(denoiser, x, schedule, condition, start=start, stop=stop, noise=GeneratorNoise(generator))


def to_unit_range(x: Tensor) -> Tensor:
    """Map model-space images in ``[-1, 1]`` to ``[0, 1]`` (clamped) — what rewards and metrics see."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def initial_noise(n: int, sample_shape: tuple[int, ...], seed: int, device: str | torch.device = "cpu") -> Tensor:
    """``n`` standard-normal images drawn on the CPU from ``seed``, then moved to ``device``.

    Drawing on the CPU makes the noise identical on every device, so evaluations of different
    models (Base / DDPO / HRF / HRF-D) start from the same noise, sample for sample.
    """
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *sample_shape), generator=g).to(device)


@torch.no_grad()
def generate(
    denoiser: Denoiser,
    schedule: DenoisingSchedule,
    n: int,
    sample_shape: tuple[int, ...],
    conditions: Tensor | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    on_step: StepCallback | None = None,
) -> Tensor:
    """Sample ``n`` images from pure noise (the full chain), in ``[-1, 1]``.

    The initial noise comes from :func:`initial_noise` (``seed``): image ``i`` of every model starts
    from the same noise. The policy noise comes from a CPU generator seeded with ``seed + 1`` and is
    drawn batch by batch (:class:`GeneratorNoise`: one draw per step of each batch's
    :func:`denoise_chain`), so a run is reproduced exactly with the same ``seed`` and ``batch_size``.

    Args:
        denoiser: see :data:`Denoiser`.
        schedule: from :func:`make_schedule` (on ``device``).
        n: number of images.
        sample_shape: ``(C, H, W)``.
        conditions: ``(n,)`` class ids for a class-conditional model.
        seed: seed of the initial and policy noise.
        device: where to run.
        batch_size: images per chain.
        on_step: :func:`denoise_chain`'s, called for the steps of each batch of images in turn.
    """
    x_all = initial_noise(n, sample_shape, seed)
    policy_noise = GeneratorNoise(torch.Generator().manual_seed(seed + 1))
    out = []
    for start in range(0, n, batch_size):
        x = x_all[start : start + batch_size].to(device)
        c = None if conditions is None else conditions[start : start + batch_size].to(device)
        out.append(denoise_chain(denoiser, x, schedule, c, noise=policy_noise, on_step=on_step))
    return torch.cat(out)
