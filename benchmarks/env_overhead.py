"""How much of a rollout step is *not* the UNet: the vector env's overhead on the embedded model.

Rolls out full batches through ``DiffusionDenoiseVectorEnv`` with the UNet as the DDIM policy and
times, in the same run, the UNet calls alone. The overhead share is ``1 − UNet time / total time``:
everything else — the policy math (mean, std, sampling, log-prob), the env's step, observation
copies, the batched JPEG reward and the autoreset with references — counted against the env.
Target: ≤ 10% on CPU. Run::

    python benchmarks/env_overhead.py [--num-envs 64] [--steps 40] [--batches 3] [--window hrf]
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from diffusion_gym import sampling
from diffusion_gym.envs import DiffusionDenoiseVectorEnv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-envs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--window", default="full")
    parser.add_argument("--reward", default="jpeg_compressibility")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    envs = DiffusionDenoiseVectorEnv(
        num_envs=args.num_envs,
        num_steps=args.steps,
        window=args.window,
        reward=args.reward,
        device=args.device,
        check_actions=False,
    )
    unet, schedule = envs.core.unet, envs.core.schedule
    unet_seconds = 0.0

    def timed_unet(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        nonlocal unet_seconds
        start = time.perf_counter()
        out = unet(x, t, class_labels=c).sample
        if out.is_cuda:
            torch.cuda.synchronize()
        unet_seconds += time.perf_counter() - start
        return out

    obs, info = envs.reset(seed=0)
    generator = torch.Generator().manual_seed(0)
    transitions = episodes = 0
    with torch.no_grad():
        timed_unet(obs["x_t"], obs["t"], obs["c"])  # warm-up
        unet_seconds = 0.0
        start = time.perf_counter()
        while episodes < args.batches * args.num_envs:
            k = info["step_index"]
            out = timed_unet(obs["x_t"], obs["t"], obs["c"])
            action = sampling.denoise_step(out, obs["x_t"], k, schedule, generator=generator).x_prev
            obs, reward, terminated, truncated, info = envs.step(action)
            transitions += args.num_envs
            episodes += int(terminated.sum())
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        total = time.perf_counter() - start

    overhead = 1 - unet_seconds / total
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {args.device}")
    print(f"vector env: {args.num_envs} envs × {args.steps} steps, window={args.window}, reward={args.reward}")
    print("| measure | value |\n|---|---|")
    print(f"| rollout wall time ({episodes} episodes, {transitions} transitions) | {total:.2f} s |")
    print(f"| UNet time | {unet_seconds:.2f} s |")
    print(f"| transitions / s | {transitions / total:.0f} |")
    print(f"| env overhead (everything but the UNet) | {overhead:.1%} of a rollout step |")


if __name__ == "__main__":
    main()
