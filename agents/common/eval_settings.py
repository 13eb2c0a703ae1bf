"""How models are sampled and scored for evaluation: plain settings, importable without torch."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["EvalSettings"]


@dataclass
class EvalSettings:
    """How models are sampled and scored (identical for every model of a comparison)."""

    num_samples: int = 500
    """Images per model (the paper: 2,142 on GPU)."""
    seed: int = 2024
    """Seed of the initial and policy noise: the same for every model (paired samples)."""
    num_steps: int = 40
    """DDIM steps K."""
    eta: float = 1.0
    """DDIM eta (1.0: the stochastic policy the models were trained as)."""
    scheduler: str = "ddim"
    """Sampling scheduler: ddim or ddpm."""
    batch_size: int = 250
    """Images per sampling chain."""
    pixel_size: int = 32
    """Side the images are resized to for the pixel Vendi score."""
    is_splits: int = 10
    """Inception Score splits (torch-fidelity: 10)."""
    metric_nets: str = "auto"
    """``digits`` (embedded classifier), ``inception`` (InceptionV3 + CLIP) or ``auto`` (by image shape)."""
    rewards: list[str] = field(default_factory=lambda: ["jpeg_compressibility", "jpeg_incompressibility"])
    """Rewards computed on every sample."""
    device: str = "cpu"

    def check(self) -> None:
        """Raise ``ValueError`` naming a bad value."""
        if self.num_samples < self.is_splits:
            raise ValueError(
                f"num_samples must be >= is_splits={self.is_splits} (Inception Score splits), got {self.num_samples}"
            )
        if self.batch_size < 1 or self.num_steps < 1:
            raise ValueError(f"batch_size and num_steps must be >= 1, got {self.batch_size} and {self.num_steps}")
        if not self.rewards:
            raise ValueError("rewards must name at least one reward")
