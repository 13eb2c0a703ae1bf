"""The numbers the README quotes for the embedded text-to-image model (``embedded:digits-t2i``).

On fixed noise, 8 images per prompt, a 20-step chain: prompt-following accuracy on the held-out
phrasings at guidance 1.5, 3 (the default) and 5; the training phrasings at the default; the SDE
sampler (noise level 0.7, the policy RL trains) against the ODE; within-prompt diversity; and the
data's ink margins (the hacking guards' reference). Writes ``docs/results/embedded_t2i.json``::

    python scripts/evaluate_digits_t2i.py [--model FOLDER]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from agents.prompt_following import data_ink_margins, evaluate_prompt_following
from diffusion_gym.digit_prompts import HELDOUT_PROMPTS, TRAIN_PROMPTS
from diffusion_gym.families.loading import EMBEDDED_T2I_GUIDANCE, load_embedded_t2i, load_flow_text_dir
from diffusion_gym.rewards.prompt_match import _Scorer

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    """Evaluate and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="a pipeline folder (default: the shipped model)")
    parser.add_argument("--per-prompt", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "embedded_t2i.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.model is None:
        family = load_embedded_t2i()
    else:
        family = load_flow_text_dir(
            Path(args.model), max_sequence_length=0, default_guidance_scale=EMBEDDED_T2I_GUIDANCE
        )
    scorer = _Scorer(None)
    start = time.perf_counter()

    def run(prompts: tuple[str, ...], guidance: float, eta: float = 0.0) -> dict[str, float]:
        return evaluate_prompt_following(
            family, prompts, args.per_prompt, scorer=scorer, guidance_scale=guidance, num_steps=args.steps, eta=eta
        )

    results = {f"heldout_g{g}": run(HELDOUT_PROMPTS, g) for g in (1.5, EMBEDDED_T2I_GUIDANCE, 5.0)}
    results[f"train_g{EMBEDDED_T2I_GUIDANCE}"] = run(TRAIN_PROMPTS, EMBEDDED_T2I_GUIDANCE)
    results[f"heldout_g{EMBEDDED_T2I_GUIDANCE}_sde0.7"] = run(HELDOUT_PROMPTS, EMBEDDED_T2I_GUIDANCE, eta=0.7)
    margins = data_ink_margins()
    record = {
        "command": "python scripts/evaluate_digits_t2i.py",
        "machine": f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}",
        "per_prompt": args.per_prompt,
        "steps": args.steps,
        "default_guidance": EMBEDDED_T2I_GUIDANCE,
        "data": {
            "abs_margin_mean": float(margins.abs().mean()),
            "ink_margin_p90": float(torch.quantile(margins, 0.9)),
        },
        "results": results,
        "seconds": time.perf_counter() - start,
    }
    for name, row in results.items():
        print(
            f"{name:24s} accuracy {row['accuracy']:.3f}  digit-only {row['digit_only']:.3f}  weighted "
            f"{row['weighted']:.3f}  weight {row['weight_accuracy']:.3f}  |margin| {row['abs_margin_mean']:.1f}  "
            f"vendi emb {row['vendi_embedding']:.2f}"
        )
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
