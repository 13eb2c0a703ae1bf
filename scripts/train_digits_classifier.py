"""Train the embedded digit classifier (the offline stand-in for InceptionV3).

Reproducible: fixed seeds, a fixed 80/20 train/held-out split of scikit-learn's digits, CPU only.
Writes ``diffusion_gym/assets/digits-classifier/`` (``config.json`` + safetensors) and prints the
held-out accuracy. About a minute on 2 CPU cores::

    python scripts/train_digits_classifier.py
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from diffusion_gym.digits import CLASSIFIER_DIR, DigitClassifier, load_digits_dataset, split_indices


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random small affine jitter (±10° rotation, ±10% scale, ±1.5 px shift) and pixel noise."""
    b = images.shape[0]
    angle = (torch.rand(b, generator=generator) - 0.5) * math.radians(20)
    scale = 1.0 + (torch.rand(b, generator=generator) - 0.5) * 0.2
    shift = (torch.rand(b, 2, generator=generator) - 0.5) * (3.0 / images.shape[-1]) * 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")
    out = out + 0.05 * torch.randn(out.shape, generator=generator)
    return out.clamp(0.0, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(CLASSIFIER_DIR))
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    images, labels = load_digits_dataset()
    train_idx, test_idx = split_indices(len(images), test_fraction=0.2, seed=0)
    x_train, y_train = images[train_idx], labels[train_idx]
    x_test, y_test = images[test_idx], labels[test_idx]

    model = DigitClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.epochs * steps_per_epoch)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=generator)
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
            loss = F.cross_entropy(model(augment(x_train[idx], generator)), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        if (epoch + 1) % 10 == 0:
            model.eval()
            with torch.no_grad():
                acc = (model(x_test).argmax(1) == y_test).float().mean().item()
            print(f"epoch {epoch + 1:3d}  loss {loss.item():.4f}  held-out accuracy {acc:.4f}")

    model.eval()
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    model.save_pretrained(args.out)
    print(
        f"held-out accuracy {acc:.4f} on {len(x_test)} images; {time.perf_counter() - start:.0f} s; saved to {args.out}"
    )


if __name__ == "__main__":
    main()
