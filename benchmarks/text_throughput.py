r"""Text-to-image rollout throughput: a naive diffusers Stable Diffusion loop and our path, in one process run.

Measured paths (the same batch, steps, guidance, prompts and reward):

* ``naive`` — what a ddpo-pytorch user runs: ``StableDiffusionPipeline``'s components driven by hand
  as ddpo-pytorch's ``pipeline_with_logprob`` does: ``pipe.encode_prompt`` (with the negative branch)
  for every batch, per step the UNet on ``[uncond, cond]``, guidance, ``DDIMScheduler.step(eta=1,
  variance_noise=z)`` and a separate log-prob computation (x̂0, σ and μ recomputed from the
  scheduler's tables), then the VAE decode and the reward after the loop.
* ``ours`` — the trainers' ``Collector`` driving the text env's core with a ``DiffusionPolicy``
  (prompt embeddings cached per prompt, the log-prob from the same step's mean, the reward of the
  decoded images overlapped with the next batch on a GPU).

Figures: trajectories/s (whole episodes, reward included) and the ratio ours / naive, each the
fastest of ``--repeats`` timed runs after one untimed warm-up batch. Run::

    python benchmarks/text_throughput.py --device cpu                         # random:sd-tiny
    python benchmarks/text_throughput.py --device cuda --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --batch 8 --steps 50 --dtype bf16

Prints a Markdown table and writes it with the raw figures to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agents.common.collector import Collector  # noqa: E402
from agents.common.policy import DiffusionPolicy  # noqa: E402
from benchmarks.throughput import naive_log_prob, sync  # noqa: E402
from diffusion_gym.envs import DenoiseCore, DiffusionDenoiseVectorEnv  # noqa: E402
from diffusion_gym.families import LatentTextFamily, load_family  # noqa: E402
from diffusion_gym.prompts import ANIMALS  # noqa: E402
from diffusion_gym.rewards import make_reward  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def naive_batch(pipe: Any, family: LatentTextFamily, prompts: list[str], args: argparse.Namespace, seed: int) -> None:
    """One batch of trajectories with log-probs and rewards, the ddpo-pytorch way (SD 1.x components)."""
    device, dtype = family.device, family.dtype
    scheduler = pipe.scheduler
    scheduler.set_timesteps(args.steps)
    generator = torch.Generator().manual_seed(seed)
    embeds, negative = pipe.encode_prompt(prompts, device, 1, True)
    text = torch.cat([negative, embeds])
    shape = (len(prompts), *family.sample_shape)
    x = torch.randn(shape, generator=generator).to(device, dtype)
    pairs = []
    for t in scheduler.timesteps:
        out = family.denoiser(torch.cat([x, x]), t, encoder_hidden_states=text).sample
        uncond, cond = out.chunk(2)
        guided = uncond + args.guidance * (cond - uncond)
        z = torch.randn(shape, generator=generator).to(device, dtype)
        x_prev = scheduler.step(guided, t, x, eta=1.0, variance_noise=z).prev_sample
        pairs.append((x, x_prev, naive_log_prob(scheduler, guided.float(), t, x.float(), x_prev.float(), eta=1.0)))
        x = x_prev
    images = pipe.vae.decode(x / pipe.vae.config.scaling_factor, return_dict=False)[0]
    rewards = args.reward_fn(((images.float() + 1) / 2).clamp(0, 1), prompts)
    _ = rewards.cpu()


def time_naive(family: LatentTextFamily, args: argparse.Namespace) -> dict[str, Any]:
    """Warm-up, then the fastest of ``repeats`` timed runs of ``batches`` naive batches."""
    pipe = family.pipeline()
    prompts = [ANIMALS[i % len(ANIMALS)] for i in range(args.batch)]
    naive_batch(pipe, family, prompts, args, seed=0)
    best = float("inf")
    for _ in range(args.repeats):
        sync(family.device)
        tic = time.perf_counter()
        for b in range(args.batches):
            naive_batch(pipe, family, prompts, args, seed=b + 1)
        sync(family.device)
        best = min(best, time.perf_counter() - tic)
    return {"seconds": best, "trajectories_per_s": args.batch * args.batches / best}


def time_ours(family: LatentTextFamily, args: argparse.Namespace) -> dict[str, Any]:
    """The trainers' collector on the text env: warm-up batch, then the fastest of ``repeats`` timed runs."""
    core = DenoiseCore(
        num_envs=args.batch,
        model=family,
        reward=args.reward_fn,
        window="full",
        num_steps=args.steps,
        eta=1.0,
        prompts=list(ANIMALS),
        guidance_scale=args.guidance,
        device=family.device,
    )
    policy = DiffusionPolicy(family, core.schedule, conditions=core.conditions, guidance_scale=args.guidance)
    core.set_denoiser(policy.denoiser())
    envs = DiffusionDenoiseVectorEnv(core.num_envs, check_actions=False, core=core)
    envs.reset(seed=0)
    collector = Collector(envs, policy, torch.Generator().manual_seed(0))
    _ = collector.collect(1).rewards
    best = float("inf")
    for _ in range(args.repeats):
        sync(family.device)
        tic = time.perf_counter()
        _ = collector.collect(args.batches).rewards
        sync(family.device)
        best = min(best, time.perf_counter() - tic)
    return {"seconds": best, "trajectories_per_s": args.batch * args.batches / best}


def parse_args() -> argparse.Namespace:
    """Command-line settings."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="random:sd-tiny", help="an SD 1.x pipeline (random:sd-tiny, a hub id)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--batch", type=int, default=16, help="trajectories per batch (both paths)")
    parser.add_argument("--batches", type=int, default=2, help="timed batches per run")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--reward", default="jpeg_compressibility")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per path; the fastest counts")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default: benchmarks/results/...)")
    return parser.parse_args()


def main() -> None:
    """Measure both paths in this process and print the table."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    args.reward_fn = make_reward(args.reward)
    family = load_family(args.model, device=args.device, dtype=DTYPES[args.dtype])
    if not isinstance(family, LatentTextFamily) or family.variant != "sd":
        raise SystemExit(f"--model must be a Stable Diffusion 1.x/2.x pipeline, got {args.model!r}")
    naive, ours = time_naive(family, args), time_ours(family, args)
    ratio = ours["trajectories_per_s"] / naive["trajectories_per_s"]
    lines = [
        f"{args.model} on {args.device} ({args.dtype}), batch {args.batch}, {args.steps} DDIM steps, guidance "
        f"{args.guidance}, reward {args.reward}",
        "",
        "| path | trajectories/s | seconds per timed run |",
        "|---|---|---|",
        f"| naive diffusers loop (ddpo-pytorch style) | {naive['trajectories_per_s']:.2f} | {naive['seconds']:.2f} |",
        f"| ours (Collector on the text env) | {ours['trajectories_per_s']:.2f} | {ours['seconds']:.2f} |",
        "",
        f"ours / naive: **{ratio:.2f}×**",
    ]
    text = "\n".join(lines)
    print(text)
    out = args.out or ROOT / "benchmarks" / "results" / f"text_throughput_{args.device.split(':')[0]}.json"
    record = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "settings": {k: v for k, v in vars(args).items() if k not in ("reward_fn", "out")},
        "naive": naive,
        "ours": ours,
        "ratio": ratio,
        "table": text,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
