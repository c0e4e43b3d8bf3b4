"""Built-in pipelines with random weights, assembled offline from config objects (`accel.models.components`).

- ``tiny-flux``, ``tiny-flux-kontext``, ``tiny-wan``, ``tiny-sd3``: the smallest models that still exercise every code path of their family
  (dual + single stream blocks, CFG layouts, VAE decoding, both text encoders). For tests and for checking fidelity
  (an accelerated output against the plain output of the same seed); far too small to time.
- ``bench-flux``: a FLUX-architecture model large enough that the transformer, not Python overhead, dominates a
  call: for speed ratios on CPU.

Everything is deterministic: same seed, same weights (see `seeded_module`). A saved pipeline reloads with
`DiffusionPipeline.from_pretrained(dir, local_files_only=True)` with identical weights, configs and tokenization.
Bit-identical output after a reload needs `accel.models.pipelines.own_memory` (why: there).

Their names, descriptions and generation defaults are in `accel.models.registry`.
"""

from __future__ import annotations

from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    FluxKontextPipeline,
    FluxPipeline,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import CLIPTextModelWithProjection, UMT5EncoderModel

from accel.models.components import (
    LATENT_CHANNELS,
    clip_encoder,
    clip_tokenizer,
    flux_scheduler,
    flux_text_encoders,
    flux_transformer,
    image_vae,
    seeded_module,
    t5_encoder,
    t5_tokenizer,
)

__all__ = [
    "build_bench_flux",
    "build_tiny_flux",
    "build_tiny_flux_kontext",
    "build_tiny_sd3",
    "build_tiny_wan",
    "wan_scheduler",
    "wan_text_encoder",
    "wan_transformer",
    "wan_vae",
]


def _flux_pipeline(
    seed: int, *, heads: int, head_dim: int, dual: int, single: int, axes_dims_rope: tuple[int, int, int]
) -> FluxPipeline:
    """A FluxPipeline around a random `FluxTransformer2DModel` with tiny CLIP + T5 encoders and a tiny VAE.

    `guidance_embeds=True`, as in FLUX.1-dev (guidance-distilled): `guidance_scale` feeds the guidance embedding and
    costs nothing extra, while real CFG (`true_cfg_scale` > 1 with a `negative_prompt`) runs a second, "uncond",
    transformer pass per step.
    """
    clip_hidden, t5_dim = 32, 32
    transformer = flux_transformer(
        seed, dual=dual, single=single, heads=heads, head_dim=head_dim, text_dim=t5_dim, pooled_dim=clip_hidden,
        guidance_embeds=True, axes_dims_rope=axes_dims_rope,
    )
    return FluxPipeline(
        scheduler=flux_scheduler(),
        vae=image_vae(seed, scaling_factor=0.3611, shift_factor=0.1159),  # FLUX.1's VAE factors
        transformer=transformer,
        **flux_text_encoders(seed, clip_hidden, t5_dim),
    )


def build_tiny_flux(seed: int = 0) -> FluxPipeline:
    """FLUX, 2 dual-stream + 2 single-stream blocks, 4 heads of 16 (inner dim 64)."""
    return _flux_pipeline(seed, heads=4, head_dim=16, dual=2, single=2, axes_dims_rope=(4, 6, 6))


def build_tiny_flux_kontext(seed: int = 0) -> FluxKontextPipeline:
    """FLUX.1 Kontext (image editing): tiny-flux's components in `FluxKontextPipeline`, which appends the input
    image's latent tokens to the sequence (no image encoder: IP-Adapter is not used)."""
    return FluxKontextPipeline(**build_tiny_flux(seed).components)


def build_bench_flux(seed: int = 0) -> FluxPipeline:
    """FLUX, 4 dual + 8 single blocks, 6 heads of 64 (inner dim 384, about 40M transformer parameters).

    Text encoders and VAE stay tiny, so at 512x512 (1024 image tokens) the transformer dominates the run time.
    """
    return _flux_pipeline(seed, heads=6, head_dim=64, dual=4, single=8, axes_dims_rope=(8, 28, 28))


WAN_TEXT_DIM = 32  # the tiny UMT5 encoder's width, hence the Wan transformers' text_dim


def wan_text_encoder(seed: int) -> dict:
    """Wan's text components: the in-memory T5 tokenizer and a 2-layer UMT5 encoder; keyword arguments for Wan's
    pipelines (`tokenizer`, `text_encoder`)."""
    tokenizer = t5_tokenizer()
    text_encoder = t5_encoder(seed, "text_encoder", tokenizer, WAN_TEXT_DIM, model_class=UMT5EncoderModel)
    return {"tokenizer": tokenizer, "text_encoder": text_encoder}


def wan_vae(seed: int) -> AutoencoderKLWan:
    """Wan 2.1's causal 3D VAE shape (also Wan 2.2 A14B's): 16 latent channels, 8x spatial, 4x temporal."""
    return seeded_module(
        seed,
        "vae",
        lambda: AutoencoderKLWan(
            base_dim=8,
            z_dim=LATENT_CHANNELS,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        ),
    )


def wan_transformer(
    seed: int, component: str = "transformer", in_channels: int = LATENT_CHANNELS
) -> WanTransformer3DModel:
    """A `WanTransformer3DModel` of 2 blocks, 2 heads of 16, patch (1, 2, 2), 16 output channels; `in_channels` is
    more than the latent width for image-to-video (latents + mask + condition latents)."""
    return seeded_module(
        seed,
        component,
        lambda: WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=in_channels,
            out_channels=LATENT_CHANNELS,
            text_dim=WAN_TEXT_DIM,
            freq_dim=64,
            ffn_dim=64,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=1024,
        ),
    )


def wan_scheduler(flow_shift: float) -> UniPCMultistepScheduler:
    """The scheduler Wan's checkpoints ship: UniPC with flow sigmas, order 2; only `flow_shift` differs."""
    return UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=flow_shift,
        solver_order=2,
        lower_order_final=True,
    )


def build_tiny_wan(seed: int = 0) -> WanPipeline:
    """Wan 2.1 text-to-video: 2 blocks, 2 heads of 16, UMT5 text encoder, causal 3D VAE (8x spatial, 4x temporal).

    The scheduler is the one the released Wan 2.1 checkpoints ship (UniPC with flow sigmas, flow_shift 3.0);
    WanPipeline runs CFG as separate "cond" and "uncond" transformer passes when guidance_scale > 1.
    """
    return WanPipeline(
        **wan_text_encoder(seed), vae=wan_vae(seed), scheduler=wan_scheduler(3.0), transformer=wan_transformer(seed)
    )


def build_tiny_sd3(seed: int = 0) -> StableDiffusion3Pipeline:
    """SD3 (MMDiT): 2 joint blocks, 4 heads of 16, patch 2; two CLIP encoders with projection + T5.

    SD3 concatenates the two CLIP hidden states along features (32 + 32 = T5's width 64) and the pooled
    projections (32 + 32 = pooled dim 64); it runs CFG as one transformer pass on cat([uncond, cond]).
    """
    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    clip_hidden, t5_dim = 32, 64
    transformer = seeded_module(
        seed,
        "transformer",
        lambda: SD3Transformer2DModel(
            sample_size=16,  # latent size: the pipeline's default image is 16 * 8 = 128 px
            patch_size=2,
            in_channels=LATENT_CHANNELS,
            out_channels=LATENT_CHANNELS,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=4,
            joint_attention_dim=t5_dim,
            caption_projection_dim=64,
            pooled_projection_dim=2 * clip_hidden,
            pos_embed_max_size=64,  # latent grid up to 64 patches a side: images up to 1024 px
        ),
    )
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),  # SD3 medium's
        vae=image_vae(seed, scaling_factor=1.5305, shift_factor=0.0609),  # SD3's VAE factors
        text_encoder=clip_encoder(seed, "text_encoder", tokenizer, clip_hidden, CLIPTextModelWithProjection),
        tokenizer=tokenizer,
        text_encoder_2=clip_encoder(seed, "text_encoder_2", tokenizer_2, clip_hidden, CLIPTextModelWithProjection),
        tokenizer_2=tokenizer_2,
        text_encoder_3=t5_encoder(seed, "text_encoder_3", tokenizer_3, t5_dim),
        tokenizer_3=tokenizer_3,
    )
