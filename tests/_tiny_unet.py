"""A tiny unconditional diffusers UNet (8×8, one channel) for tests that need any UNet, fast."""

from __future__ import annotations

import torch
from diffusers import UNet2DModel

TINY_UNET = dict(
    sample_size=8,
    in_channels=1,
    out_channels=1,
    block_out_channels=(8, 16),
    norm_num_groups=4,
    layers_per_block=1,
    down_block_types=("DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D"),
)
"""Its ``UNet2DModel`` config (no class embedding)."""


def tiny_unet(seed: int = 0) -> UNet2DModel:
    """The tiny UNet with weights drawn from ``seed``."""
    torch.manual_seed(seed)
    return UNet2DModel(**TINY_UNET)
