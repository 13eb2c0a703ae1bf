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

       V̂(c, t_{k+1}, x_{k+1}) − β · mean((μ_θ − μ_base)² / 2σ_k²)

   where ``V̂`` is the value in normalised units (the reward's scale does not set the learning
   rate) and the second term is the KL of the step's Gaussian to the frozen base model's (as
   PPO-IS's ``kl_coef``; deterministic σ = 0 steps carry no KL and are never start states). The
   gradient of the value flows through the image into the UNet: truncated back-propagation through
   ``backprop_steps`` steps instead of the whole chain, which the dense value makes sufficient.
4. **Log** to TensorBoard (reward, value loss and explained variance, objective, KL, fixed-noise
   evaluation reward and image grid) and **checkpoint** with
   :func:`agents.common.checkpoint.save_checkpoint` (a diffusers pipeline folder, so
   ``diffusion-gym sample --checkpoint`` and ``diffusion-gym evaluate`` read it; the value network
   is saved as ``value.safetensors``).

The value, the policy and the data all live on ``config.device``; all denoising math is
:mod:`diffusion_gym.sampling`.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

from diffusion_gym import metrics, sampling
from diffusion_gym.models import load_model

from ..common.checkpoint import (
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from ..common.policy import DiffusionPolicy
from ..ppo_is.trainer import TrainResult, make_env
from .config import VardConfig, dump_vard_config
from .value import (
    ValueBuffer,
    ValueData,
    ValueNetwork,
    collect_value_data,
    explained_variance,
    fit_value,
    state_timesteps,
)

__all__ = ["VardEpochStats", "VardResult", "evaluate_policy", "policy_update", "train"]


@dataclass
class VardEpochStats:
    """What one epoch logged."""

    epoch: int
    reward_mean: float
    reward_std: float
    value_loss: float
    value_explained_variance: float
    """In-sample: over the regression set, after fitting."""
    value_heldout_explained_variance: float
    """Out-of-sample: over this epoch's fresh rollouts, before fitting on them (NaN in the first epoch)."""
    objective: float
    value_gain: float
    kl_to_reference: float
    seconds: float
    eval_reward_mean: float | None = None


@dataclass
class VardResult(TrainResult):
    """The outcome of :func:`train`: PPO-IS's result fields, with VARD's per-epoch statistics."""

    epochs: list[VardEpochStats] = field(default_factory=list)  # type: ignore[assignment]


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
    """
    t = config.train
    schedule = policy.schedule
    K = schedule.num_steps
    timesteps = state_timesteps(schedule).to(starts.x.device)
    deterministic = schedule.deterministic.to(starts.x.device)
    use_kl = reference is not None and t.kl_coef > 0
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
                    out = policy.model_output(x, kc, c)
                    step = sampling.denoise_step(out, x, kc, schedule, noise=z)
                    v_next = value.normalized(step.x_prev, timesteps[kc + 1], mb.c)
                    if use_kl:
                        with torch.no_grad():
                            ref_mean = sampling.step_mean(reference.model_output(x, kc, c), x, kc, schedule)
                        kl = sampling.kl_same_std(step.mean, ref_mean, step.std)
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
                loss = -(total / t.backprop_steps).sum() / n
                loss.backward()
                sums["objective"] += total.detach().sum().item() / (n * t.backprop_steps)
                sums["value_gain"] += gain.sum().item() / (n * t.backprop_steps)
                sums["kl_to_reference"] += kl_total.sum().item() / (n * t.backprop_steps)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
            if not bool(torch.isfinite(grad_norm)):
                raise FloatingPointError(
                    f"the VARD gradient norm is {grad_norm.item()}: stopping before the optimizer step; "
                    "lower train.learning_rate or check the value"
                )
            optimizer.step()
    finally:
        value.requires_grad_(True)
        policy.eval()
    return {name: s / t.updates_per_epoch for name, s in sums.items()}


@torch.no_grad()
def evaluate_policy(
    policy: DiffusionPolicy,
    reward_fn: Callable[[Tensor, Tensor | None], Tensor],
    num_samples: int,
    seed: int,
    sample_shape: tuple[int, ...],
    num_classes: int | None,
    device: str | torch.device = "cpu",
) -> tuple[metrics.MeanStd, Tensor]:
    """Reward (mean, standard error) of ``num_samples`` images from fixed noise, and the images in ``[0, 1]``.

    The initial and policy noise come from ``seed`` (:func:`diffusion_gym.sampling.generate`), so
    the base model and every fine-tuned one are evaluated on the same noise, sample for sample.
    Conditions cycle over the classes (``i % num_classes``).
    """
    conditions = torch.arange(num_samples) % num_classes if num_classes else None
    images = sampling.generate(
        policy.denoiser(), policy.schedule, num_samples, sample_shape, conditions, seed=seed, device=device
    )
    images = sampling.to_unit_range(images)
    rewards = reward_fn(images, conditions.to(device) if conditions is not None else None)
    return metrics.mean_and_standard_error(rewards.float().cpu()), images


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _save_grid(images: Tensor, path: Path, num_classes: int | None) -> None:
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, path, nrow=num_classes or max(1, int(len(images) ** 0.5)), padding=1, pad_value=0.5)


def train(
    config: VardConfig,
    *,
    run_dir: str | Path | None = None,
    resume: str | Path | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> VardResult:
    """Run VARD as configured (single process).

    Args:
        config: the validated configuration (:func:`agents.vard.config.load_vard_config`).
        run_dir: where logs, samples and checkpoints go (default: ``logdir/run_name``).
        resume: a checkpoint (or run directory) to continue from: UNet, value, optimizers, env and
            RNG states (the value's regression set is not saved, it can be gigabytes for large
            images: it restarts from the next epoch's rollouts).
        progress: show a progress bar.
        stop_after: stop after this many epochs of this call.

    Returns:
        Per-epoch statistics and the fixed-noise evaluation rewards before and after.
    """
    from tqdm.auto import tqdm

    name = config.run_name or time.strftime("vard-%Y%m%d-%H%M%S")
    run_dir = Path(run_dir) if run_dir is not None else Path(config.logdir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_vard_config(config))
    _seed_everything(config.seed)
    device = config.device

    loaded = load_model(config.model, scheduler=config.sample.scheduler, device=device)
    schedule = sampling.make_schedule(loaded.scheduler, config.sample.num_steps, eta=config.sample.eta, device=device)
    policy = DiffusionPolicy(loaded.unet, schedule)
    reference = None
    if config.train.kl_coef > 0:
        reference = DiffusionPolicy(copy.deepcopy(loaded.unet).requires_grad_(False), schedule)
    envs = make_env(config, policy, loaded)
    sample_shape, num_classes = envs.core.sample_shape, envs.core.num_classes
    v = config.value
    value = ValueNetwork(
        sample_shape[0], num_classes, width=v.width, depth=v.depth, num_train_timesteps=schedule.num_train_timesteps
    ).to(device)
    value_opt = torch.optim.Adam(value.parameters(), lr=v.learning_rate)
    t = config.train
    policy_opt = torch.optim.AdamW(policy.trainable_parameters(), lr=t.learning_rate, weight_decay=t.weight_decay)
    buffer = ValueBuffer(v.buffer_epochs)
    generator = torch.Generator().manual_seed(config.seed)
    result = VardResult(run_dir=run_dir)
    writer = SummaryWriter(str(run_dir / "tb"))

    def evaluate() -> tuple[metrics.MeanStd, Tensor]:
        e = config.eval
        return evaluate_policy(policy, envs.core.reward_fn, e.num_samples, e.seed, sample_shape, num_classes, device)

    start_epoch = 0
    if resume is not None:
        from diffusers import UNet2DModel

        ckpt = load_checkpoint(latest_checkpoint(resume) or resume)
        policy.unet.load_state_dict(UNet2DModel.from_pretrained(ckpt.unet_dir).state_dict())
        value.load_state_dict(ckpt.extra_weights["value"])
        state = ckpt.state
        policy_opt.load_state_dict(state["policy_optimizer"])
        value_opt.load_state_dict(state["value_optimizer"])
        envs.load_state_dict(state["env"])
        generator.set_state(state["generator"])
        restore_rng_state(state["rng"])
        result.base_eval = metrics.MeanStd(*state["base_eval"]) if state.get("base_eval") else None
        start_epoch = ckpt.epoch + 1
    else:
        envs.reset(seed=config.seed)
        result.base_eval, images = evaluate()
        writer.add_scalar("eval/reward_mean", result.base_eval.mean, 0)
        writer.add_images("eval/samples", images, 0)
        _save_grid(images, run_dir / "samples" / "epoch-0000.png", num_classes)

    last = config.num_epochs if stop_after is None else min(config.num_epochs, start_epoch + stop_after)
    bar = tqdm(range(start_epoch, last), disable=not progress, desc="VARD", unit="epoch")
    deterministic = schedule.deterministic.to(device)
    for epoch in bar:
        tic = time.perf_counter()
        policy.eval()
        data, rewards = collect_value_data(envs, policy, config.sample.num_batches_per_epoch, generator)
        heldout = explained_variance(value, data) if bool(value.initialized) else float("nan")
        buffer.add(data)
        steps = v.steps_per_epoch + (v.warmup_steps if epoch == 0 else 0)
        fitted = fit_value(value, value_opt, buffer.data(), steps, v.batch_size, generator, v.max_grad_norm)
        k = data.k
        starts = data.rows(
            torch.nonzero((k < schedule.num_steps) & ~deterministic[k.clamp(max=schedule.num_steps - 1)]).flatten()
        )
        logged = policy_update(policy, reference, value, policy_opt, starts, config, generator)

        stats = VardEpochStats(
            epoch=epoch,
            reward_mean=rewards.mean().item(),
            reward_std=rewards.std().item() if rewards.numel() > 1 else 0.0,
            value_loss=fitted["loss"],
            value_explained_variance=fitted["explained_variance"],
            value_heldout_explained_variance=heldout,
            objective=logged["objective"],
            value_gain=logged["value_gain"],
            kl_to_reference=logged["kl_to_reference"],
            seconds=time.perf_counter() - tic,
        )
        step = epoch + 1
        writer.add_scalar("reward/mean", stats.reward_mean, step)
        writer.add_scalar("reward/std", stats.reward_std, step)
        writer.add_scalar("value/loss", stats.value_loss, step)
        writer.add_scalar("value/explained_variance", stats.value_explained_variance, step)
        writer.add_scalar("value/heldout_explained_variance", stats.value_heldout_explained_variance, step)
        writer.add_scalar("train/objective", stats.objective, step)
        writer.add_scalar("train/value_gain", stats.value_gain, step)
        writer.add_scalar("train/kl_to_reference", stats.kl_to_reference, step)
        writer.add_scalar("time/epoch_seconds", stats.seconds, step)
        if step % config.eval.every == 0 or step == config.num_epochs:
            result.final_eval, images = evaluate()
            stats.eval_reward_mean = result.final_eval.mean
            writer.add_scalar("eval/reward_mean", stats.eval_reward_mean, step)
            writer.add_images("eval/samples", images, step)
            _save_grid(images, run_dir / "samples" / f"epoch-{step:04d}.png", num_classes)
        result.epochs.append(stats)
        bar.set_postfix(reward=f"{stats.reward_mean:.3f}", heldout_ev=f"{heldout:.2f}")

        if step % config.save_every == 0 or step == last:
            state = {
                "epoch": epoch,
                "policy_optimizer": policy_opt.state_dict(),
                "value_optimizer": value_opt.state_dict(),
                "env": envs.state_dict(),
                "generator": generator.get_state(),
                "rng": capture_rng_state(),
                "config": config.model_dump(mode="json"),
                "algo": "vard",
                "base_eval": tuple(result.base_eval) if result.base_eval is not None else None,
            }
            save_checkpoint(
                run_dir,
                epoch,
                policy.unet,
                state,
                keep=config.keep_checkpoints,
                extra_weights={"value": value.state_dict()},
                scheduler=loaded.scheduler,
            )
    writer.close()
    return result
