"""diffusion-gym: RL fine-tuning of diffusion models as a Gymnasium problem.

``import diffusion_gym`` registers ``DiffusionDenoise-v0``::

    import gymnasium as gym
    import diffusion_gym  # noqa: F401

    env = gym.make("DiffusionDenoise-v0", window="hrf-d", reward="jpeg_incompressibility")
    envs = gym.make_vec("DiffusionDenoise-v0", num_envs=16, vectorization_mode="vector_entry_point")

A fine-tuned checkpoint (or any diffusers UNet folder) generates in three lines::

    from diffusion_gym import ClassConditionalPipeline

    pipe = ClassConditionalPipeline.from_pretrained("runs/my_run/checkpoints/epoch-000010")
    images = pipe(class_labels=[0, 7], seed=0).images

The pipeline is imported on first use (``import diffusion_gym`` stays free of torch and diffusers).
"""

import importlib
from typing import Any

from gymnasium.envs.registration import register, registry

__version__ = "0.1.0"

ENV_ID = "DiffusionDenoise-v0"

if ENV_ID not in registry:
    register(
        id=ENV_ID,
        entry_point="diffusion_gym.envs.denoise:DiffusionDenoiseEnv",
        vector_entry_point="diffusion_gym.envs.denoise:DiffusionDenoiseVectorEnv",
    )

# Names exported lazily: attribute -> module that defines it (imported on first access).
_LAZY = {
    "ClassConditionalPipeline": "diffusion_gym.pipeline",
    "ClassConditionalPipelineOutput": "diffusion_gym.pipeline",
}

__all__ = ["ENV_ID", "ClassConditionalPipeline", "ClassConditionalPipelineOutput", "__version__"]


def __getattr__(name: str) -> Any:
    """Import the lazily exported names (the pipeline pulls in torch and diffusers) on first access."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    """The module's names, the lazy exports included."""
    return sorted({*globals(), *_LAZY})
