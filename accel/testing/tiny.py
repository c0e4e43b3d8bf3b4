"""Built-in diffusion pipelines with random weights, assembled offline from config objects.

There are no weights and no network here, so every built-in model is a real diffusers pipeline (`FluxPipeline`,
`WanPipeline`, `StableDiffusion3Pipeline`) whose components are built from small configs with random weights:

- ``tiny-flux``, ``tiny-wan``, ``tiny-sd3``: the smallest models that still exercise every code path of their family
  (dual + single stream blocks, CFG layouts, VAE decoding, both text encoders). For tests and for checking fidelity
  (an accelerated output against the plain output of the same seed); far too small to time.
- ``bench-flux``: a FLUX-architecture model large enough that the transformer, not Python overhead, dominates a
  call: for speed ratios on CPU.

Everything is deterministic: each module is built under its own seed derived from `seed` and the component's name
(the caller's global RNG state is left untouched), in fp32 on CPU, and put in eval mode (modules built from a config
start in train mode, where T5's dropout would make outputs random; dropout is also set to 0 in the configs).

Tokenizers are built in memory and need no files: CLIP's is byte-level BPE without merges (one token per UTF-8 byte,
so any prompt works, unicode and the empty prompt included); T5's is character-level Unigram over printable ASCII
(other characters become ``<unk>``). Both save and load with `save_pretrained` / `from_pretrained`, so a saved
pipeline reloads with `DiffusionPipeline.from_pretrained(dir, local_files_only=True)` with identical weights,
configs and tokenization. T5 uses relative position buckets, so any `max_sequence_length` (FLUX's default 512
included) works.

Bit-identical output after a reload needs one more step: from_pretrained maps the safetensors file, whose tensors
are only 8-byte aligned, and on CPU MKL's matrix-vector path (a one-row input: time embeddings, AdaLN modulation
at batch 1) rounds differently on weights that are not 16-byte aligned. Copying each loaded parameter and buffer
into fresh memory (`t.data = t.data.clone()`) removes the 1-ulp differences.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLWan,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from tokenizers import pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
)

__all__ = ["BUILTIN_MODELS", "BuiltinModel", "build_pipeline"]


@dataclass(frozen=True)
class BuiltinModel:
    """A built-in model: what it is, its generation defaults, and the function that builds it.

    `pipeline_kwargs` are extra pipeline-call arguments the model wants by default (e.g. `max_sequence_length`);
    `default_fps` is the frame rate for writing videos (None for images).
    """

    name: str
    task: Literal["text-to-image", "text-to-video"]
    family: Literal["flux", "wan", "sd3"]
    description: str
    default_height: int
    default_width: int
    default_steps: int
    default_frames: int | None
    default_guidance: float
    builder: Callable[[int], DiffusionPipeline] = field(repr=False, compare=False)
    default_fps: int | None = None
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict, compare=False)


# ---------------------------------------------------------------------------------------------------------------------
# Shared helpers: seeding, tokenizers, text encoders, VAEs
# ---------------------------------------------------------------------------------------------------------------------


def _build(seed: int, component: str, make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build one module under a seed of its own, in fp32 eval mode, leaving the global RNG state as it was.

    Each component gets `crc32(f"{seed}:{component}")`, so two components with the same config (SD3's two CLIP
    encoders) still get different weights, and the weights of one component do not depend on the build order.
    """
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(zlib.crc32(f"{seed}:{component}".encode()))
            module = make()
    finally:
        torch.set_default_dtype(default_dtype)
    return module.eval()


def clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """CLIP's byte-level BPE with no merges: one token per UTF-8 byte (plus a word-final variant of each byte).

    CLIP's BPE appends ``</w>`` to the last symbol of each word, so the vocabulary holds every byte symbol both
    bare and with that suffix; nothing maps to the unknown token. Lower-cased, as CLIP's normalizer does.
    """
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    for suffix in ("", "</w>"):
        for symbol in alphabet:
            vocab[symbol + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def t5_tokenizer(model_max_length: int = 512, words: Sequence[str] = ()) -> T5Tokenizer:
    """T5's Unigram tokenizer over single printable-ASCII characters: ``<pad>``=0, ``</s>``=1, ``<unk>``=2.

    One piece per character makes the segmentation unique, hence deterministic. Byte fallback would cover unicode,
    but transformers rebuilds the tokenizer from its vocabulary on load and drops that flag, which would break the
    save/load round trip; so non-ASCII characters become ``<unk>`` (the CLIP tokenizer still sees their bytes).

    ``words``: whole-word pieces (``"\u2581red"``) scored far above any spelling of them in characters, so a known
    word is always one token and any other word still falls back to its characters (never ``<unk>``).
    """
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]  # "\u2581" marks a word start
    pieces += [(chr(c), -3.0) for c in range(33, 127)]
    pieces += [("\u2581" + w, -1.0) for w in dict.fromkeys(words)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def _clip_config(tokenizer: CLIPTokenizer, hidden: int, projection: int) -> CLIPTextConfig:
    """A 2-layer CLIP text encoder (SD3 reads the penultimate hidden state, so at least 2 layers)."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=projection,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act="gelu",
        attention_dropout=0.0,
        # pooling reads the hidden state at the first eos; ids must match the tokenizer's (eos == pad here)
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _t5_kwargs(tokenizer: T5Tokenizer, d_model: int) -> dict[str, Any]:
    """A 2-layer T5 v1.1-style encoder (gated GELU, relative position buckets: no fixed maximum length)."""
    return dict(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def image_vae(
    seed: int,
    *,
    scaling_factor: float,
    shift_factor: float,
    channels: tuple[int, ...] = (8, 16, 16, 16),
    norm_groups: int = 4,
    sample_size: int = 32,
) -> AutoencoderKL:
    """A 16-latent-channel `AutoencoderKL`, spatial factor 2 ** (levels - 1); by default 4 levels (factor 8, as
    FLUX's and SD3's), about 85k parameters.

    Like FLUX's VAE it has no quant convs; the mid-block attention is off so that decoding 512x512 stays cheap.
    """
    return _build(
        seed,
        "vae",
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(channels),
            up_block_types=("UpDecoderBlock2D",) * len(channels),
            block_out_channels=channels,
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=norm_groups,
            sample_size=sample_size,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            use_quant_conv=False,
            use_post_quant_conv=False,
            mid_block_add_attention=False,
        ),
    )


def _flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1's scheduler config. Diffusers' default `FlowMatchEulerDiscreteScheduler()` has dynamic shifting off;
    FluxPipeline computes `mu` from the image sequence length with these base/max values and passes it on."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Builders: one per model
# ---------------------------------------------------------------------------------------------------------------------


def _flux_pipeline(
    seed: int, *, heads: int, head_dim: int, dual: int, single: int, axes_dims_rope: tuple[int, int, int]
) -> FluxPipeline:
    """A FluxPipeline around a random `FluxTransformer2DModel` with tiny CLIP + T5 encoders and a tiny VAE.

    `guidance_embeds=True`, as in FLUX.1-dev (guidance-distilled): `guidance_scale` feeds the guidance embedding and
    costs nothing extra, while real CFG (`true_cfg_scale` > 1 with a `negative_prompt`) runs a second, "uncond",
    transformer pass per step.
    """
    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    clip_hidden, t5_dim = 32, 32
    text_encoder = _build(
        seed, "text_encoder", lambda: CLIPTextModel(_clip_config(tokenizer, clip_hidden, clip_hidden))
    )
    text_encoder_2 = _build(seed, "text_encoder_2", lambda: T5EncoderModel(T5Config(**_t5_kwargs(tokenizer_2, t5_dim))))
    transformer = _build(
        seed,
        "transformer",
        lambda: FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,  # 16 latent channels packed 2x2
            num_layers=dual,
            num_single_layers=single,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=t5_dim,
            pooled_projection_dim=clip_hidden,  # FluxPipeline pools CLIPTextModel's pooler_output (hidden size)
            guidance_embeds=True,
            axes_dims_rope=axes_dims_rope,
        ),
    )
    return FluxPipeline(
        scheduler=_flux_scheduler(),
        vae=image_vae(seed, scaling_factor=0.3611, shift_factor=0.1159),  # FLUX.1's VAE factors
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def build_tiny_flux(seed: int = 0) -> FluxPipeline:
    """FLUX, 2 dual-stream + 2 single-stream blocks, 4 heads of 16 (inner dim 64)."""
    return _flux_pipeline(seed, heads=4, head_dim=16, dual=2, single=2, axes_dims_rope=(4, 6, 6))


def build_bench_flux(seed: int = 0) -> FluxPipeline:
    """FLUX, 4 dual + 8 single blocks, 6 heads of 64 (inner dim 384, about 40M transformer parameters).

    Text encoders and VAE stay tiny, so at 512x512 (1024 image tokens) the transformer dominates the run time.
    """
    return _flux_pipeline(seed, heads=6, head_dim=64, dual=4, single=8, axes_dims_rope=(8, 28, 28))


def build_tiny_wan(seed: int = 0) -> WanPipeline:
    """Wan 2.1 text-to-video: 2 blocks, 2 heads of 16, UMT5 text encoder, causal 3D VAE (8x spatial, 4x temporal).

    The scheduler is the one the released Wan 2.1 checkpoints ship (UniPC with flow sigmas, flow_shift 3.0);
    WanPipeline runs CFG as separate "cond" and "uncond" transformer passes when guidance_scale > 1.
    """
    tokenizer = t5_tokenizer()
    text_dim = 32
    text_encoder = _build(seed, "text_encoder", lambda: UMT5EncoderModel(UMT5Config(**_t5_kwargs(tokenizer, text_dim))))
    vae = _build(
        seed,
        "vae",
        lambda: AutoencoderKLWan(
            base_dim=8,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        ),
    )
    transformer = _build(
        seed,
        "transformer",
        lambda: WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=16,
            out_channels=16,
            text_dim=text_dim,
            freq_dim=64,
            ffn_dim=64,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=1024,
        ),
    )
    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=3.0,
        solver_order=2,
        lower_order_final=True,
    )
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
    )


def build_tiny_sd3(seed: int = 0) -> StableDiffusion3Pipeline:
    """SD3 (MMDiT): 2 joint blocks, 4 heads of 16, patch 2; two CLIP encoders with projection + T5.

    SD3 concatenates the two CLIP hidden states along features (32 + 32 = T5's width 64) and the pooled
    projections (32 + 32 = pooled dim 64); it runs CFG as one transformer pass on cat([uncond, cond]).
    """
    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer(), clip_tokenizer(), t5_tokenizer()
    clip_hidden, t5_dim = 32, 64
    text_encoder = _build(
        seed, "text_encoder", lambda: CLIPTextModelWithProjection(_clip_config(tokenizer, clip_hidden, clip_hidden))
    )
    text_encoder_2 = _build(
        seed, "text_encoder_2", lambda: CLIPTextModelWithProjection(_clip_config(tokenizer_2, clip_hidden, clip_hidden))
    )
    text_encoder_3 = _build(seed, "text_encoder_3", lambda: T5EncoderModel(T5Config(**_t5_kwargs(tokenizer_3, t5_dim))))
    transformer = _build(
        seed,
        "transformer",
        lambda: SD3Transformer2DModel(
            sample_size=16,  # latent size: the pipeline's default image is 16 * 8 = 128 px
            patch_size=2,
            in_channels=16,
            out_channels=16,
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
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


# ---------------------------------------------------------------------------------------------------------------------
# Registry and public entry point
# ---------------------------------------------------------------------------------------------------------------------

BUILTIN_MODELS: dict[str, BuiltinModel] = {
    model.name: model
    for model in (
        BuiltinModel(
            name="tiny-flux",
            task="text-to-image",
            family="flux",
            description="random FLUX (2 dual + 2 single blocks, 4x16 heads), for tests and fidelity checks",
            default_height=128,
            default_width=128,
            default_steps=8,
            default_frames=None,
            default_guidance=3.5,
            builder=build_tiny_flux,
        ),
        BuiltinModel(
            name="tiny-wan",
            task="text-to-video",
            family="wan",
            description="random Wan 2.1 text-to-video (2 blocks, 2x16 heads), for tests and fidelity checks",
            default_height=64,
            default_width=64,
            default_steps=8,
            default_frames=5,
            default_guidance=5.0,
            builder=build_tiny_wan,
            default_fps=8,
        ),
        BuiltinModel(
            name="tiny-sd3",
            task="text-to-image",
            family="sd3",
            description="random SD3 MMDiT (2 blocks, 4x16 heads), for tests and fidelity checks",
            default_height=128,
            default_width=128,
            default_steps=8,
            default_frames=None,
            default_guidance=5.0,
            builder=build_tiny_sd3,
        ),
        BuiltinModel(
            name="bench-flux",
            task="text-to-image",
            family="flux",
            description="random FLUX (4 dual + 8 single blocks, 6x64 heads), for CPU speed measurements",
            default_height=512,
            default_width=512,
            default_steps=20,
            default_frames=None,
            default_guidance=3.5,
            builder=build_bench_flux,
            # FLUX.1 at 1024 px has 4096 image and 512 text tokens; keep that 8:1 ratio at 1024 image tokens
            pipeline_kwargs={"max_sequence_length": 128},
        ),
    )
}


def build_pipeline(name: str, seed: int = 0) -> DiffusionPipeline:
    """Build the built-in pipeline `name` (fp32, CPU, eval mode, progress bar off); same name and seed, same weights."""
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; known: {', '.join(BUILTIN_MODELS)}")
    pipe = BUILTIN_MODELS[name].builder(seed)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe
