"""Which HRF-D difference means "reward gained by starting here"? Probe rewards R_k along the chain.

For each candidate start step index k (0 = noisiest), HRF-D noises references to k and denoises
them deterministically with a policy, then scores them: R_k. This prints R_k for the base model and
for a fine-tuned checkpoint. Under a policy fine-tuned for the reward, R_k rises as k falls (more of
the chain is under the tuned policy), so ``R_k − R_{k⁺}`` (k⁺ the next, *less* noisy candidate) is the
reward gained by starting at k — the convention of ``DynamicWindow``; the paper's ``R_t − R_{t+1}``
on its own time axis (t + 1 *noisier*) is its negative. Run::

    diffusion-gym train --config envs_configs/digits_ddpo_jpeg_compressibility.yaml --run-dir runs/ddpo-c
    python scripts/hrfd_sign_check.py --checkpoint runs/ddpo-c --reward jpeg_compressibility
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from diffusers import UNet2DModel

from agents.common.checkpoint import latest_checkpoint
from diffusion_gym.envs import DiffusionDenoiseEnv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a run directory or checkpoint of a fine-tuned model")
    parser.add_argument("--reward", default="jpeg_compressibility")
    parser.add_argument("--probe-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(2)

    found = latest_checkpoint(args.checkpoint)
    if found is None:
        raise SystemExit(f"no checkpoint found at {args.checkpoint}")
    tuned = UNet2DModel.from_pretrained(found / "unet")
    rows = {}
    for name, denoiser in (("base", None), ("fine-tuned", tuned)):
        env = DiffusionDenoiseEnv(window="hrf-d", reward=args.reward, probe_size=args.probe_size, denoiser=denoiser)
        env.reset(seed=0)
        rows[name] = env.window.last_scores
    candidates = env.window.candidates
    print(f"reward {args.reward}; R_K (references, no step) = {rows['base']['reference_reward']:.4f}")
    print("| k | " + " | ".join(str(k) for k in candidates) + " |")
    print("|---|" + "---|" * len(candidates))
    for name, scores in rows.items():
        print(f"| R_k {name} | " + " | ".join(f"{r:.4f}" for r in scores["reward"]) + " |")
    tuned_r = np.asarray(rows["fine-tuned"]["reward"])
    slope = np.polyfit(candidates, tuned_r, 1)[0]
    print(
        f"\nfine-tuned: slope of R_k over k = {slope:.2e} per step index "
        f"({'falls' if slope < 0 else 'rises'} as k grows, i.e. toward less noisy starts)"
    )


if __name__ == "__main__":
    main()
