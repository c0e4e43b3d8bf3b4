"""Z-Image with random weights, assembled offline from config objects.

Z-Image is a single-stream DiT: image tokens and caption tokens are each refined by blocks of their own (the
image's modulated by the timestep, the caption's not), then concatenated per sample as [image, caption] and run
through the main blocks; the transformer takes and returns lists of per-sample tensors. Its text encoder is Qwen3
(the second-to-last hidden state, padding dropped), its VAE FLUX.1's.

Same seed, same weights (`accel.models.components.seeded_module`); names and defaults in `accel.models.registry`.
"""

from __future__ import annotations

from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
from transformers import Qwen3Model

from accel.models.components import LATENT_CHANNELS, image_vae, seeded_module
from accel.models.text_encoders import qwen2_tokenizer, qwen3_encoder

__all__ = ["build_tiny_zimage"]


def build_tiny_zimage(seed: int = 0) -> ZImagePipeline:
    """Z-Image: 2 main blocks, 2 noise-refiner and 2 context-refiner blocks (as released), 4 heads of 16.

    - transformer: dim 64, RoPE axes (4, 6, 6) over (caption index / frame, height, width) summing to the head
      size (the released split is 32, 48, 48 of 128), patch 2; the timestep MLP keeps its fixed 1024 hidden width;
    - text encoder: `Qwen3Model` (as Z-Image ships it), 2 layers 32 wide: the pipeline reads ``hidden_states[-2]``;
    - VAE: FLUX.1's layout and scaling/shift factors (factor 8: image sizes are multiples of 16);
    - scheduler: Z-Image-Turbo's (flow matching, shift 3.0, no dynamic shifting; the pipeline's ``mu`` is unused).

    `ZImagePipeline` runs CFG whenever ``guidance_scale > 0`` (Turbo is used with 0), as one transformer call on
    the per-sample lists [cond..., uncond...].
    """
    tokenizer = qwen2_tokenizer()
    hidden = 32
    text_encoder = qwen3_encoder(seed, "text_encoder", tokenizer, hidden=hidden, layers=2, model_class=Qwen3Model)
    transformer = seeded_module(
        seed,
        "transformer",
        lambda: ZImageTransformer2DModel(
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            in_channels=LATENT_CHANNELS,
            dim=64,
            n_layers=2,
            n_refiner_layers=2,
            n_heads=4,
            n_kv_heads=4,
            cap_feat_dim=hidden,
            axes_dims=[4, 6, 6],
            axes_lens=[1024, 512, 512],
        ),
    )
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False),
        vae=image_vae(seed, scaling_factor=0.3611, shift_factor=0.1159),  # FLUX.1's VAE factors
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
