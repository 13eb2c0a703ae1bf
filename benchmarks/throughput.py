"""RL fine-tuning throughput: a naive diffusers loop and our path, side by side, in one process run.

Measured paths (one function each):

* ``naive_rollout`` — what a diffusers user writes: an eager fp32 loop of UNet call,
  ``DDIMScheduler.step(eta=1, variance_noise=z)`` and a separate log-prob computation (recomputing
  x̂0, σ and μ as ddpo-pytorch's ``ddim_step_with_logprob`` does), rewards after the loop.
* ``our_rollout`` — the trainer's ``Collector`` driving the core of a ``DiffusionDenoiseVectorEnv``
  with a ``DiffusionPolicy`` configured by a *variant* (bf16 autocast, channels_last, torch.compile,
  policy noise on the device, gradient checkpointing).
* ``naive_update`` — the PPO-IS update as ddpo-pytorch writes it: per denoising step, micro-batches
  of samples, eager fp32, the clipped loss of every (sample, step) pair from the separate log-prob.
* ``our_update`` — the trainer's ``ClippedUpdate`` over the rollout with the variant's policy.
* ``our_epoch`` — one whole training epoch (``agents.ppo_is.train()``, collect + advantages + update) at the
  paper's HRF settings (``envs_configs/celebahq_hrf_compressibility.yaml``; on CPU the digits HRF
  config), from ``EpochStats.seconds`` (the evaluation before it is not counted).

Figures: images/s (UNet forwards per second, images counted one by one) and trajectories/s of a
rollout (``batch`` 40-step episodes from pure noise, reward included); (sample, step) pairs/s of the
update; MFU = measured FLOPs × rate / peak (FLOPs per image from ``torch.utils.flop_counter`` on a
meta-device copy of the UNet, forward for rollouts, forward + backward for updates; peak: the bf16
dense 790 TFLOP/s of an H100/H200, ``--peak-tflops``); env overhead = 1 − UNet time / rollout time
(UNet time from CUDA events, or the host clock on CPU: everything else — policy math, noise, env
step, reward, autoreset — is overhead); peak GPU memory of each path
(``torch.cuda.max_memory_allocated``); compile + warm-up = the first, untimed batch.

Variants are ``+``-joined tokens: ``fp32`` or ``bf16`` (autocast), ``cl`` (channels_last),
``compile`` or ``compile=<mode>``, ``devnoise`` (policy noise drawn on the device), ``ckpt``
(gradient checkpointing), ``syncreward`` (the collector scores the JPEG reward on the main thread at
the end of each batch, ``Collector(overlap_rewards=False)``, instead of the trainer's default: on a
GPU, a background thread overlapping the next batch). Run::

    python benchmarks/throughput.py --device cuda                      # celebahq-256 architecture, random weights
    python benchmarks/throughput.py --device cpu --model embedded:digits
    python benchmarks/throughput.py --device cuda --variants bf16,bf16+cl+compile+devnoise --epoch-variants none

Prints a Markdown table and writes it with every raw figure to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agents.common.collector import Collector  # noqa: E402
from agents.common.micro_batch import MicroBatchSize  # noqa: E402
from agents.common.policy import DiffusionPolicy  # noqa: E402
from agents.common.rollout import Rollout  # noqa: E402
from agents.ppo_is import train  # noqa: E402
from agents.ppo_is.algorithm import ClippedUpdate  # noqa: E402
from agents.ppo_is.config import load_config  # noqa: E402
from diffusion_gym import sampling  # noqa: E402
from diffusion_gym.envs import DenoiseCore, DiffusionDenoiseVectorEnv  # noqa: E402
from diffusion_gym.models import LoadedModel, load_model  # noqa: E402
from diffusion_gym.rewards import make_reward  # noqa: E402

H100_BF16_DENSE_TFLOPS = 790.0
DEFAULT_VARIANTS = {
    "cuda": "fp32,bf16,bf16+syncreward,bf16+cl+compile+devnoise",
    "cpu": "fp32,fp32+syncreward,fp32+cl,bf16",
}
CLIP_RANGE = 1e-4
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


# ------------------------------------------------------------------------------------------------
# Variants, clocks, FLOPs
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One configuration of our path (the fields of ``agents/ppo_is/config.py`` it sets)."""

    name: str
    mixed_precision: str = "no"
    channels_last: bool = False
    compile: str = "no"
    policy_noise: str = "cpu"
    gradient_checkpointing: bool = False
    overlap_rewards: bool = True

    @classmethod
    def parse(cls, text: str) -> Variant:
        """``"bf16+cl+compile=max-autotune+devnoise+ckpt"`` → a :class:`Variant`."""
        options: dict[str, Any] = {}
        for token in text.split("+"):
            if token in ("fp32", "bf16"):
                options["mixed_precision"] = "bf16" if token == "bf16" else "no"
            elif token == "cl":
                options["channels_last"] = True
            elif token.startswith("compile"):
                options["compile"] = token.partition("=")[2] or "default"
            elif token == "devnoise":
                options["policy_noise"] = "device"
            elif token == "ckpt":
                options["gradient_checkpointing"] = True
            elif token == "syncreward":
                options["overlap_rewards"] = False
            else:
                raise ValueError(
                    f"unknown variant token {token!r} in {text!r}; "
                    "use fp32|bf16, cl, compile[=mode], devnoise, ckpt, syncreward"
                )
        return cls(name=text, **options)

    def policy(self, unet: torch.nn.Module, schedule: sampling.DenoisingSchedule) -> DiffusionPolicy:
        """Our policy over ``unet`` with this variant's options."""
        return DiffusionPolicy(
            unet,
            schedule,
            torch.bfloat16 if self.mixed_precision == "bf16" else None,
            channels_last=self.channels_last,
            compile=self.compile,
            gradient_checkpointing=self.gradient_checkpointing,
        )

    def overrides(self) -> list[str]:
        """The same options as ``--set``-style config overrides."""
        return [
            f"mixed_precision={self.mixed_precision}",
            f"channels_last={str(self.channels_last).lower()}",
            f"compile={self.compile}",
            f"policy_noise={self.policy_noise}",
            f"train.gradient_checkpointing={str(self.gradient_checkpointing).lower()}",
        ]


class Clock:
    """Sums the time spent in wrapped calls: CUDA events on a GPU (no sync per call), else the host clock."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.events: list[tuple[Any, Any]] = []
        self.host_seconds = 0.0

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` timed on every call."""

        def timed(*args: Any, **kwargs: Any) -> Any:
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn(*args, **kwargs)
                end.record()
                self.events.append((start, end))
                return out
            tic = time.perf_counter()
            out = fn(*args, **kwargs)
            self.host_seconds += time.perf_counter() - tic
            return out

        return timed

    def seconds(self) -> float:
        """Total time inside the wrapped calls (synchronises once)."""
        if self.cuda:
            torch.cuda.synchronize()
            return sum(s.elapsed_time(e) for s, e in self.events) / 1000
        return self.host_seconds


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (timing boundaries only)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory window."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float | None:
    """Peak allocated GPU memory since :func:`reset_peak`, GiB (None on CPU)."""
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def measure_flops(unet: torch.nn.Module) -> tuple[float, float]:
    """FLOPs per image of one UNet forward and of one forward + backward, counted on a meta-device copy."""
    meta = copy.deepcopy(unet).to("meta").requires_grad_(True)
    config = meta.config
    x = torch.zeros(1, config.in_channels, config.sample_size, config.sample_size, device="meta")
    t = torch.tensor([500], device="meta")
    c = torch.zeros(1, dtype=torch.long, device="meta") if config.num_class_embeds else None
    with torch.no_grad(), FlopCounterMode(display=False) as forward:
        meta(x, t, class_labels=c)
    with FlopCounterMode(display=False) as both:
        meta(x, t, class_labels=c).sample.sum().backward()
    return float(forward.get_total_flops()), float(both.get_total_flops())


def _conditions(unet: torch.nn.Module, n: int, generator: torch.Generator, device: torch.device) -> torch.Tensor | None:
    classes = unet.config.num_class_embeds
    return torch.randint(0, classes, (n,), generator=generator).to(device) if classes else None


# ------------------------------------------------------------------------------------------------
# The naive baseline (diffusers style)
# ------------------------------------------------------------------------------------------------


def naive_log_prob(
    scheduler: DDIMScheduler,
    model_output: torch.Tensor,
    t: torch.Tensor,
    x: torch.Tensor,
    x_prev: torch.Tensor,
    eta: float,
) -> torch.Tensor | None:
    """``log N(x_prev; μ, σ²)`` averaged over pixels, recomputed from the scheduler's tables.

    As ddpo-pytorch's ``ddim_step_with_logprob``; ``None`` at a deterministic (σ = 0) step.
    """
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha = scheduler.alphas_cumprod[t]  # 0-dim CPU tensors times device tensors, as diffusers does
    alpha_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
    x0 = (x - (1 - alpha) ** 0.5 * model_output) / alpha**0.5
    if scheduler.config.clip_sample:
        x0 = x0.clamp(-scheduler.config.clip_sample_range, scheduler.config.clip_sample_range)
    std = eta * scheduler._get_variance(t, prev_t) ** 0.5
    if float(std) == 0:  # a host value: no device sync
        return None
    mean = alpha_prev**0.5 * x0 + (1 - alpha_prev - std**2) ** 0.5 * model_output
    per_pixel = -((x_prev - mean) ** 2) / (2 * std**2) - torch.log(std) - HALF_LOG_2PI
    return per_pixel.mean(dim=tuple(range(1, x.ndim)))


@torch.no_grad()
def naive_rollout(loaded: LoadedModel, batch: int, num_steps: int, reward: str, seed: int) -> dict[str, Any]:
    """One batch of ``batch`` trajectories, diffusers style; returns timings and the stored pairs."""
    unet, device = loaded.unet, loaded.unet.device
    scheduler = DDIMScheduler.from_config(loaded.scheduler.config)
    scheduler.set_timesteps(num_steps)
    reward_fn = make_reward(reward)
    clock = Clock(device)
    forward = clock.wrap(lambda x, t, c: unet(x, t, class_labels=c).sample)
    generator = torch.Generator().manual_seed(seed)
    config = unet.config
    shape = (batch, config.in_channels, config.sample_size, config.sample_size)
    sync(device)
    tic = time.perf_counter()
    x = torch.randn(shape, generator=generator).to(device)
    c = _conditions(unet, batch, generator, device)
    pairs = []
    for t in scheduler.timesteps:
        model_output = forward(x, t, c)
        z = torch.randn(shape, generator=generator).to(device)
        x_prev = scheduler.step(model_output, t, x, eta=1.0, variance_noise=z).prev_sample
        log_prob = naive_log_prob(scheduler, model_output, t, x, x_prev, eta=1.0)
        if log_prob is not None:
            pairs.append((t, x, x_prev, log_prob))
        x = x_prev
    sync(device)
    tic_reward = time.perf_counter()
    rewards = reward_fn(((x + 1) / 2).clamp(0, 1), c)
    sync(device)
    toc = time.perf_counter()
    return {
        "seconds": toc - tic,
        "unet_seconds": clock.seconds(),
        "reward_seconds": toc - tic_reward,
        "pairs": pairs,
        "rewards": rewards,
        "c": c,
    }


def naive_update(loaded: LoadedModel, rollout: dict[str, Any], micro_batch: int, max_pairs: int) -> dict[str, Any]:
    """The PPO-IS update, ddpo-pytorch style: per step, micro-batches of samples, fp32 eager, one AdamW step."""
    unet = loaded.unet
    scheduler = DDIMScheduler.from_config(loaded.scheduler.config)
    scheduler.set_timesteps(rollout["num_steps"])
    rewards = rollout["rewards"].float()
    advantages = ((rewards - rewards.mean()) / (rewards.std() + 1e-8)).clamp(-5, 5)
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-9)
    c = rollout["c"]
    unet.train()
    optimizer.zero_grad(set_to_none=True)
    done = 0
    sync(unet.device)
    tic = time.perf_counter()
    for t, x, x_prev, old_log_prob in rollout["pairs"]:
        for start in range(0, x.shape[0], micro_batch):
            if done >= max_pairs:
                break
            rows = slice(start, start + micro_batch)
            cond = None if c is None else c[rows]
            model_output = unet(x[rows], t, class_labels=cond).sample
            log_prob = naive_log_prob(scheduler, model_output, t, x[rows], x_prev[rows], eta=1.0)
            ratio = torch.exp(log_prob - old_log_prob[rows])
            adv = advantages[rows]
            loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - CLIP_RANGE, 1 + CLIP_RANGE)).mean()
            loss.backward()
            done += ratio.shape[0]
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 4.5)
    optimizer.step()
    sync(unet.device)
    seconds = time.perf_counter() - tic
    unet.eval()
    return {"seconds": seconds, "pairs": done}


def naive_warm_up(loaded: LoadedModel, batch: int, micro_batch: int) -> None:
    """Untimed first calls: a forward at the rollout's batch, a forward + backward at the update's.

    Kernel selection and allocator growth then stay out of the naive figures, as out of ours.
    """
    unet, device = loaded.unet, loaded.unet.device
    config = unet.config
    generator = torch.Generator().manual_seed(0)
    for n, grad in ((batch, False), (micro_batch, True)):
        x = torch.randn(n, config.in_channels, config.sample_size, config.sample_size, device=device)
        t = torch.full((n,), 500, device=device)
        with torch.set_grad_enabled(grad):
            out = unet(x, t, class_labels=_conditions(unet, n, generator, device)).sample
        if grad:
            out.sum().backward()
            unet.zero_grad(set_to_none=True)
    sync(device)


# ------------------------------------------------------------------------------------------------
# Our path (the trainer's classes)
# ------------------------------------------------------------------------------------------------


def _our_env(
    loaded: LoadedModel, policy: DiffusionPolicy, batch: int, num_steps: int, reward: str
) -> DiffusionDenoiseVectorEnv:
    """The trainers' env (as ``agents.common.collector.make_env`` builds it): a vector env over a core."""
    core = DenoiseCore(
        num_envs=batch,
        model=loaded,
        reward=reward,
        window="full",
        num_steps=num_steps,
        eta=1.0,
        denoiser=policy.denoiser(),
        device=loaded.unet.device,
    )
    envs = DiffusionDenoiseVectorEnv(core.num_envs, check_actions=False, core=core)
    envs.reset(seed=0)
    return envs


def our_rollout(
    variant: Variant, loaded: LoadedModel, batch: int, num_steps: int, reward: str, batches: int, repeats: int = 1
) -> dict[str, Any]:
    """``Collector.collect()`` of ``batches`` batches after one untimed warm-up batch (compilation happens there).

    The timed collection runs ``repeats`` times; the fastest counts.
    """
    device = loaded.unet.device
    schedule = sampling.make_schedule(loaded.scheduler, num_steps, eta=1.0, device=device)
    policy = variant.policy(loaded.unet, schedule)
    envs = _our_env(loaded, policy, batch, num_steps, reward)
    generator = torch.Generator().manual_seed(0)
    collector = Collector(envs, policy, generator, noise=variant.policy_noise, overlap_rewards=variant.overlap_rewards)
    sync(device)
    tic = time.perf_counter()
    warm = collector.collect(1)
    _ = warm.rewards  # wait for overlapped rewards
    sync(device)
    warmup = time.perf_counter() - tic
    best: dict[str, Any] = {}
    model_output = policy.model_output
    for _ in range(repeats):
        clock = Clock(device)
        policy.model_output = clock.wrap(model_output)  # the UNet call (autocast, layout, compiled forward)
        sync(device)
        tic = time.perf_counter()
        buffer = collector.collect(batches)
        _ = buffer.rewards  # the rollout ends when its rewards are in (overlapped ones included)
        sync(device)
        seconds = time.perf_counter() - tic
        if not best or seconds < best["seconds"]:
            best = {"seconds": seconds, "unet_seconds": clock.seconds(), "buffer": buffer}
    del policy.model_output
    return {**best, "warmup_seconds": warmup, "policy": policy, "repeats": repeats}


def _first_pairs(buffer: Rollout, max_pairs: int) -> Rollout:
    """A rollout with the first ``max_pairs`` (sample, step) pairs of ``buffer``, advantages set."""
    out = Rollout(buffer.layout, buffer.device)
    outcomes = buffer.trajectories()
    traj = out.start_batch(outcomes.conditions, outcomes.groups, outcomes.starts)  # the same trajectory ids
    left = max_pairs
    names = ("x", "x_next", "k", "c", "log_prob", "traj")
    for x, x_next, k, c, log_prob, ids in zip(*(buffer._steps[name] for name in names), strict=True):
        if left <= 0:
            break
        rows = slice(0, left)
        out.add(x[rows], x_next[rows], k[rows], c[rows], log_prob[rows], ids[rows])
        left -= min(left, x.shape[0])
    out.end_batch(buffer.rewards)
    rewards = buffer.rewards
    out.set_advantages(((rewards - rewards.mean()) / (rewards.std() + 1e-8)).clamp(-5, 5))
    assert traj.shape[0] == rewards.shape[0]
    return out


def our_update(
    variant: Variant,
    rollout: dict[str, Any],
    num_steps: int,
    batch: int,
    micro_batch: int,
    max_pairs: int,
    repeats: int = 1,
) -> dict[str, Any]:
    """``ClippedUpdate.update()`` over the rollout's pairs (a warm-up update of two micro-batches first, untimed).

    The timed update runs ``repeats`` times; the fastest counts.
    """
    policy: DiffusionPolicy = rollout["policy"]
    device = policy.device
    max_pairs = max(micro_batch, min(max_pairs, len(rollout["buffer"])) // micro_batch * micro_batch)
    config = load_config(
        None,
        [
            f"sample.num_steps={num_steps}",
            f"sample.num_envs={batch}",
            f"train.batch_size={micro_batch}",
            "train.learning_rate=1e-9",
        ]
        + variant.overrides(),
    )
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-9)
    generator = torch.Generator().manual_seed(0)
    sync(device)
    tic = time.perf_counter()
    ClippedUpdate(policy, optimizer, config.train, generator).update(_first_pairs(rollout["buffer"], 2 * micro_batch))
    sync(device)
    warmup = time.perf_counter() - tic
    pairs = _first_pairs(rollout["buffer"], max_pairs)
    times, first_dev = [], None
    micro = MicroBatchSize(micro_batch, "--micro-batch")  # what the trainer does: halve on out-of-memory
    updater = ClippedUpdate(policy, optimizer, config.train, generator, micro_batch=micro)
    for _ in range(repeats):
        sync(device)
        tic = time.perf_counter()
        logged = updater.update(pairs)
        sync(device)
        times.append(time.perf_counter() - tic)
        first_dev = logged["first_ratio_max_dev"] if first_dev is None else first_dev
    return {
        "seconds": min(times),
        "pairs": len(pairs),
        "warmup_seconds": warmup,
        "first_ratio_max_dev": first_dev,
        "micro_batch": micro.size,
    }


def our_epoch(variant: Variant, config_path: Path, model: str, device: str, epochs: int) -> dict[str, Any]:
    """``agents.ppo_is.train()`` for ``epochs`` epochs at a shipped config's settings; each epoch's seconds."""
    overrides = [f"model={model}", f"device={device}", "eval.num_samples=8", f"num_epochs={epochs}"]
    config = load_config(config_path, overrides + variant.overrides())
    with tempfile.TemporaryDirectory() as run_dir:
        result = train(config, run_dir=run_dir, progress=False)
    return {
        "config": str(config_path.relative_to(ROOT)),
        "epoch_seconds": [e.seconds for e in result.epochs],
        "pairs": [e.num_pairs for e in result.epochs],
        "start_steps": [e.start_steps[0] for e in result.epochs],
    }


# ------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------


def guarded(device: torch.device, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one measured path with its own peak-memory window; an out-of-memory is a result, not a crash."""
    reset_peak(device)
    try:
        out = fn()
    except torch.OutOfMemoryError as error:
        out = {"error": f"OOM: {str(error).splitlines()[0][:120]}"}
    out["peak_gib"] = peak_gib(device)
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def table(rows: list[dict[str, Any]], peak_tflops: float | None) -> str:
    """The Markdown table of the measured rows."""
    mfu_head = f"MFU (of {peak_tflops:.0f} TFLOP/s)" if peak_tflops else "MFU"
    head = [
        "path", "rollout img/s", "traj/s", f"rollout {mfu_head}", "env overhead", "rollout peak GiB",
        "update pairs/s", f"update {mfu_head}", "update peak GiB", "compile + warm-up s", "× naive (rollout, update)",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        r, u = row["rollout"], row["update"]
        warm = None if "warmup_seconds" not in r else r["warmup_seconds"] + u.get("warmup_seconds", 0.0)
        cells = [
            row["path"],
            r.get("error") or _fmt(r.get("images_per_s"), ".1f"),
            _fmt(r.get("trajectories_per_s"), ".2f"),
            _fmt(r.get("mfu"), ".1%"),
            _fmt(r.get("env_overhead"), ".1%"),
            _fmt(r.get("peak_gib"), ".2f"),
            u.get("error") or _fmt(u.get("pairs_per_s"), ".1f") + _shrunk(u, row),
            _fmt(u.get("mfu"), ".1%"),
            _fmt(u.get("peak_gib"), ".2f"),
            _fmt(warm, ".1f"),
            f"{_fmt(row.get('speedup_rollout'), '.2f')}, {_fmt(row.get('speedup_update'), '.2f')}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    naive = rows[0]["rollout"]
    if naive.get("reward_seconds") is not None:
        lines += [
            "",
            f"Host reward of one batch (the naive path's, after its loop): {naive['reward_seconds']:.3f} s, "
            f"{naive['reward_seconds'] / naive['seconds']:.1%} of its rollout. On a GPU our rollouts score it on a "
            "background thread while the next batch runs (`syncreward`: on the main thread, as on a CPU).",
        ]
    return "\n".join(lines)


def _shrunk(update: dict[str, Any], row: dict[str, Any]) -> str:
    """A note when the update ran out of memory and went on at a smaller micro-batch."""
    requested = row.get("micro_batch_requested")
    used = update.get("micro_batch")
    return f" (micro-batch {used}: {requested} ran out of memory)" if used and requested and used < requested else ""


def _rates(out: dict[str, Any], work: float, flops: float, peak: float | None) -> dict[str, Any]:
    """Add the rate per second of ``work`` items, the MFU and (rollouts) the env overhead share."""
    if "error" in out:
        return out
    rate = work / out["seconds"]
    out["mfu"] = flops * rate / (peak * 1e12) if peak else None
    if "unet_seconds" in out:
        out["env_overhead"] = 1 - out["unet_seconds"] / out["seconds"]
    return out


def naive_row(loaded: LoadedModel, args: argparse.Namespace, flops: tuple[float, float], peak: float | None) -> dict:
    """The naive baseline's rollout and update figures."""
    device = loaded.unet.device

    def rollout() -> dict[str, Any]:
        runs = [naive_rollout(loaded, args.batch, args.steps, args.reward, seed=0) for _ in range(args.repeats)]
        out = min(runs, key=lambda run: run["seconds"])
        out["num_steps"] = args.steps
        out["images_per_s"] = args.batch * args.steps / out["seconds"]
        out["trajectories_per_s"] = args.batch / out["seconds"]
        return _rates(out, args.batch * args.steps, flops[0], peak)

    def update_() -> dict[str, Any]:
        runs = [naive_update(loaded, roll, args.micro_batch, args.update_pairs) for _ in range(args.repeats)]
        out = min(runs, key=lambda run: run["seconds"])
        out["pairs_per_s"] = out["pairs"] / out["seconds"]
        return _rates(out, out["pairs"], flops[1], peak)

    naive_warm_up(loaded, args.batch, args.micro_batch)
    roll = guarded(device, rollout)
    upd = guarded(device, update_) if "error" not in roll else {"error": "skipped"}
    for key in ("pairs", "rewards", "c"):
        roll.pop(key, None)
    return {"path": "naive diffusers loop, fp32 eager", "rollout": roll, "update": upd}


def variant_row(
    variant: Variant, loaded: LoadedModel, args: argparse.Namespace, flops: tuple[float, float], peak: float | None
) -> dict:
    """Our path's rollout and update figures for one variant."""
    device = loaded.unet.device
    images = args.batch * args.steps * args.batches

    def rollout() -> dict[str, Any]:
        out = our_rollout(variant, loaded, args.batch, args.steps, args.reward, args.batches, args.repeats)
        out["images_per_s"] = images / out["seconds"]
        out["trajectories_per_s"] = args.batch * args.batches / out["seconds"]
        return _rates(out, images, flops[0], peak)

    def update_() -> dict[str, Any]:
        out = our_update(variant, roll, args.steps, args.batch, args.micro_batch, args.update_pairs, args.repeats)
        out["pairs_per_s"] = out["pairs"] / out["seconds"]
        return _rates(out, out["pairs"], flops[1], peak)

    roll = guarded(device, rollout)
    upd = guarded(device, update_) if "error" not in roll else {"error": "skipped"}
    for key in ("buffer", "policy"):
        roll.pop(key, None)
    return {
        "path": f"ours: {variant.name}",
        "variant": asdict(variant),
        "rollout": roll,
        "update": upd,
        "micro_batch_requested": args.micro_batch,
    }


def fastest(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One path's row from its rounds: the fastest rollout and the fastest update (an error if all failed)."""
    row = dict(runs[0])
    for part in ("rollout", "update"):
        ok = [run[part] for run in runs if "error" not in run[part]]
        row[part] = min(ok, key=lambda out: out["seconds"]) if ok else runs[0][part]
        row[part]["repeats"] = len(runs)
    return row


def epoch_table(epochs: list[dict[str, Any]], config: Path, model: str) -> str:
    """The Markdown table of the whole-epoch measurements."""
    lines = [
        f"One training epoch at `{config.relative_to(ROOT)}` settings (`{model}`; `train()`, evaluation excluded):",
        "",
        "| variant | epoch seconds (1st, 2nd, …) | pairs per epoch | peak GiB |",
        "|---|---|---|---|",
    ]
    for e in epochs:
        seconds = ", ".join(f"{s:.1f}" for s in e.get("epoch_seconds", [])) or e.get("error", "")
        pairs = ", ".join(map(str, e.get("pairs", [])))
        lines.append(f"| {e['variant']} | {seconds} | {pairs} | {_fmt(e.get('peak_gib'), '.2f')} |")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    """Command-line options, with the device-dependent defaults filled in."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--model", default=None, help="default: random:celebahq-256 on cuda, embedded:digits on cpu")
    add("--batch", type=int, default=64, help="trajectories per rollout batch")
    add("--steps", type=int, default=40, help="denoising steps K")
    add(
        "--batches",
        type=int,
        default=2,
        help="timed rollout batches per variant (>= 2: overlapped rewards run alongside the next batch)",
    )
    add(
        "--repeats",
        type=int,
        default=None,
        help="rounds of timed runs, each path once per round; the fastest counts (cuda 1, cpu 3)",
    )
    add("--micro-batch", type=int, default=None, help="update pairs per forward/backward (cuda 16, cpu 64)")
    add("--update-pairs", type=int, default=None, help="pairs timed per update (cuda 512, cpu: all)")
    add(
        "--variants",
        default=None,
        help=f"comma-separated (cuda: {DEFAULT_VARIANTS['cuda']}; cpu: {DEFAULT_VARIANTS['cpu']})",
    )
    add(
        "--epoch-variants", default=None, help="variants timed for whole epochs (none: skip; default: as shipped, last)"
    )
    add("--epochs", type=int, default=None, help="epochs per epoch measurement (cuda 2: the 2nd is compiled; cpu 1)")
    add("--reward", default="jpeg_compressibility")
    add("--peak-tflops", type=float, default=None, help=f"MFU denominator (cuda: {H100_BF16_DENSE_TFLOPS:.0f})")
    add("--threads", type=int, default=2, help="CPU threads (cpu runs)")
    add("--out", type=Path, default=None, help="JSON output (default benchmarks/results/throughput_<device>.json)")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.model = args.model or ("random:celebahq-256" if cuda else "embedded:digits")
    args.micro_batch = args.micro_batch or (16 if cuda else 64)
    args.repeats = args.repeats or (1 if cuda else 3)
    args.update_pairs = args.update_pairs or (512 if cuda else 10**9)
    args.variants = [
        Variant.parse(v) for v in (args.variants or DEFAULT_VARIANTS["cuda" if cuda else "cpu"]).split(",")
    ]
    if args.epoch_variants == "none":
        args.epoch_variants = []
    elif args.epoch_variants:
        args.epoch_variants = [Variant.parse(v) for v in args.epoch_variants.split(",")]
    else:  # the config as shipped (bf16 for the GPU configs, fp32 for the CPU ones) and the last variant
        args.epoch_variants = list(dict.fromkeys([Variant.parse("bf16" if cuda else "fp32"), args.variants[-1]]))
    args.peak_tflops = args.peak_tflops or (H100_BF16_DENSE_TFLOPS if cuda else None)
    args.epochs = args.epochs or (2 if cuda else 1)
    paper = args.model.startswith(("random:celebahq", "google/"))
    args.epoch_config = (
        ROOT
        / "envs_configs"
        / ("celebahq_hrf_compressibility.yaml" if paper else "digits_hrf_jpeg_compressibility.yaml")
    )
    return args


def main() -> None:
    """Measure every path, print the tables, write the JSON."""
    args = parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device=device)
    flops = measure_flops(loaded.unet)
    initial = copy.deepcopy(loaded.unet.state_dict())
    machine = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(sys.argv),
        "device": torch.cuda.get_device_name(device)
        if cuda
        else f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "model": args.model,
        "params_M": sum(p.numel() for p in loaded.unet.parameters()) / 1e6,
        "gflop_forward_per_image": flops[0] / 1e9,
        "gflop_forward_backward_per_image": flops[1] / 1e9,
        "batch": args.batch,
        "steps": args.steps,
        "micro_batch": args.micro_batch,
        "repeats": args.repeats,
        "peak_tflops": args.peak_tflops,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32 if cuda else None,
        "matmul_precision": torch.get_float32_matmul_precision(),
    }
    print(json.dumps(machine, indent=1), flush=True)

    def fresh() -> LoadedModel:
        """The model with its initial weights and layout: no path sees another path's changes."""
        unet = copy.deepcopy(loaded.unet)
        unet.load_state_dict(initial)
        return LoadedModel(unet.to(memory_format=torch.contiguous_format).eval(), loaded.scheduler)

    once = argparse.Namespace(**{**vars(args), "repeats": 1})
    rounds = []
    for _ in range(args.repeats):  # every path once per round: a drifting machine speed biases none of them
        rounds.append([naive_row(fresh(), once, flops, args.peak_tflops)])
        rounds[-1] += [variant_row(variant, fresh(), once, flops, args.peak_tflops) for variant in args.variants]
    rows = [fastest([r[i] for r in rounds]) for i in range(len(rounds[0]))]
    for row in rows:
        r, u = row["rollout"], row["update"]
        print(
            f"{row['path']}: rollout {r.get('images_per_s', r.get('error'))} img/s, "
            f"update {u.get('pairs_per_s', u.get('error'))} pairs/s",
            flush=True,
        )
        if row is not rows[0]:
            base_r, base_u = rows[0]["rollout"], rows[0]["update"]
            if "images_per_s" in r and "images_per_s" in base_r:
                row["speedup_rollout"] = r["images_per_s"] / base_r["images_per_s"]
            if "pairs_per_s" in u and "pairs_per_s" in base_u:
                row["speedup_update"] = u["pairs_per_s"] / base_u["pairs_per_s"]
    epochs = []
    for variant in args.epoch_variants:
        out = guarded(device, lambda v=variant: our_epoch(v, args.epoch_config, args.model, args.device, args.epochs))
        out["variant"] = variant.name
        epochs.append(out)
        print(f"epoch {variant.name}: {out.get('epoch_seconds', out.get('error'))}", flush=True)

    text = table(rows, args.peak_tflops)
    if epochs:
        text += "\n\n" + epoch_table(epochs, args.epoch_config, args.model)
    print("\n" + text)
    out_path = args.out or ROOT / "benchmarks" / "results" / f"throughput_{device.type}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    record = {"machine": machine, "rows": rows, "epochs": epochs, "table": text}
    out_path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"\nwrote {out_path}")


if __name__ == "__main__":
    main()
