"""Train the embedded class-conditional DDPM (``"embedded:digits"``) on scikit-learn's digits.

A diffusers ``UNet2DModel`` (≈1.1 M parameters, channels (32, 64, 64), attention at 8×8, a class
embedding for the digit 0–9) learns to predict the noise under a cosine (``squaredcos_cap_v2``)
``DDPMScheduler`` with 1,000 training steps, on all 1,797 digits upsampled to 16×16. AdamW with
warm-up and cosine decay, EMA of the weights; the EMA weights are saved as a diffusers
``DDPMPipeline`` directory (``model_index.json``, ``unet/``, ``scheduler/``, safetensors), so both
``diffusion_gym.models.load_model("embedded:digits")`` and ``DDPMPipeline.from_pretrained`` load it.

Reproducible (fixed seeds, CPU, 2 threads). About 10 minutes on 2 CPU cores::

    python scripts/train_digits_ddpm.py
    python scripts/evaluate_embedded.py     # the numbers quoted in the README
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import torch
import torch.nn.functional as F
from diffusers import DDPMPipeline, DDPMScheduler

from diffusion_gym.digits import load_digits_dataset
from diffusion_gym.models import EMBEDDED_DIR, build_architecture


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=2500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(EMBEDDED_DIR))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    images, labels = load_digits_dataset()
    images = images * 2.0 - 1.0  # the diffusion model works in [-1, 1]

    unet, scheduler = build_architecture("digits")
    assert isinstance(scheduler, DDPMScheduler)
    ema = copy.deepcopy(unet).requires_grad_(False)
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"UNet2DModel: {n_params / 1e6:.3f} M parameters")
    alphas_cumprod = scheduler.alphas_cumprod
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=1e-4)

    def lr_at(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        progress = (step - args.warmup) / max(1, args.iterations - args.warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    start = time.perf_counter()
    unet.train()
    for step in range(args.iterations):
        idx = torch.randint(0, len(images), (args.batch_size,), generator=generator)
        x0, c = images[idx], labels[idx]
        t = torch.randint(0, scheduler.config.num_train_timesteps, (args.batch_size,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(xt, t, class_labels=c).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_schedule.step()
        with torch.no_grad():
            decay = min(args.ema_decay, (1 + step) / (10 + step))
            for p_ema, p in zip(ema.parameters(), unet.parameters(), strict=True):
                p_ema.lerp_(p, 1 - decay)
        if (step + 1) % 100 == 0:
            elapsed = time.perf_counter() - start
            print(
                f"step {step + 1:5d}  loss {loss.item():.4f}  {elapsed / (step + 1):.3f} s/it  {elapsed:.0f} s",
                flush=True,
            )

    elapsed = time.perf_counter() - start
    DDPMPipeline(unet=ema.eval(), scheduler=scheduler).save_pretrained(args.out, safe_serialization=True)
    print(f"trained {args.iterations} iterations in {elapsed:.0f} s ({elapsed / 60:.1f} min); saved to {args.out}")


if __name__ == "__main__":
    main()
