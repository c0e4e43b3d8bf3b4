"""A tiny PixArt-Σ pipeline with random weights, assembled offline from config objects (`accel.models.components`).

PixArt-Σ is a DiT over an SDXL-style 4-channel VAE latent: self-attention over the image tokens, cross-attention to
T5's text states, one AdaLN-single timestep modulation shared by all blocks, and a learned variance (8 output
channels: the pipeline keeps the first 4, the noise prediction).
"""

from __future__ import annotations

from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

from accel.models.components import seeded_module, t5_encoder, t5_tokenizer

__all__ = ["build_tiny_pixart"]

LATENT_CHANNELS = 4  # SDXL's VAE, which PixArt-Σ uses
TEXT_DIM = 32


def build_tiny_pixart(seed: int = 0) -> PixArtSigmaPipeline:
    """PixArt-Σ: 2 blocks, 2 heads of 16 (inner dim 32), patch 2, learned sigma; a 2-layer T5 encoder; a 4-level
    4-channel `AutoencoderKL` (8x, SDXL's scaling factor, quant convs as SDXL's; mid-block attention off as in
    `components.image_vae`).

    `sample_size` 32 (latents) is PixArt-Σ 256's: one of the four sizes for which the pipeline has resolution bins,
    so a plain call with its default `use_resolution_binning=True` works (it then denoises at the 256-px bin of the
    requested aspect ratio and resizes the result). The registry's defaults turn binning off, so that the transformer
    sees the requested size (64 x 64 -> 8 x 8 latents -> 16 tokens). The scheduler is the one PixArt-Σ ships
    (DPM-Solver++ 2M over linear betas, epsilon prediction). PixArtSigmaPipeline runs CFG as one transformer call on
    cat([uncond, cond]).
    """
    tokenizer = t5_tokenizer()
    transformer = seeded_module(
        seed,
        "transformer",
        lambda: PixArtTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=LATENT_CHANNELS,
            out_channels=2 * LATENT_CHANNELS,  # learned sigma
            num_layers=2,
            cross_attention_dim=32,
            caption_channels=TEXT_DIM,
            sample_size=32,
            patch_size=2,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
            use_additional_conditions=False,  # PixArt-Σ has no resolution / aspect-ratio embedding
        ),
    )
    vae = seeded_module(
        seed,
        "vae",
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=LATENT_CHANNELS,
            norm_num_groups=4,
            sample_size=64,
            scaling_factor=0.13025,  # SDXL's VAE
            mid_block_add_attention=False,
        ),
    )
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        timestep_spacing="linspace",
    )
    return PixArtSigmaPipeline(
        tokenizer=tokenizer,
        text_encoder=t5_encoder(seed, "text_encoder", tokenizer, TEXT_DIM),
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )
