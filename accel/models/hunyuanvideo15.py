"""HunyuanVideo 1.5 with random weights, assembled offline from config objects.

HunyuanVideo 1.5 is a video MMDiT: dual-stream blocks over video tokens and one joint context of three streams,
reordered per sample as [valid image (SigLIP), valid glyph text (ByT5), valid prompt (Qwen2.5-VL), then the
padding of each]; text-to-video passes 729 all-zero image tokens, masked out. The prompt goes through a 2-layer
token refiner conditioned on the timestep; CFG is run by a `ClassifierFreeGuidance` guider as separate
"pred_cond" / "pred_uncond" passes. The VAE is causal 3D with 16x spatial and 4x temporal compression and 32
latent channels; the transformer reads [noisy latents, condition latents, condition mask] (65 channels).

Same seed, same weights (`accel.models.components.seeded_module`); names and defaults in `accel.models.registry`.
"""

from __future__ import annotations

from typing import Any

from diffusers import (
    AutoencoderKLHunyuanVideo15,
    ClassifierFreeGuidance,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideo15ImageToVideoPipeline,
    HunyuanVideo15Pipeline,
    HunyuanVideo15Transformer3DModel,
)
from transformers import ByT5Tokenizer, SiglipImageProcessorPil, SiglipVisionConfig, SiglipVisionModel

from accel.models.components import seeded_module, t5_encoder
from accel.models.text_encoders import qwen2_5_vl_text_encoder, qwen2_tokenizer

__all__ = ["build_tiny_hunyuanvideo15", "build_tiny_hunyuanvideo15_i2v"]

LATENT_CHANNELS = 32
TARGET_SIZE = 64  # pixels: the pipelines' default size (t2v when height and width are omitted, i2v always)
SIGLIP_SIZE, SIGLIP_PATCH = 384, 14  # SigLIP-so400m/14 at 384 px: the 729 image tokens the pipelines assume


def _components(seed: int, task_type: str) -> dict[str, Any]:
    tokenizer = qwen2_tokenizer()
    tokenizer_2 = ByT5Tokenizer()
    hidden, byt5_dim = 32, 32
    transformer = seeded_module(
        seed,
        "transformer",
        lambda: HunyuanVideo15Transformer3DModel(
            in_channels=2 * LATENT_CHANNELS + 1,
            out_channels=LATENT_CHANNELS,
            num_attention_heads=2,
            attention_head_dim=16,
            num_layers=2,
            num_refiner_layers=2,
            mlp_ratio=4.0,
            patch_size=1,
            patch_size_t=1,
            text_embed_dim=hidden,
            text_embed_2_dim=byt5_dim,
            image_embed_dim=32,
            rope_axes_dim=(4, 6, 6),
            target_size=TARGET_SIZE,
            task_type=task_type,
        ),
    )
    vae = seeded_module(
        seed,
        "vae",
        lambda: AutoencoderKLHunyuanVideo15(
            latent_channels=LATENT_CHANNELS,
            block_out_channels=(8, 8, 16, 16, 64),
            layers_per_block=1,
            spatial_compression_ratio=16,
            temporal_compression_ratio=4,
        ),
    )
    return {
        "text_encoder": qwen2_5_vl_text_encoder(seed, "text_encoder", tokenizer, hidden=hidden, layers=3),
        "tokenizer": tokenizer,
        "transformer": transformer,
        "vae": vae,
        "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0),
        "text_encoder_2": t5_encoder(seed, "text_encoder_2", tokenizer_2, byt5_dim),
        "tokenizer_2": tokenizer_2,
        "guider": ClassifierFreeGuidance(guidance_scale=6.0),
    }


def build_tiny_hunyuanvideo15(seed: int = 0) -> HunyuanVideo15Pipeline:
    """HunyuanVideo 1.5 text-to-video: 2 dual-stream blocks, 2 heads of 16 (inner dim 32), patch 1.

    - transformer: RoPE axes (4, 6, 6) over (frame, height, width) summing to the head size (released: 16, 56,
      56 of 128); a 2-layer token refiner as released; the ByT5 projection keeps its fixed 2048 hidden width;
      ``target_size`` 64: a call without height and width draws the 16:9 bucket around it, 48x80;
    - text encoders: `Qwen2_5_VLTextModel` (3 layers 32 wide: the pipeline reads ``hidden_states[-3]``, the
      output of the first layer) and a ByT5-style 2-layer `T5EncoderModel` over the byte-level `ByT5Tokenizer` (it encodes
      only text in quotes in the prompt, the glyph text; other prompts give zero embeddings, all masked);
    - VAE: `AutoencoderKLHunyuanVideo15`, 5 levels (8, 8, 16, 16, 64 channels), 16x spatial and 4x temporal
      compression, 32 latent channels: sizes are multiples of 16, frame counts 4k + 1;
    - scheduler: flow matching with shift 5.0; guider: CFG at scale 6.0. Set ``pipe.guider =
      pipe.guider.new(guidance_scale=1.0)`` for a single pass per step.
    """
    return HunyuanVideo15Pipeline(**_components(seed, "t2v"))


def build_tiny_hunyuanvideo15_i2v(seed: int = 0) -> HunyuanVideo15ImageToVideoPipeline:
    """HunyuanVideo 1.5 image-to-video: `build_tiny_hunyuanvideo15`'s layout (same seed, same weights for the
    shared components except the transformer, whose ``task_type`` is "i2v") plus a 1-layer SigLIP vision encoder
    at the released geometry (384 px, patch 14: 729 tokens) 32 wide, and SigLIP's PIL image processor.

    The output size is the bucket around ``target_size`` (64 px) closest to the input image's aspect ratio; the
    first frame's latents and the SigLIP tokens condition the transformer.
    """
    encoder_config = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=SIGLIP_SIZE,
        patch_size=SIGLIP_PATCH,
        attention_dropout=0.0,
    )
    feature_extractor = SiglipImageProcessorPil(
        size={"height": SIGLIP_SIZE, "width": SIGLIP_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return HunyuanVideo15ImageToVideoPipeline(
        **_components(seed, "i2v"),
        image_encoder=seeded_module(seed, "image_encoder", lambda: SiglipVisionModel(encoder_config)),
        feature_extractor=feature_extractor,
    )
