"""Tiny Wan 2.2 A14B pipelines with random weights: two experts (mixture of experts over the noise level).

Wan 2.2 A14B is Wan 2.1's architecture twice: `transformer` (the high-noise expert) denoises every step whose
timestep t >= boundary_ratio * num_train_timesteps, `transformer_2` (the low-noise expert) the steps below; each
expert has its own CFG scale (`guidance_scale`, `guidance_scale_2`, the latter defaulting to the former). Text
encoder, tokenizer and VAE are tiny-wan's (`accel.models.tiny`); the experts are tiny-wan's transformer config built
under two component names, so their weights differ. The scheduler is Wan's UniPC with flow sigmas; its flow shift is
the reference implementation's `sample_shift` for each model (12.0 T2V, 5.0 I2V), not checked against the
Diffusers-format repositories' scheduler configs.

diffusers 0.42's `WanImageToVideoPipeline` cleans prompts with `ftfy.fix_text` without checking that ftfy is
installed (`WanPipeline` checks, and skips it): without ftfy every I2V call with a text prompt fails with a
NameError. Importing this module gives that pipeline module the same fallback as `WanPipeline`'s (no fixing) when
ftfy is missing; with ftfy installed nothing changes.
"""

from __future__ import annotations

import types

from diffusers import WanImageToVideoPipeline, WanPipeline
from diffusers.pipelines.wan import pipeline_wan_i2v
from diffusers.utils import is_ftfy_available

from accel.models.components import LATENT_CHANNELS
from accel.models.tiny import wan_scheduler, wan_text_encoder, wan_transformer, wan_vae

__all__ = ["build_tiny_wan22", "build_tiny_wan22_i2v"]

if not is_ftfy_available() and not hasattr(pipeline_wan_i2v, "ftfy"):
    pipeline_wan_i2v.ftfy = types.SimpleNamespace(fix_text=lambda text: text)  # WanPipeline's behaviour without ftfy

TEMPORAL_FACTOR = 4  # the Wan VAE's temporal compression: the I2V mask has one channel per frame it folds


def build_tiny_wan22(seed: int = 0) -> WanPipeline:
    """Wan 2.2 T2V A14B: two experts of 2 blocks, 2 heads of 16 each, boundary_ratio 0.875 as the release.

    With the scheduler's flow shift of 12.0 most steps are high-noise ones: at 2 steps both timesteps (999, 923) go
    to `transformer`, at 3 steps (999, 960, 857) the last goes to `transformer_2`, at 8 steps 6 + 2.
    """
    return WanPipeline(
        **wan_text_encoder(seed),
        vae=wan_vae(seed),
        scheduler=wan_scheduler(12.0),
        transformer=wan_transformer(seed, "transformer"),
        transformer_2=wan_transformer(seed, "transformer_2"),
        boundary_ratio=0.875,
    )


def build_tiny_wan22_i2v(seed: int = 0) -> WanImageToVideoPipeline:
    """Wan 2.2 I2V A14B: as the release, no CLIP image encoder (the image enters only as VAE latents), two experts
    of 2 blocks, 2 heads of 16, boundary_ratio 0.9, flow shift 5.0 (its sample_shift).

    The pipeline concatenates along channels the noisy latents (16), a first-frame mask (4: one per frame the VAE
    folds into a latent frame) and the VAE latents of the image followed by zero frames (16): in_channels 36.
    """
    in_channels = LATENT_CHANNELS + TEMPORAL_FACTOR + LATENT_CHANNELS
    return WanImageToVideoPipeline(
        **wan_text_encoder(seed),
        vae=wan_vae(seed),
        scheduler=wan_scheduler(5.0),
        transformer=wan_transformer(seed, "transformer", in_channels),
        transformer_2=wan_transformer(seed, "transformer_2", in_channels),
        image_encoder=None,
        image_processor=None,
        boundary_ratio=0.9,
    )
