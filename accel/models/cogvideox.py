"""A tiny CogVideoX pipeline with random weights, assembled offline from config objects (`accel.models.components`).

CogVideoX runs one stream of text tokens followed by video tokens through "expert" blocks (separate AdaLN
modulation for the two kinds of token, one joint self-attention, no cross-attention); T5 encodes the prompt, a
causal 3D VAE compresses 8x in space and 4x in time.
"""

from __future__ import annotations

from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel

from accel.models.components import LATENT_CHANNELS, seeded_module, t5_encoder, t5_tokenizer

__all__ = ["build_tiny_cogvideox"]

TEXT_DIM = 32


def build_tiny_cogvideox(seed: int = 0) -> CogVideoXPipeline:
    """CogVideoX 1.0 5B's layout: 2 blocks, 2 heads of 16 (inner dim 32), patch 2, 3D rotary position embeddings,
    a 2-layer T5 encoder, a 16-channel causal VAE (8x spatial, 4x temporal; sizes multiples of 16).

    Frames: 4k + 1 as for any 4x temporal VAE, but CogVideoX's decoder keeps the first latent frame as one frame only
    for an odd number of latent frames (k + 1), so only 8k + 1 frames come back as asked (9 -> 9, but 5 -> 8); the
    release's 49 frames are 13 latent frames. The default is 9 frames (3 latent frames).

    1.0 rather than 1.5: 1.5 adds a temporal patch of 2 (the pipeline then pads the latent frames) and learned
    positions are 2B's; 5B's rotary embeddings (head dim split 4/6/6 over time/height/width) work at any size. The
    transformer's sample size (8 x 8 latents, 9 frames) only sets the pipeline's default video (64 x 64, 9 frames)
    and the rotary grid's base. The scheduler is 5B's (CogVideoX DPM, v-prediction, zero terminal SNR, trailing
    timesteps); CogVideoXPipeline runs CFG as one transformer call on cat([uncond, cond]).
    """
    tokenizer = t5_tokenizer()
    transformer = seeded_module(
        seed,
        "transformer",
        lambda: CogVideoXTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=LATENT_CHANNELS,
            out_channels=LATENT_CHANNELS,
            time_embed_dim=32,
            text_embed_dim=TEXT_DIM,
            num_layers=2,
            sample_width=8,
            sample_height=8,
            sample_frames=9,
            patch_size=2,
            patch_size_t=None,
            temporal_compression_ratio=4,
            max_text_seq_length=226,
            use_rotary_positional_embeddings=True,
            use_learned_positional_embeddings=False,
        ),
    )
    vae = seeded_module(
        seed,
        "vae",
        lambda: AutoencoderKLCogVideoX(
            block_out_channels=(8, 16, 16, 16),
            latent_channels=LATENT_CHANNELS,
            layers_per_block=1,
            norm_num_groups=4,
            temporal_compression_ratio=4,
            sample_height=64,
            sample_width=64,
            scaling_factor=0.7,  # 5B's
        ),
    )
    scheduler = CogVideoXDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        rescale_betas_zero_snr=True,
        snr_shift_scale=1.0,
    )
    return CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=t5_encoder(seed, "text_encoder", tokenizer, TEXT_DIM),
        vae=vae,
        transformer=transformer,
        scheduler=scheduler,
    )
