"""Gymnasium environments of diffusion-gym."""

from .denoise import DenoiseCore, DiffusionDenoiseEnv, DiffusionDenoiseVectorEnv

__all__ = ["DenoiseCore", "DiffusionDenoiseEnv", "DiffusionDenoiseVectorEnv"]
