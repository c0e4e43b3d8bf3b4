"""Qwen-Image and Qwen-Image-Edit-Plus with random weights, assembled offline from config objects.

Qwen-Image is an MMDiT: dual-stream blocks over text and image tokens with 3-axis RoPE (frame, height, width;
text tokens continue the diagonal after the image), a Qwen2.5-VL text encoder (last hidden state, the template's
system prompt dropped) and a causal 3D VAE used on single frames. Qwen-Image-Edit-Plus is the same transformer,
VAE and text encoder in `QwenImageEditPlusPipeline`, which also shows the input image to Qwen2.5-VL's vision tower
(through a `Qwen2VLProcessor`) and appends its VAE latents to the image tokens.

`Qwen2VLProcessor` can only be built with torchvision installed (transformers checks its video-processor slot
against a class that needs torchvision), so `build_tiny_qwen_image_edit` raises a clear ImportError without it.

Same seed, same weights (`accel.models.components.seeded_module`); the two builders share every component for a
seed. Names and defaults in `accel.models.registry`.
"""

from __future__ import annotations

from typing import Any

from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    QwenImageEditPlusPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from transformers.utils import is_torchvision_available

from accel.models.components import LATENT_CHANNELS, seeded_module
from accel.models.text_encoders import qwen2_5_vl_encoder, qwen2_tokenizer, qwen2_vl_processor

__all__ = ["build_tiny_qwen_image", "build_tiny_qwen_image_edit"]


def _scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Qwen-Image's scheduler config: exponential time shift with ``mu`` from the image sequence length (256 to
    8192 tokens map to shifts 0.5 to 0.9), and sigmas stretched to end at 0.02."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )


def _components(seed: int) -> dict[str, Any]:
    """The components both pipelines share (all but the edit pipeline's processor)."""
    tokenizer = qwen2_tokenizer()
    hidden = 32
    transformer = seeded_module(
        seed,
        "transformer",
        lambda: QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=4 * LATENT_CHANNELS,
            out_channels=LATENT_CHANNELS,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=4,
            joint_attention_dim=hidden,
            guidance_embeds=False,
            axes_dims_rope=(4, 6, 6),
        ),
    )
    vae = seeded_module(
        seed,
        "vae",
        lambda: AutoencoderKLQwenImage(
            base_dim=4,
            z_dim=LATENT_CHANNELS,
            dim_mult=[1, 2, 2, 2],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        ),
    )
    return {
        "scheduler": _scheduler(),
        "vae": vae,
        "text_encoder": qwen2_5_vl_encoder(seed, "text_encoder", tokenizer, hidden=hidden, layers=2),
        "tokenizer": tokenizer,
        "transformer": transformer,
    }


def build_tiny_qwen_image(seed: int = 0) -> QwenImagePipeline:
    """Qwen-Image: 2 dual-stream blocks, 4 heads of 16 (inner dim 64), patch 2.

    - transformer: RoPE axes (4, 6, 6) summing to the head size (released: 16, 56, 56 of 128), no guidance
      embedding (as released: CFG is "true CFG", ``true_cfg_scale`` > 1 with a ``negative_prompt``, run as separate
      "cond" and "uncond" passes);
    - text encoder: `Qwen2_5_VLForConditionalGeneration`, a 2-layer decoder 32 wide (the transformer's text
      width) with a 2-block vision tower, unused here;
    - VAE: `AutoencoderKLQwenImage`, 4 base channels (the edit pipeline encodes its input at about 1024x1024
      whatever the output size, where the full-resolution convolutions dominate), then 8; three 2x downsamplings
      (factor 8: image sizes are multiples of 16), the released latent mean/std normalisation;
    - scheduler: Qwen-Image's (see `_scheduler`).
    """
    return QwenImagePipeline(**_components(seed))


def build_tiny_qwen_image_edit(seed: int = 0) -> QwenImageEditPlusPipeline:
    """Qwen-Image-Edit-Plus (2509): `build_tiny_qwen_image`'s components for the same seed, plus a
    `Qwen2VLProcessor` whose image processor caps each condition image at 112x112 pixels (16 image tokens for the
    vision tower). The pipeline still VAE-encodes the input image at about 1024x1024, as released.

    Raises ImportError without torchvision (see the module docstring).
    """
    if not is_torchvision_available():
        raise ImportError(
            "tiny-qwen-image-edit needs torchvision: transformers builds Qwen2VLProcessor (the pipeline's processor) "
            "only with torchvision installed"
        )
    components = _components(seed)
    return QwenImageEditPlusPipeline(processor=qwen2_vl_processor(components["tokenizer"]), **components)
