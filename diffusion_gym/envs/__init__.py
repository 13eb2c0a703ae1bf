"""Gymnasium environments of diffusion-gym."""

from .denoise import DenoiseCore, DiffusionDenoiseEnv, DiffusionDenoiseVectorEnv, PendingRewards, Shard

__all__ = ["DenoiseCore", "DiffusionDenoiseEnv", "DiffusionDenoiseVectorEnv", "PendingRewards", "Shard"]
