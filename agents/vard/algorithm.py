"""VARD: fine-tune the denoiser with a learned value as a dense, differentiable reward (arXiv 2505.15791).

Per epoch:

1. **Collect** ``num_batches_per_epoch`` batches of episodes from the native vector env with the
   current UNet (no grad); every state ``x_k`` (``k = 0 … K``, the clean image included) is labelled
   with its episode's final reward ``r(x_0, c)``. The reward needs no gradient (JPEG works).
2. **Fit the value** ``V(c, t, x_t)`` (:mod:`agents.vard.value`) by MSE on the states of the last
   ``value.buffer_epochs`` epochs (``value.warmup_steps`` extra steps before the first update).
3. **Update the policy**: from start states ``x_k`` drawn from this epoch's rollouts (stochastic
   steps only), unroll ``train.backprop_steps`` denoising steps of the policy with the
   reparameterised sample ``x_{k+1} = μ_θ(x_k) + σ_k z`` and maximise, per unrolled step,

       V̂(c, t_{k+1}, x_{k+1}) − β · sum((μ_θ − μ_base)² / 2σ_k²)

   where ``V̂`` is the value in normalised units (the reward's scale does not set the learning
   rate) and the second term is the KL of the step's Gaussian to the frozen base model's, summed
   over the image's dimensions like the per-sample value (``train.kl_reduction: mean`` averages
   instead, as PPO-IS's ``kl_coef``: D times weaker, and on the 16×16 digits too weak to keep
   the model; deterministic σ = 0 steps carry no KL and are never start states). The
   gradient of the value flows through the image into the UNet: truncated back-propagation through
   ``backprop_steps`` steps instead of the whole chain, which the dense value makes sufficient.
4. **Log** to TensorBoard (reward, value loss and explained variance, objective, KL); the runner
   (:class:`~agents.common.runner.OnPolicyRunner`) adds the fixed-noise evaluation and checkpoints
   (the value network is saved as ``value.safetensors`` next to the UNet).

The value, the policy and the data all live on ``config.device``; all denoising math is
:mod:`diffusion_gym.sampling`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from diffusion_gym import sampling

from ..common.collector import make_env
from ..common.policy import DiffusionPolicy
from ..common.runner import Algorithm, EpochStats, RunContext, TrainingDivergedError
from .config import VardConfig
from .value import (
    ValueBuffer,
    ValueData,
    ValueNetwork,
    collect_value_data,
    explained_variance,
    fit_value,
    prompt_features,
    state_timesteps,
)

__all__ = ["VARD", "VardEpochStats", "policy_update"]


@dataclass(kw_only=True)
class VardEpochStats(EpochStats):
    """What one VARD epoch logged."""

    value_loss: float
    value_explained_variance: float
    """In-sample: over the regression set, after fitting."""
    value_heldout_explained_variance: float
    """Out-of-sample: over this epoch's fresh rollouts, before fitting on them (NaN in the first epoch)."""
    objective: float
    value_gain: float
    kl_to_reference: float

    def scalars(self) -> dict[str, float]:
        """The TensorBoard scalars."""
        return {
            **super().scalars(),
            "value/loss": self.value_loss,
            "value/explained_variance": self.value_explained_variance,
            "value/heldout_explained_variance": self.value_heldout_explained_variance,
            "train/objective": self.objective,
            "train/value_gain": self.value_gain,
            "train/kl_to_reference": self.kl_to_reference,
        }

    def postfix(self) -> dict[str, str]:
        """Reward and the value's held-out explained variance in the progress bar."""
        return {**super().postfix(), "heldout_ev": f"{self.value_heldout_explained_variance:.2f}"}


class VARD(Algorithm):
    """VARD: the policy follows a learned value's gradient, with a KL penalty to the base model (one process)."""

    name = "vard"

    def __init__(self, config: VardConfig, run: RunContext) -> None:
        super().__init__(config, run)
        unet, schedule, device = run.family.denoiser, run.schedule, config.device
        self.policy = run.make_policy()
        self.reference = None
        if config.train.kl_coef > 0:
            self.reference = run.make_policy(copy.deepcopy(unet).requires_grad_(False))
        self.envs = make_env(config, self.policy, run.family)
        core, v, t = self.envs.core, config.value, config.train
        prompts = prompt_features(core.conditions)  # a text model's value reads the prompt
        self.value = ValueNetwork(
            core.sample_shape[0], core.num_classes, width=v.width, depth=v.depth,
            num_train_timesteps=schedule.num_train_timesteps, condition_dim=prompts[1] if prompts else None,
        ).to(device)  # fmt: skip
        if prompts is not None:
            self.value.condition_features = prompts[0]
        self.value_optimizer = torch.optim.Adam(self.value.parameters(), lr=v.learning_rate)
        self.optimizer = torch.optim.AdamW(
            self.policy.trainable_parameters(), lr=t.learning_rate, weight_decay=t.weight_decay
        )
        self.buffer = ValueBuffer(v.buffer_epochs)

    def train_epoch(self, epoch: int) -> VardEpochStats:
        """Collect, fit the value, update the policy."""
        config, schedule, v = self.config, self.policy.schedule, self.config.value
        self.policy.eval()
        data, rewards = collect_value_data(self.envs, self.policy, config.sample.num_batches_per_epoch, self.generator)
        heldout = explained_variance(self.value, data) if bool(self.value.initialized) else float("nan")
        self.buffer.add(data)
        self.run.phase("value fit")
        steps = v.steps_per_epoch + (v.warmup_steps if epoch == 0 else 0)
        fitted = fit_value(
            self.value, self.value_optimizer, self.buffer.data(), steps, v.batch_size, self.generator, v.max_grad_norm
        )
        k, deterministic = data.k, schedule.deterministic.to(config.device)
        stochastic = (k < schedule.num_steps) & ~deterministic[k.clamp(max=schedule.num_steps - 1)]
        starts = data.rows(torch.nonzero(stochastic).flatten())
        self.run.phase("update")
        logged = policy_update(self.policy, self.reference, self.value, self.optimizer, starts, config, self.generator)
        return VardEpochStats(
            epoch=epoch,
            reward_mean=rewards.mean().item(),
            reward_std=rewards.std().item() if rewards.numel() > 1 else 0.0,
            value_loss=fitted["loss"],
            value_explained_variance=fitted["explained_variance"],
            value_heldout_explained_variance=heldout,
            objective=logged["objective"],
            value_gain=logged["value_gain"],
            kl_to_reference=logged["kl_to_reference"],
        )

    def state_dict(self) -> dict[str, Any]:
        """The UNet's and the value's optimizers (the value's regression set is not saved: it restarts)."""
        return {"optimizer": self.optimizer.state_dict(), "value_optimizer": self.value_optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any], extra_weights: dict[str, dict[str, Tensor]]) -> None:
        """Restore :meth:`state_dict` and the value network."""
        self.value.load_state_dict(extra_weights["value"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.value_optimizer.load_state_dict(state["value_optimizer"])

    def extra_weights(self) -> dict[str, dict[str, Tensor]]:
        """The value network."""
        return {"value": self.value.state_dict()}


def policy_update(
    policy: DiffusionPolicy,
    reference: DiffusionPolicy | None,
    value: ValueNetwork,
    optimizer: torch.optim.Optimizer,
    starts: ValueData,
    config: VardConfig,
    generator: torch.Generator,
) -> dict[str, float]:
    """``train.updates_per_epoch`` optimizer steps of the value-gradient objective (see the module docstring).

    Args:
        policy: the UNet policy being trained.
        reference: the frozen base model's policy for the KL penalty (``None``: no penalty).
        value: the fitted value (frozen here).
        optimizer: the UNet's optimizer.
        starts: candidate start states (this epoch's rollout states at stochastic steps).
        config: the run's config (``train`` section).
        generator: CPU generator of the start-state draws and the policy noise.

    Returns:
        Means over the updates: ``objective`` (value − β·KL per step), ``value_gain`` (``V`` of the
        next state minus ``V`` of the start, reward units, per unrolled step) and ``kl_to_reference``.

    Raises:
        TrainingDivergedError: when the gradient norm is NaN/Inf (before the optimizer step).
    """
    t = config.train
    value.requires_grad_(False)
    params = [p for p in policy.trainable_parameters()]
    sums = {"objective": 0.0, "value_gain": 0.0, "kl_to_reference": 0.0}
    policy.train()
    try:
        for _ in range(t.updates_per_epoch):
            index = torch.randint(len(starts), (min(t.batch_size, len(starts)),), generator=generator)
            batch = starts.rows(index.to(starts.x.device))
            optimizer.zero_grad(set_to_none=True)
            n = len(batch)
            for lo in range(0, n, t.micro_batch_size):
                mb = batch.rows(torch.arange(lo, min(lo + t.micro_batch_size, n), device=batch.x.device))
                total, gain, kl_total = _unroll(policy, reference, value, mb, config, generator)
                loss = -(total / t.backprop_steps).sum() / n
                loss.backward()
                sums["objective"] += total.detach().sum().item() / (n * t.backprop_steps)
                sums["value_gain"] += gain.sum().item() / (n * t.backprop_steps)
                sums["kl_to_reference"] += kl_total.sum().item() / (n * t.backprop_steps)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
            if not bool(torch.isfinite(grad_norm)):
                raise TrainingDivergedError(
                    f"the VARD gradient norm is {grad_norm.item()} (NaN/Inf): stopping before the optimizer step; "
                    "no weights or checkpoints were changed. Lower train.learning_rate or check the value."
                )
            optimizer.step()
    finally:
        value.requires_grad_(True)
        policy.eval()
    return {name: s / t.updates_per_epoch for name, s in sums.items()}


def _unroll(
    policy: DiffusionPolicy,
    reference: DiffusionPolicy | None,
    value: ValueNetwork,
    mb: ValueData,
    config: VardConfig,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor]:
    """Unroll ``train.backprop_steps`` reparameterised policy steps from the states ``mb``.

    Returns per start state: the objective summed over the steps (with gradient), the value gained
    (reward units) and the KL to the reference (both without gradient).
    """
    t, schedule = config.train, policy.schedule
    K = schedule.num_steps
    timesteps = state_timesteps(schedule).to(mb.x.device)
    deterministic = schedule.deterministic.to(mb.x.device)
    use_kl = reference is not None and t.kl_coef > 0
    x, k, c = mb.x, mb.k, mb.c if policy.conditional else None
    with torch.no_grad():
        v_prev = value(x, timesteps[k], mb.c)
    total = torch.zeros(x.shape[0], device=x.device)
    gain = torch.zeros_like(total)
    kl_total = torch.zeros_like(total)
    for j in range(t.backprop_steps):
        kj = k + j
        active = kj < K
        if not bool(active.any()):
            break
        kc = kj.clamp(max=K - 1)
        z = torch.randn(x.shape, generator=generator).to(x.device)
        step = sampling.denoise_step(policy.model_output(x, kc, c), x, kc, schedule, noise=z)
        v_next = value.normalized(step.x_prev, timesteps[kc + 1], mb.c)
        if use_kl:
            assert reference is not None
            with torch.no_grad():
                ref_mean = sampling.step_mean(reference.model_output(x, kc, c), x, kc, schedule)
            kl = sampling.kl_same_std(step.mean, ref_mean, step.std, reduction=t.kl_reduction)
            kl = torch.where(deterministic[kc], torch.zeros_like(kl), kl)
        else:
            kl = torch.zeros_like(v_next)
        mask = active.float()
        total = total + mask * (v_next - t.kl_coef * kl)
        kl_total = kl_total + mask * kl.detach()
        with torch.no_grad():
            v_abs = value.target_mean + value.target_std * v_next
            gain = gain + mask * (v_abs - v_prev)
            v_prev = torch.where(active, v_abs, v_prev)
        x = torch.where(active.view(-1, 1, 1, 1), step.x_prev, x)
    return total, gain, kl_total
