"""PPO-IS (DDPO-IS) on ``DiffusionDenoise-v0``, with HRF / HRF-D windows: the whole loop in one file.

Per epoch (= one HRF iteration):

1. **Collect** ``num_batches_per_epoch`` batches of episodes from the native vector env with the
   current UNet as the Gaussian policy (no grad); store every stochastic step
   ``(x_k, x_{k+1}, log π_old, k, c)`` on the device; rewards arrive at the last step.
2. **Advantages**: rewards standardised per group — per reference image for windowed episodes,
   per condition (tracked over epochs) from pure noise — and clipped to ``±adv_clip_max``.
3. **Update**: for each inner epoch, shuffle the (sample, step) pairs, split them into
   ``gradient_updates_per_epoch`` chunks; per chunk, accumulate the gradient of the clipped
   importance-sampling loss ``mean(max(−A·ρ, −A·clip(ρ, 1 ± ε)))`` (plus an optional KL penalty to
   the base model) over micro-batches, clip the gradient norm, take one AdamW step.
4. **Log** (TensorBoard): reward mean/std, loss, approx-KL, clip fraction, the first ratio's
   distance from 1, the start-step histogram, fixed-noise evaluation reward and image grid.
5. **Checkpoint** atomically (weights in diffusers format + optimizer, RNGs, env and window state),
   so ``resume`` continues bit-identically.
"""

from __future__ import annotations

import copy
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

from diffusion_gym import metrics, sampling
from diffusion_gym.envs import DiffusionDenoiseVectorEnv
from diffusion_gym.models import load_model

from ..common.advantages import PerConditionStatTracker, compute_advantages
from ..common.buffer import RolloutBuffer
from ..common.checkpoint import (
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from ..common.policy import DiffusionPolicy, add_lora, load_lora_state_dict, lora_state_dict, merged_copy
from .config import Config, dump_config


class TrainingDivergedError(RuntimeError):
    """The loss became NaN/Inf: training stops before any weight or checkpoint is touched."""


@dataclass
class EpochStats:
    """What one epoch logged (also returned to callers and tests)."""

    epoch: int
    reward_mean: float
    reward_std: float
    start_steps: list[int]
    loss: float
    approx_kl: float
    clipfrac: float
    first_ratio_max_dev: float
    num_pairs: int
    seconds: float
    eval_reward_mean: float | None = None


@dataclass
class TrainResult:
    """The outcome of :func:`train`."""

    run_dir: Path
    epochs: list[EpochStats] = field(default_factory=list)
    base_eval: metrics.MeanStd | None = None
    """Fixed-noise evaluation reward of the base model: mean and standard error."""
    final_eval: metrics.MeanStd | None = None
    """The same after the last evaluated epoch."""

    @property
    def base_eval_reward(self) -> float | None:
        """Mean of :attr:`base_eval`."""
        return None if self.base_eval is None else self.base_eval.mean

    @property
    def final_eval_reward(self) -> float | None:
        """Mean of :attr:`final_eval`."""
        return None if self.final_eval is None else self.final_eval.mean


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _make_env(config: Config, policy: DiffusionPolicy, loaded: Any) -> DiffusionDenoiseVectorEnv:
    s, e = config.sample, config.env
    if s.start_mode != "shared":
        raise ValueError("the PPO-IS trainer collects whole batches: sample.start_mode must be 'shared' for now")
    return DiffusionDenoiseVectorEnv(
        num_envs=s.num_envs,
        model=loaded,
        reward=e.reward,
        reward_kwargs=e.reward_kwargs,
        window=e.window if isinstance(e.window, str) else [tuple(c) for c in e.window],
        window_kwargs=e.window_kwargs,
        num_steps=s.num_steps,
        eta=s.eta,
        references=e.references,
        denoiser=policy.denoiser(),
        samples_per_reference=s.samples_per_reference,
        probe_size=e.probe_size,
        device=config.device,
        check_actions=False,
    )


def collect(
    envs: DiffusionDenoiseVectorEnv,
    policy: DiffusionPolicy,
    buffer: RolloutBuffer,
    num_batches: int,
    generator: torch.Generator,
) -> None:
    """Roll out ``num_batches`` batches of whole episodes into ``buffer`` (no grad)."""
    deterministic = policy.schedule.deterministic.cpu().numpy()  # host copy: no device sync per step
    obs, info = envs.observation()
    for _ in range(num_batches):
        traj = buffer.start_batch(obs["c"], info["group"], info["start_step"])
        rewards = None
        for _ in range(int(envs.steps_remaining().max())):
            k = info["step_index"]
            c = obs["c"] if policy.conditional else None
            z = torch.randn(obs["x_t"].shape, generator=generator).to(envs.device)
            step = policy.act(obs["x_t"], k, c, noise=z)
            k_host = int(envs.core.num_steps - envs.steps_remaining()[0])  # shared start: one step for all
            if not deterministic[k_host]:
                buffer.add(obs["x_t"], step.x_prev, k, obs["c"], step.log_prob, traj)
            obs, rewards, terminated, _, info = envs.step(step.x_prev)
        buffer.end_batch(rewards)


def _kl_to_reference(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, σ²) ‖ N(μ_ref, σ²)) averaged over pixels: ``mean((μ − μ_ref)² / 2σ²)``."""
    safe = torch.where(std == 0, torch.ones_like(std), std)
    return ((mean - ref_mean) ** 2 / (2 * safe**2)).flatten(1).mean(1)


def update(
    policy: DiffusionPolicy,
    buffer: RolloutBuffer,
    optimizer: torch.optim.Optimizer,
    config: Config,
    generator: torch.Generator,
    reference: DiffusionPolicy | None = None,
) -> dict[str, float]:
    """The PPO-IS update over the buffer; returns the logged statistics.

    Statistics stay on the device until the end; the only host sync per optimizer step is the
    finiteness check of the chunk's loss and gradient norm, made before the step.
    """
    t = config.train
    params = list(policy.trainable_parameters())
    n = len(buffer)
    stats: dict[str, list[torch.Tensor]] = {"loss": [], "approx_kl": [], "clipfrac": [], "kl_ref": []}
    first_dev: torch.Tensor | None = None
    policy.train()
    for _ in range(t.num_inner_epochs):
        order = torch.randperm(n, generator=generator)
        for chunk in order.tensor_split(t.gradient_updates_per_epoch):
            if chunk.numel() == 0:
                continue
            optimizer.zero_grad(set_to_none=True)
            chunk_loss = torch.zeros((), device=buffer.device)
            for mb in buffer.minibatches(chunk, t.batch_size):
                out = policy.evaluate(mb.x, mb.k, mb.c if policy.conditional else None, mb.x_next)
                log_ratio = out.log_prob - mb.log_prob
                ratio = torch.exp(log_ratio)
                if first_dev is None:  # the first micro-batch after the rollout: ratio should be 1
                    first_dev = (ratio.detach() - 1).abs().max()
                adv = mb.advantages
                unclipped = -adv * ratio
                clipped = -adv * torch.clamp(ratio, 1.0 - t.clip_range, 1.0 + t.clip_range)
                loss_per = torch.maximum(unclipped, clipped)
                if reference is not None and t.kl_coef > 0:
                    with torch.no_grad():
                        ref = reference.evaluate(mb.x, mb.k, mb.c if reference.conditional else None, mb.x_next)
                    kl = _kl_to_reference(out.mean, ref.mean, out.std)
                    loss_per = loss_per + t.kl_coef * kl
                    stats["kl_ref"].append(kl.detach().mean())
                loss = loss_per.sum() / chunk.numel()
                loss.backward()
                chunk_loss = chunk_loss + loss.detach()
                stats["loss"].append(loss_per.detach().mean())
                stats["approx_kl"].append(0.5 * (log_ratio.detach() ** 2).mean())
                stats["clipfrac"].append(((ratio.detach() - 1).abs() > t.clip_range).float().mean())
            grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
            if not bool(torch.isfinite(chunk_loss) & torch.isfinite(grad_norm)):
                raise TrainingDivergedError(
                    f"the PPO-IS loss is {chunk_loss.item()} and the gradient norm {grad_norm.item()} (NaN/Inf): "
                    "stopping before the optimizer step; no weights or checkpoints were changed. "
                    "Lower train.learning_rate or check the reward."
                )
            optimizer.step()
    policy.eval()
    out = {k: torch.stack(v).mean().item() if v else 0.0 for k, v in stats.items()}
    out["first_ratio_max_dev"] = float("nan") if first_dev is None else first_dev.item()
    return out


@torch.no_grad()
def evaluate_reward(
    policy: DiffusionPolicy,
    reward_fn: Callable,
    config: Config,
    sample_shape: tuple[int, ...],
    num_classes: int | None,
) -> tuple[metrics.MeanStd, torch.Tensor]:
    """Reward (mean, standard error) of ``eval.num_samples`` images from fixed noise, and the images.

    The noise is the same for every model and epoch (``eval.seed``), so evaluations are paired.
    """
    n = config.eval.num_samples
    conditions = torch.arange(n) % num_classes if num_classes else None
    images = sampling.generate(
        policy.denoiser(), policy.schedule, n, sample_shape, conditions, seed=config.eval.seed, device=config.device
    )
    images = sampling.to_unit_range(images)
    c = conditions.to(config.device) if conditions is not None else None
    rewards = reward_fn(images, c)
    return metrics.mean_and_standard_error(rewards.float().cpu()), images


def _save_grid(images: torch.Tensor, path: Path, num_classes: int | None) -> None:
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    save_image(images, tmp, nrow=num_classes or int(len(images) ** 0.5), padding=1, pad_value=0.5)
    tmp.replace(path)


def train(
    config: Config,
    *,
    run_dir: str | Path | None = None,
    resume: str | Path | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Run PPO-IS as configured.

    Args:
        config: the validated configuration.
        run_dir: where logs, samples and checkpoints go (default: ``logdir/run_name``).
        resume: a checkpoint (or run dir) to continue from, bit-identically.
        progress: show a progress bar.
        stop_after: stop after this many epochs *of this call* (tests, and "train 2, resume, train 2").

    Returns:
        The per-epoch statistics and the fixed-noise evaluation rewards before and after.
    """
    from tqdm.auto import tqdm

    name = config.run_name or time.strftime("ppo_is-%Y%m%d-%H%M%S")
    run_dir = Path(run_dir) if run_dir is not None else Path(config.logdir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(config))
    _seed_everything(config.seed)

    loaded = load_model(config.model, scheduler=config.sample.scheduler, device=config.device)
    schedule = sampling.make_schedule(
        loaded.scheduler, config.sample.num_steps, eta=config.sample.eta, device=config.device
    )
    autocast = torch.bfloat16 if config.mixed_precision == "bf16" else None
    policy = DiffusionPolicy(loaded.unet, schedule, autocast_dtype=autocast)
    reference = None
    if config.train.kl_coef > 0:
        reference = DiffusionPolicy(copy.deepcopy(loaded.unet).requires_grad_(False), schedule, autocast)
    if config.train.lora_rank > 0:
        add_lora(policy.unet, config.train.lora_rank, config.train.lora_alpha or None)
    envs = _make_env(config, policy, loaded)
    t = config.train
    optimizer = torch.optim.AdamW(
        policy.trainable_parameters(),
        lr=t.learning_rate,
        betas=(t.adam_beta1, t.adam_beta2),
        weight_decay=t.weight_decay,
        eps=t.adam_epsilon,
    )
    warmup = max(1, t.warmup_epochs)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: min(1.0, (e + 1) / warmup))
    tracker = PerConditionStatTracker(t.stat_buffer_size, t.stat_min_count)
    generator = torch.Generator().manual_seed(config.seed)
    ema = copy.deepcopy(policy.unet).requires_grad_(False) if t.ema_decay > 0 else None
    result = TrainResult(run_dir=run_dir)
    writer = SummaryWriter(str(run_dir / "tb"))
    sample_shape = envs.core.sample_shape
    num_classes = envs.core.num_classes

    start_epoch = 0
    if resume is not None:
        ckpt = load_checkpoint(latest_checkpoint(resume) or resume)
        from diffusers import UNet2DModel

        if config.train.lora_rank > 0:  # the base weights come from config.model, the adapters from here
            load_lora_state_dict(policy.unet, ckpt.extra_weights["lora"])
        else:
            policy.unet.load_state_dict(UNet2DModel.from_pretrained(ckpt.unet_dir).state_dict())
        state = ckpt.state
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
        tracker.load_state_dict(state["tracker"])
        envs.load_state_dict(state["env"])
        generator.set_state(state["generator"])
        restore_rng_state(state["rng"])
        if ema is not None and "ema" in ckpt.extra_weights:
            ema.load_state_dict(ckpt.extra_weights["ema"])
        result.base_eval = metrics.MeanStd(*state["base_eval"]) if state.get("base_eval") else None
        start_epoch = ckpt.epoch + 1
    else:
        envs.reset(seed=config.seed)
        result.base_eval, images = evaluate_reward(policy, envs.core.reward_fn, config, sample_shape, num_classes)
        writer.add_images("eval/samples", images, 0)
        writer.add_scalar("eval/reward_mean", result.base_eval.mean, 0)
        _save_grid(images, run_dir / "samples" / "epoch-0000.png", num_classes)

    last = config.num_epochs if stop_after is None else min(config.num_epochs, start_epoch + stop_after)
    bar = tqdm(range(start_epoch, last), disable=not progress, desc="PPO-IS", unit="epoch")
    for epoch in bar:
        tic = time.perf_counter()
        buffer = RolloutBuffer(config.device)
        policy.eval()
        collect(envs, policy, buffer, config.sample.num_batches_per_epoch, generator)
        rewards = buffer.rewards
        advantages = compute_advantages(
            rewards, buffer.groups, buffer.conditions, t.advantage_mode, tracker, clip=t.adv_clip_max
        )
        buffer.set_advantages(advantages)
        logged = update(policy, buffer, optimizer, config, generator, reference)
        lr_schedule.step()
        if ema is not None:
            with torch.no_grad():
                for p_ema, p in zip(ema.parameters(), policy.unet.parameters(), strict=True):
                    p_ema.lerp_(p, 1 - t.ema_decay)

        stats = EpochStats(
            epoch=epoch,
            reward_mean=rewards.mean().item(),
            reward_std=rewards.std().item() if rewards.numel() > 1 else 0.0,
            start_steps=buffer.start_steps.tolist(),
            loss=logged["loss"],
            approx_kl=logged["approx_kl"],
            clipfrac=logged["clipfrac"],
            first_ratio_max_dev=logged["first_ratio_max_dev"],
            num_pairs=len(buffer),
            seconds=time.perf_counter() - tic,
        )
        step = epoch + 1
        for key in ("reward_mean", "reward_std"):
            writer.add_scalar(f"reward/{key.split('_')[1]}", getattr(stats, key), step)
        for key in ("loss", "approx_kl", "clipfrac", "first_ratio_max_dev"):
            writer.add_scalar(f"train/{key}", getattr(stats, key), step)
        if logged["kl_ref"]:
            writer.add_scalar("train/kl_to_reference", logged["kl_ref"], step)
        writer.add_scalar("train/learning_rate", optimizer.param_groups[0]["lr"], step)
        writer.add_histogram("window/start_step", np.asarray(stats.start_steps), step)
        writer.add_scalar("time/epoch_seconds", stats.seconds, step)
        if step % config.eval.every == 0 or step == config.num_epochs:
            result.final_eval, images = evaluate_reward(policy, envs.core.reward_fn, config, sample_shape, num_classes)
            stats.eval_reward_mean = result.final_eval.mean
            writer.add_scalar("eval/reward_mean", stats.eval_reward_mean, step)
            writer.add_images("eval/samples", images, step)
            _save_grid(images, run_dir / "samples" / f"epoch-{step:04d}.png", num_classes)
        result.epochs.append(stats)
        bar.set_postfix(reward=f"{stats.reward_mean:.3f}", kl=f"{stats.approx_kl:.2e}", start=stats.start_steps[0])

        if step % config.save_every == 0 or step == last:
            state = {
                "epoch": epoch,
                "optimizer": optimizer.state_dict(),
                "lr_schedule": lr_schedule.state_dict(),
                "tracker": tracker.state_dict(),
                "env": envs.state_dict(),
                "generator": generator.get_state(),
                "rng": capture_rng_state(),
                "config": config.model_dump(mode="json"),
                "base_eval": tuple(result.base_eval) if result.base_eval is not None else None,
            }
            extra = {"ema": ema.state_dict()} if ema is not None else {}
            if config.train.lora_rank > 0:
                extra["lora"] = lora_state_dict(policy.unet)
            save_checkpoint(
                run_dir,
                epoch,
                merged_copy(policy.unet) if config.train.lora_rank > 0 else policy.unet,
                state,
                keep=config.keep_checkpoints,
                extra_weights=extra,
                scheduler=loaded.scheduler,
            )
    writer.close()
    return result
