"""Train the embedded text-to-image flow model (``"embedded:digits-t2i"``) on the shipped digits, with captions.

A Stable Diffusion 3-shaped pipeline, small enough for a laptop, saved as a diffusers
``StableDiffusion3Pipeline`` folder in ``diffusion_gym/assets/digits-t2i/`` so the SD3 loader path serves it:

1. **VAE** — a two-level ``AutoencoderKL`` (widths 16/32, 4 latent channels, 16×16 images → 8×8 latents) trained to
   reconstruct the digits; its ``scaling_factor`` and ``shift_factor`` make the latents zero-mean and
   unit-variance, as SD3's.
2. **Text encoders** — two two-layer ``CLIPTextModelWithProjection`` (width 32, 16 positions) reading a
   CLIP tokenizer whose byte-level BPE vocabulary this script writes with every prompt word merged
   into one token (:data:`diffusion_gym.digit_prompts.VOCABULARY`), trained with the transformer (with
   frozen random encoders the model learnt the training phrasings but generalised poorly to new ones).
3. **Transformer** — an ``SD3Transformer2DModel`` (4 joint blocks, width 64, 2×2 patches of the 8×8 latents) trained
   with the rectified-flow objective (``x_t = (1 − t)·x0 + t·ε``, velocity target ``ε − x0``, logit-normal
   ``t``), with 10% of the captions dropped to ``""`` for classifier-free guidance.

**Captions and the partial prompt following.** A caption names the digit in one of the training
phrasings (:data:`~diffusion_gym.digit_prompts.TRAIN_TEMPLATES`); 4 of the 9 phrasings also name the
stroke weight, ``bold`` or ``thin`` (the image's ink above or below its digit's median). In
``--flip`` = 33% of the weighted captions the weight word is the wrong one, so the model learns the
digit from every caption but the weight only from a two-to-one majority: it follows digit prompts
nearly always and weight prompts only partly, by design, leaving RL something to teach (as SD3.5-M
on GenEval). At 45% the model learnt no use of the weight word at all (weight right 51%, a bold and
a thin prompt on the same noise 0.5 grey levels of ink apart), and GRPO found nothing to amplify.
Fixed seeds, 2 CPU threads, 5-9 minutes on an idle machine::

    python scripts/train_digits_t2i.py
    python scripts/evaluate_digits_t2i.py      # the numbers quoted in the README
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

from diffusion_gym.digit_prompts import TRAIN_TEMPLATES, VOCABULARY, WEIGHTS, DigitPrompt
from diffusion_gym.digits import ink, ink_medians, load_digits_dataset
from diffusion_gym.families.base import Conditioning
from diffusion_gym.families.flow_text import FlowTextFamily
from diffusion_gym.families.tiny import write_tiny_clip_vocab
from diffusion_gym.models import EMBEDDED_T2I_DIR

TEXT_POSITIONS = 16
"""Token positions of the text encoders (the longest prompt is 8 tokens with its start and end)."""
SCHEDULER = {"num_train_timesteps": 1000, "shift": 1.0}
"""The pipeline's ``FlowMatchEulerDiscreteScheduler`` (no shift: 8×8 latents need none)."""


def text_side(seed: int) -> tuple[Any, list[Any]]:
    """The CLIP tokenizer over the prompt vocabulary and two frozen random projected CLIP text encoders."""
    import transformers

    with tempfile.TemporaryDirectory() as folder:
        write_tiny_clip_vocab(Path(folder), VOCABULARY)
        tokenizer = transformers.CLIPTokenizer.from_pretrained(folder, model_max_length=TEXT_POSITIONS)
    config = transformers.CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TEXT_POSITIONS,
        projection_dim=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    encoders = [transformers.CLIPTextModelWithProjection(config).eval() for _ in range(2)]
    return tokenizer, encoders


def train_vae(images: torch.Tensor, args: argparse.Namespace) -> AutoencoderKL:
    """Fit the autoencoder on images in ``[-1, 1]``; set its latent scale and shift from the data."""
    torch.manual_seed(args.seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        mid_block_add_attention=False,
    )
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    for step in range(args.vae_steps):
        batch = images[torch.randint(len(images), (args.batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        loss = F.mse_loss(recon, batch) + args.vae_kl * posterior.kl().mean() / posterior.mean[0].numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 500 == 0 or step == args.vae_steps - 1:
            print(f"  vae step {step:5d}  loss {loss.item():.5f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        means = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in images.split(256)])
    vae.register_to_config(shift_factor=float(means.mean()), scaling_factor=float(1.0 / means.std()))
    return vae


def captions(digits: torch.Tensor, bold: torch.Tensor, rng: np.random.Generator, args: argparse.Namespace) -> list[str]:
    """One training caption per image: a random phrasing, the weight word flipped in ``--flip`` of them."""
    out = []
    for digit, is_bold in zip(digits.tolist(), bold.tolist(), strict=True):
        if rng.random() < args.dropout:
            out.append("")
            continue
        template = TRAIN_TEMPLATES[rng.integers(len(TRAIN_TEMPLATES))]
        weight = WEIGHTS[0] if is_bold else WEIGHTS[1]
        if rng.random() < args.flip:
            weight = WEIGHTS[1] if is_bold else WEIGHTS[0]
        out.append(DigitPrompt(digit, weight).render(template))
    return out


def transformer_model() -> SD3Transformer2DModel:
    """Four joint blocks of width 64 over 8×8×4 latents in 2×2 patches (16 tokens), reading two CLIP encoders."""
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=4,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=64,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=8,
    )


def train_transformer(
    family: FlowTextFamily, x0: torch.Tensor, labels: torch.Tensor, bold: torch.Tensor, args: argparse.Namespace
) -> None:
    """Rectified-flow training of ``family.denoiser`` and its text encoders on latents ``x0``.

    An EMA of both is copied in at the end.
    """
    net = family.denoiser.train().requires_grad_(True)
    encoders = torch.nn.ModuleList(family.text_encoders).train().requires_grad_(True)
    trained = torch.nn.ModuleList([net, encoders])
    ema = copy.deepcopy(trained).requires_grad_(False)
    rng = np.random.default_rng(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=args.lr, weight_decay=1e-4)

    def encode(texts: list[str]) -> Conditioning:
        embeds, pooled = family.text_features(texts)
        return Conditioning(embeds=embeds, pooled=pooled)

    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(x0), (args.batch_size,), generator=generator)
        cond = encode(captions(labels[idx], bold[idx], rng, args))
        t = torch.sigmoid(torch.randn(args.batch_size, generator=generator))  # logit-normal (SD3)
        noise = torch.randn(x0[idx].shape, generator=generator)
        x_t = (1 - t.view(-1, 1, 1, 1)) * x0[idx] + t.view(-1, 1, 1, 1) * noise
        v = family.model_output(x_t, t * 1000, cond, 1.0)
        loss = F.mse_loss(v, noise - x0[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), trained.parameters(), strict=True):
                p_ema.lerp_(p, 1 - args.ema_decay)
        if step % 250 == 0 or step == args.steps - 1:
            print(f"  transformer step {step:5d}  loss {loss.item():.4f}  lr {lr:.2e}")
    trained.load_state_dict(ema.state_dict())
    trained.eval().requires_grad_(False)


def main() -> None:
    """Train the three parts and save the pipeline."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae-steps", type=int, default=600)
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--vae-kl", type=float, default=1e-3, help="weight of the KL term per latent dimension")
    parser.add_argument("--steps", type=int, default=3000, help="transformer training steps")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--flip", type=float, default=0.33, help="fraction of weighted captions with the wrong weight")
    parser.add_argument("--dropout", type=float, default=0.1, help="fraction of captions dropped to '' (for CFG)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(EMBEDDED_T2I_DIR))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    images, labels = load_digits_dataset()
    rgb = images.repeat(1, 3, 1, 1) * 2 - 1
    print(f"VAE on {len(rgb)} digits")
    vae = train_vae(rgb, args)
    tokenizer, encoders = text_side(args.seed)
    torch.manual_seed(args.seed)
    family = FlowTextFamily(
        transformer_model(),
        vae,
        encoders,
        [tokenizer, tokenizer],
        FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        max_sequence_length=0,
        resolution=(16, 16),
    )
    with torch.no_grad():
        x0 = family.encode_images(images.repeat(1, 3, 1, 1))
    print(f"transformer: {sum(p.numel() for p in family.denoiser.parameters()) / 1e6:.3f} M parameters")
    bold = ink(images) > ink_medians()[labels]
    train_transformer(family, x0, labels, bold, args)
    family.pipeline().save_pretrained(args.out, safe_serialization=True)
    print(f"saved {args.out} after {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
