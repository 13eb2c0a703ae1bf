"""Measure the shipped embedded models: the numbers the README quotes.

* digit classifier: accuracy on the fixed held-out 20% of scikit-learn's digits;
* digits DDPM, sampled with 40 DDIM steps at eta = 1 from fixed noise, conditioned on c = i mod 10:
  the share of samples the classifier labels as their condition, the classifier Inception Score
  (10 splits), and the pixel and embedding Vendi scores of 500 samples next to those of 500
  training images.

Writes a 10×10 grid of samples (column = digit) and a JSON of the numbers::

    python scripts/evaluate_embedded.py
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from torchvision.utils import save_image

from diffusion_gym import metrics, sampling
from diffusion_gym.digits import load_digit_classifier, load_digits_dataset, split_indices
from diffusion_gym.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eta", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", default="docs/images/digits_samples.png")
    parser.add_argument("--json", default="docs/results/embedded_models.json")
    args = parser.parse_args()
    torch.set_num_threads(2)

    classifier = load_digit_classifier()
    images, labels = load_digits_dataset()
    _, test_idx = split_indices(len(images), test_fraction=0.2, seed=0)
    held_out = metrics.classifier_outputs(classifier, images[test_idx])
    accuracy = (held_out.probs.argmax(1) == labels[test_idx]).float().mean().item()

    unet, scheduler = load_model("embedded:digits")
    schedule = sampling.make_schedule(scheduler, args.steps, eta=args.eta)
    conditions = torch.arange(args.n) % 10
    start = time.perf_counter()
    samples = sampling.generate(
        sampling.unet_denoiser(unet), schedule, args.n, (1, 16, 16), conditions, seed=args.seed, batch_size=250
    )
    sample_seconds = time.perf_counter() - start
    samples = sampling.to_unit_range(samples)
    out = metrics.classifier_outputs(classifier, samples)
    agreement = (out.probs.argmax(1) == conditions).float().mean().item()

    reference_idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))[: args.n]
    reference = metrics.classifier_outputs(classifier, images[reference_idx])
    result = {
        "command": "python scripts/evaluate_embedded.py",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "classifier_heldout_accuracy": accuracy,
        "classifier_heldout_n": len(test_idx),
        "ddpm": {
            "n": args.n,
            "steps": args.steps,
            "eta": args.eta,
            "class_agreement": agreement,
            "inception_score": metrics.inception_score(out.probs)._asdict(),
            "pixel_vendi": metrics.pixel_vendi(samples, size=None),
            "embedding_vendi": metrics.vendi_score(out.features),
            "sampling_seconds": sample_seconds,
        },
        "training_images": {
            "n": args.n,
            "inception_score": metrics.inception_score(reference.probs)._asdict(),
            "pixel_vendi": metrics.pixel_vendi(images[reference_idx], size=None),
            "embedding_vendi": metrics.vendi_score(reference.features),
        },
    }
    ratio = result["ddpm"]["pixel_vendi"] / result["training_images"]["pixel_vendi"]
    result["ddpm"]["pixel_vendi_ratio_to_training"] = ratio

    Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
    save_image(samples[:100], args.grid, nrow=10, padding=1, pad_value=0.5)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")

    d, r = result["ddpm"], result["training_images"]
    print("| measure | value |\n|---|---|")
    print(f"| classifier held-out accuracy ({len(test_idx)} images) | {accuracy:.2%} |")
    print(f"| DDPM class agreement ({args.n} samples, {args.steps} DDIM steps, eta {args.eta}) | {agreement:.2%} |")
    print(
        f"| DDPM classifier Inception Score (10 splits) | {d['inception_score']['mean']:.3f} ± "
        f"{d['inception_score']['std']:.3f} (training images: {r['inception_score']['mean']:.3f}) |"
    )
    print(
        f"| pixel Vendi, {args.n} samples / {args.n} training images | {d['pixel_vendi']:.2f} / "
        f"{r['pixel_vendi']:.2f} (ratio {ratio:.3f}) |"
    )
    print(f"| embedding Vendi, samples / training images | {d['embedding_vendi']:.2f} / {r['embedding_vendi']:.2f} |")
    print(f"| sampling time ({args.n} images × {args.steps} steps) | {sample_seconds:.1f} s |")
    print(f"\nwrote {args.grid} and {args.json}")


if __name__ == "__main__":
    main()
