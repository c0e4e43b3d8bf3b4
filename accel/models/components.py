"""Public builders of pipeline components with random weights, assembled offline from small configs.

Shared by the random built-ins (`accel.models.tiny`) and the trained reference model (`accel.models.shapes_flux`,
whose training starts from these builders). There are no weights and no network here, so every component is built
from a config object:

- every module is built under a seed of its own (`seeded_module`), derived from the model's seed and the component's
  name, in fp32 and eval mode (modules built from a config start in train mode, where T5's dropout would make
  outputs random; dropout is also 0 in the configs), leaving the caller's global RNG state untouched;
- tokenizers are built in memory and need no files: CLIP's is byte-level BPE without merges (one token per UTF-8
  byte, so any prompt works, unicode and the empty prompt included); T5's has a piece per printable ASCII character
  plus optional whole words (other characters become ``<unk>``). Both save and load with `save_pretrained` /
  `from_pretrained`, with identical tokenization. T5 uses relative position buckets, so any `max_sequence_length`
  works.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, Sequence

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
from tokenizers import pre_tokenizers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5Tokenizer

__all__ = [
    "clip_encoder",
    "clip_tokenizer",
    "flux_scheduler",
    "flux_text_encoders",
    "flux_transformer",
    "image_vae",
    "seeded_module",
    "t5_encoder",
    "t5_tokenizer",
]

LATENT_CHANNELS = 16  # the latent width of every image VAE here (FLUX's and SD3's)


def seeded_module(seed: int, component: str, make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
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


def clip_encoder(
    seed: int, component: str, tokenizer: CLIPTokenizer, hidden: int, model_class: type = CLIPTextModel
) -> torch.nn.Module:
    """A 2-layer CLIP text encoder (SD3 reads the penultimate hidden state, so at least 2 layers); `model_class`
    is `CLIPTextModel` (FLUX) or `CLIPTextModelWithProjection` (SD3, projection width = `hidden`)."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        projection_dim=hidden,
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
    return seeded_module(seed, component, lambda: model_class(config))


def t5_encoder(
    seed: int, component: str, tokenizer: T5Tokenizer, d_model: int, model_class: type = T5EncoderModel
) -> torch.nn.Module:
    """A 2-layer T5 v1.1-style encoder (gated GELU, relative position buckets: no fixed maximum length);
    `model_class` is `T5EncoderModel` (FLUX, SD3) or `UMT5EncoderModel` (Wan), each built from its own config class."""
    config = model_class.config_class(
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
    return seeded_module(seed, component, lambda: model_class(config))


def flux_text_encoders(seed: int, clip_hidden: int, t5_dim: int, words: Sequence[str] = ()) -> dict[str, Any]:
    """FluxPipeline's four text components: a CLIP encoder (FluxPipeline reads only its pooled output) and a T5
    encoder, each with its in-memory tokenizer; keyword arguments for `FluxPipeline(...)`."""
    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer(words=words)
    return {
        "tokenizer": tokenizer,
        "text_encoder": clip_encoder(seed, "text_encoder", tokenizer, clip_hidden),
        "tokenizer_2": tokenizer_2,
        "text_encoder_2": t5_encoder(seed, "text_encoder_2", tokenizer_2, t5_dim),
    }


def flux_transformer(
    seed: int,
    *,
    dual: int,
    single: int,
    heads: int,
    head_dim: int,
    text_dim: int,
    pooled_dim: int,
    guidance_embeds: bool,
    axes_dims_rope: tuple[int, int, int],
) -> FluxTransformer2DModel:
    """A `FluxTransformer2DModel` of `dual` dual-stream and `single` single-stream blocks over 16-channel latents
    packed 2x2; `pooled_dim` is the CLIP encoder's hidden size (FluxPipeline pools its pooler_output)."""
    return seeded_module(
        seed,
        "transformer",
        lambda: FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * LATENT_CHANNELS,
            num_layers=dual,
            num_single_layers=single,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=text_dim,
            pooled_projection_dim=pooled_dim,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=axes_dims_rope,
        ),
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
    return seeded_module(
        seed,
        "vae",
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(channels),
            up_block_types=("UpDecoderBlock2D",) * len(channels),
            block_out_channels=channels,
            layers_per_block=1,
            latent_channels=LATENT_CHANNELS,
            norm_num_groups=norm_groups,
            sample_size=sample_size,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            use_quant_conv=False,
            use_post_quant_conv=False,
            mid_block_add_attention=False,
        ),
    )


def flux_scheduler() -> FlowMatchEulerDiscreteScheduler:
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
