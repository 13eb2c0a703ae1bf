"""Gymnasium environments of diffusion-gym."""

from .denoise import DenoiseCore, DiffusionDenoiseEnv, DiffusionDenoiseVectorEnv, Shard

__all__ = ["DenoiseCore", "DiffusionDenoiseEnv", "DiffusionDenoiseVectorEnv", "Shard"]
