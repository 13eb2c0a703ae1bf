"""Does RL with LoRA learn a prompt-dependent reward on a tiny random text-to-image model? Paired, on fixed noise.

Trains a toy config (default ``envs_configs/sd-tiny_prompt_color.yaml``: PPO-IS on ``random:sd-tiny``;
``envs_configs/sd3-tiny_grpo_prompt_color.yaml``: GRPO on the flow model ``random:sd3-tiny``), reward
``prompt_color`` (redder images for the prompt "red", bluer ones for "blue"), then evaluates the base
model and the fine-tuned one (base weights + the checkpoint's LoRA adapters) on the same fixed noise,
prompts and evaluation chain (``eval.num_steps`` / ``eval.eta``) and prints, per prompt and overall,
the paired reward gain (mean ± standard error of the per-sample differences). The README quotes its
output::

    python scripts/text_toy_check.py [--config envs_configs/....yaml] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from agents.algorithms import load_run_config, train
from agents.common.checkpoint import latest_checkpoint, load_checkpoint
from agents.common.policy import DiffusionPolicy, add_lora, load_lora_state_dict
from agents.common.runner import evaluation_schedule, fixed_noise_rewards
from agents.ppo_is.config import Config
from diffusion_gym import metrics
from diffusion_gym.envs import DenoiseCore
from diffusion_gym.families import load_family

CONFIG = Path(__file__).resolve().parents[1] / "envs_configs" / "sd-tiny_prompt_color.yaml"


def _policy(config: Config, core: DenoiseCore, lora: dict[str, torch.Tensor] | None) -> DiffusionPolicy:
    """The base model, or the base model with the run's LoRA adapters, on the run's evaluation chain."""
    s = config.sample
    family = load_family(config.model, scheduler=s.scheduler, device=config.device, resolution=s.resolution)
    if lora is not None:
        add_lora(family.denoiser, config.train.lora_rank, config.train.lora_alpha or None)
        load_lora_state_dict(family.denoiser, lora)
    schedule = evaluation_schedule(config, family) or core.schedule
    return DiffusionPolicy(family, schedule, conditions=core.conditions, guidance_scale=core.guidance_scale)


def check(
    overrides: list[str] | None = None, run_dir: Path | None = None, config_path: str | Path = CONFIG
) -> dict[str, Any]:
    """Train the toy config and return the paired evaluation: per prompt and overall gains, seconds."""
    config: Config = load_run_config(config_path, overrides or [])  # type: ignore[assignment]
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        train(config, run_dir=run_dir or Path(tmp) / "run", progress=False)
        seconds = time.perf_counter() - start
        lora = load_checkpoint(latest_checkpoint(run_dir or Path(tmp) / "run")).extra_weights["lora"]
    core = DenoiseCore(
        num_envs=1,
        model=config.model,
        reward=config.env.reward,
        num_steps=config.sample.num_steps,
        eta=config.sample.eta,
        sde_window=config.sample.sde_window,
        prompts=config.env.prompts,
        guidance_scale=config.sample.guidance_scale,
        device=config.device,
    )
    e = config.eval
    base, _ = fixed_noise_rewards(_policy(config, core, None), core, e.num_samples, e.seed, config.device)
    tuned, _ = fixed_noise_rewards(_policy(config, core, lora), core, e.num_samples, e.seed, config.device)
    ids = core.conditions.evaluation_ids(e.num_samples)
    result: dict[str, Any] = {"seconds": seconds, "prompts": {}}
    for i, prompt in enumerate(core.conditions.prompts):
        rows = ids == i
        result["prompts"][prompt] = {
            "base": metrics.mean_and_standard_error(base[rows]),
            "tuned": metrics.mean_and_standard_error(tuned[rows]),
            "gain": metrics.mean_and_standard_error(tuned[rows] - base[rows]),
        }
    result["gain"] = metrics.mean_and_standard_error(tuned - base)
    return result


def main() -> None:
    """Run the check and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(CONFIG), help="the toy config (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    result = check(args.overrides, config_path=args.config)
    print(f"training: {result['seconds']:.0f} s")
    for prompt, row in result["prompts"].items():
        b, t, g = row["base"], row["tuned"], row["gain"]
        print(f"  {prompt!r}: reward {b.mean:+.4f} -> {t.mean:+.4f}, paired gain {g.mean:+.4f} ± {g.std:.4f}")
    g = result["gain"]
    print(f"overall paired gain {g.mean:+.4f} ± {g.std:.4f} ({g.mean / g.std:+.1f} SE)")


if __name__ == "__main__":
    main()
