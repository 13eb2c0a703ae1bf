"""Model families: what the env and the agents need to know about a diffusion model, behind one interface.

=================  ==============================================================================
family             models
=================  ==============================================================================
``pixel``          ``UNet2DModel`` DDPMs in pixel space, conditioned on class ids (:class:`PixelFamily`)
``latent-text``    Stable Diffusion 1.x/2.x and SDXL: ``UNet2DConditionModel`` + ``AutoencoderKL`` + CLIP
                   text encoder(s) (:class:`LatentTextFamily`)
``flow-text``      Stable Diffusion 3 / 3.5: ``SD3Transformer2DModel`` + ``AutoencoderKL`` + two CLIP
                   encoders (+ optional T5), a flow-matching scheduler (:class:`FlowTextFamily`)
``flux``           FLUX.1: ``FluxTransformer2DModel`` over packed latents + ``AutoencoderKL`` + CLIP (pooled)
                   and T5 encoders, a guidance embedding, FLUX's shifted flow schedule (:class:`FluxFamily`)
=================  ==============================================================================

:func:`load_family` turns a model spec into its family; :class:`ModelFamily` is the interface and
:class:`Conditioning` the encoded conditions every family hands its denoiser. The policy math stays
in :mod:`diffusion_gym.sampling`: a step is ``sampling.denoise_step(family.model_output(x, t, cond, g), x, k,
schedule)`` with ``schedule = sampling.make_schedule(family.scheduler, K, eta)``.
"""

from diffusion_gym.families.base import Conditioning, ModelFamily
from diffusion_gym.families.flow_text import FlowTextFamily
from diffusion_gym.families.flux import FluxFamily
from diffusion_gym.families.latent_text import LatentTextFamily
from diffusion_gym.families.loading import load_family
from diffusion_gym.families.pixel import PixelFamily

__all__ = [
    "Conditioning",
    "FlowTextFamily",
    "FluxFamily",
    "LatentTextFamily",
    "ModelFamily",
    "PixelFamily",
    "load_family",
]
