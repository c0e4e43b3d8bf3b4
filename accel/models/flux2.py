"""FLUX.2 with random weights, assembled offline from config objects.

FLUX.2 [dev] encodes prompts with Mistral Small 3 through a `PixtralProcessor`, and transformers builds that
processor only with torchvision installed (the class is declared ``@requires(backends=("torchvision", "torch"))``;
the PyPI torchvision wheels do not load with the CPU build of torch used here). So ``tiny-flux2`` is FLUX.2
[klein]: the same `Flux2Transformer2DModel` (dual-stream blocks, then single-stream blocks with parallel attention
and SwiGLU, 4-axis RoPE over (t, h, w, l) position ids), the same `AutoencoderKLFlux2` (32 latent channels,
2x2-patchified and batch-normalised), but a Qwen3 text encoder and `Flux2KleinPipeline`, which runs real CFG
(separate "cond" / "uncond" transformer passes) where FLUX.2 [dev] has a guidance embedding.

Same seed, same weights (`accel.models.components.seeded_module`); names and defaults in `accel.models.registry`.
"""

from __future__ import annotations

from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel

from accel.models.components import flux_scheduler, seeded_module
from accel.models.text_encoders import qwen2_tokenizer, qwen3_encoder

__all__ = ["build_tiny_flux2", "build_tiny_flux2_klein"]

LATENT_CHANNELS = 32  # FLUX.2's VAE; the transformer sees them 2x2-patchified: 128 channels a token
TEXT_LAYERS = (9, 18, 27)  # the Qwen3 hidden states Flux2KleinPipeline stacks by default


def build_tiny_flux2_klein(seed: int = 0) -> Flux2KleinPipeline:
    """FLUX.2 [klein] (base, not step-distilled): 2 dual-stream + 2 single-stream blocks, 4 heads of 16.

    - text encoder: `Qwen3ForCausalLM`, 32 wide but 28 layers deep, because the pipeline stacks hidden states
      9, 18 and 27 by default (the released 4B model's layout), so a plain call needs them; the transformer's text
      width is 3 x 32 = 96;
    - transformer: mlp_ratio 3 and rope theta 2000 as released, RoPE axes (4, 4, 4, 4) summing to the head size,
      no guidance embedding (klein passes ``guidance=None``);
    - VAE: `AutoencoderKLFlux2`, 4 levels (factor 8, so image sizes are multiples of 16), no quant convs, its
      batch norm at identity statistics;
    - scheduler: FLUX's config (dynamic shifting; the pipeline computes ``mu`` from the image sequence length).
    """
    tokenizer = qwen2_tokenizer()
    hidden = 32
    text_encoder = qwen3_encoder(seed, "text_encoder", tokenizer, hidden=hidden, layers=max(TEXT_LAYERS) + 1)
    transformer = seeded_module(
        seed,
        "transformer",
        lambda: Flux2Transformer2DModel(
            patch_size=1,
            in_channels=4 * LATENT_CHANNELS,
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=4,
            joint_attention_dim=len(TEXT_LAYERS) * hidden,
            timestep_guidance_channels=256,
            mlp_ratio=3.0,
            axes_dims_rope=(4, 4, 4, 4),
            rope_theta=2000,
            guidance_embeds=False,
        ),
    )
    vae = seeded_module(
        seed,
        "vae",
        lambda: AutoencoderKLFlux2(
            block_out_channels=(8, 16, 16, 16),
            layers_per_block=1,
            latent_channels=LATENT_CHANNELS,
            norm_num_groups=4,
            sample_size=64,
            use_quant_conv=False,
            use_post_quant_conv=False,
            mid_block_add_attention=False,
        ),
    )
    return Flux2KleinPipeline(
        scheduler=flux_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        is_distilled=False,
    )


def build_tiny_flux2(seed: int = 0) -> Flux2KleinPipeline:
    """``tiny-flux2``: `build_tiny_flux2_klein` (see the module docstring for why not FLUX.2 [dev]'s Mistral
    pipeline); the same weights for the same seed."""
    return build_tiny_flux2_klein(seed)
