"""Tiny LTX-Video pipelines with random weights, assembled offline from config objects (`accel.models.components`).

LTX-Video pairs a highly compressing causal video VAE (32x spatial, 8x temporal) with a transformer of patch size 1
whose tokens are the latent voxels themselves; T5 encodes the prompt. `build_tiny_ltx` is text-to-video
(`LTXPipeline`), `build_tiny_ltx_i2v` the same components in `LTXImageToVideoPipeline`, which encodes the input image
with the VAE into the first latent frame (no extra image encoder).
"""

from __future__ import annotations

from diffusers import (
    AutoencoderKLLTXVideo,
    FlowMatchEulerDiscreteScheduler,
    LTXImageToVideoPipeline,
    LTXPipeline,
    LTXVideoTransformer3DModel,
)

from accel.models.components import seeded_module, t5_encoder, t5_tokenizer

__all__ = ["build_tiny_ltx", "build_tiny_ltx_i2v"]

LATENT_CHANNELS = 16  # LTX-Video's VAE has 128; the width is no code path, so it is as small as the others here
TEXT_DIM = 32


def _vae(seed: int) -> AutoencoderKLLTXVideo:
    """LTX-Video 0.9.0's VAE layout, narrow: 4x4 patchify, then three blocks that each halve time, height and width
    (32x spatial, 8x temporal: frames k * 8 + 1, sizes multiples of 32), one resnet layer per block, no timestep
    conditioning (0.9.0's decoder; the pipeline then decodes without `decode_timestep`)."""
    return seeded_module(
        seed,
        "vae",
        lambda: AutoencoderKLLTXVideo(
            in_channels=3,
            out_channels=3,
            latent_channels=LATENT_CHANNELS,
            block_out_channels=(8, 16, 16, 16),
            decoder_block_out_channels=(8, 16, 16, 16),
            layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1, 1),
            spatio_temporal_scaling=(True, True, True, False),
            decoder_spatio_temporal_scaling=(True, True, True, False),
            decoder_inject_noise=(False, False, False, False, False),
            upsample_residual=(False, False, False, False),
            upsample_factor=(1, 1, 1, 1),
            timestep_conditioning=False,
            patch_size=4,
            patch_size_t=1,
            encoder_causal=True,
            decoder_causal=False,
        ),
    )


def _components(seed: int) -> dict:
    tokenizer = t5_tokenizer()
    transformer = seeded_module(
        seed,
        "transformer",
        lambda: LTXVideoTransformer3DModel(
            in_channels=LATENT_CHANNELS,
            out_channels=LATENT_CHANNELS,
            patch_size=1,
            patch_size_t=1,
            num_attention_heads=2,
            attention_head_dim=16,
            cross_attention_dim=32,
            num_layers=2,
            caption_channels=TEXT_DIM,
        ),
    )
    # LTX-Video's scheduler: the pipeline computes `mu` from the latent sequence length (base 1024, max 4096 tokens)
    # and stretches the sigmas so that the last one before zero is 0.1
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.95,
        max_shift=2.05,
        base_image_seq_len=1024,
        max_image_seq_len=4096,
        shift_terminal=0.1,
    )
    return {
        "scheduler": scheduler,
        "vae": _vae(seed),
        "text_encoder": t5_encoder(seed, "text_encoder", tokenizer, TEXT_DIM),
        "tokenizer": tokenizer,
        "transformer": transformer,
    }


def build_tiny_ltx(seed: int = 0) -> LTXPipeline:
    """LTX-Video text-to-video: 2 blocks, 2 heads of 16 (inner dim 32), a 2-layer T5 encoder, a 16-channel VAE.

    At 64x64 and 9 frames the transformer sees 2 x 2 x 2 = 8 tokens; LTXPipeline runs CFG as one transformer call on
    cat([uncond, cond]) when guidance_scale > 1.
    """
    return LTXPipeline(**_components(seed))


def build_tiny_ltx_i2v(seed: int = 0) -> LTXImageToVideoPipeline:
    """LTX-Video image-to-video: `build_tiny_ltx`'s components (same weights for the same seed) in
    `LTXImageToVideoPipeline`, which puts the image's VAE latents in the first latent frame and keeps them there."""
    return LTXImageToVideoPipeline(**_components(seed))
