"""Tiny language-model text encoders and their tokenizers/processors, built offline from config objects.

The newer diffusion families encode prompts with a chat LLM: Qwen2.5-VL (Qwen-Image, HunyuanVideo 1.5) and Qwen3
(Z-Image, FLUX.2 klein). Here each is the real transformers class built from a small config
(`accel.models.components.seeded_module`: per-component seed, fp32, eval), and each tokenizer is built in memory.
(FLUX.2 dev's Mistral Small 3 is not here: its `PixtralProcessor` needs torchvision, see `accel.models.flux2`.)

- byte-level BPE without merges: one token per UTF-8 byte, so every prompt (empty, unicode, any length) tokenizes,
  nothing maps to an unknown token, and the segmentation is unique;
- Qwen's special tokens (``<|im_start|>``, ``<|image_pad|>``, ...) as single tokens, with ids that the model
  configs below point at (image token, vision start, pad);
- a short chat template in Qwen's ChatML format, which the pipelines apply.

The pipelines' prompt templates were written for the released vocabularies (Qwen-Image drops the first 34 tokens
of its template, HunyuanVideo 1.5 the first 108): with one token per byte a template is longer than that, so the
drop only removes part of the system prompt and the prompt's own tokens are always kept.

Everything saves with `save_pretrained` and loads back with `from_pretrained` to identical tokenization.
"""

from __future__ import annotations

from typing import Sequence

import torch
from tokenizers import AddedToken, pre_tokenizers
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLTextModel,
    Qwen2Tokenizer,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3Model,
)

from accel.models.components import seeded_module

__all__ = [
    "QWEN_CHAT_TEMPLATE",
    "QWEN_SPECIAL_TOKENS",
    "qwen2_5_vl_encoder",
    "qwen2_5_vl_text_encoder",
    "qwen2_tokenizer",
    "qwen2_vl_processor",
    "qwen3_encoder",
]

_BYTES = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 printable stand-ins of byte-level BPE

# Qwen's special tokens, ids right after the 256 bytes (Qwen2.5-VL's and Qwen3's, in their released order)
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<think>",
    "</think>",
)

# ChatML as Qwen's templates write it: string or list contents (text and image parts), the generation prompt, and
# Qwen3's `enable_thinking=False` (an empty think block), which FLUX.2 klein asks for; Z-Image passes True.
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- elif part['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'video' -%}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking -%}{{ '<think>\n\n</think>\n\n' }}{%- endif -%}"
    "{%- endif -%}"
)


def _byte_vocab(specials: Sequence[str]) -> dict[str, int]:
    """The 256 byte symbols (ids 0-255), then `specials`."""
    vocab = {symbol: i for i, symbol in enumerate(_BYTES)}
    for token in specials:
        vocab[token] = len(vocab)
    return vocab


def qwen2_tokenizer(model_max_length: int = 32768) -> Qwen2Tokenizer:
    """Qwen's tokenizer class over bytes (ids 0-255) plus `QWEN_SPECIAL_TOKENS` (256-264), with a ChatML template.

    ``<|endoftext|>`` is the pad token as in Qwen's releases; padding is on the right, as the released Qwen2.5-VL
    and Qwen3 tokenizers pad (the pipelines read hidden states by attention mask).
    """
    tokenizer = Qwen2Tokenizer(
        vocab=_byte_vocab(QWEN_SPECIAL_TOKENS),
        merges=[],
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=model_max_length,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in QWEN_SPECIAL_TOKENS])
    return tokenizer


def _qwen_ids(tokenizer) -> dict[str, int]:
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    return {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
    }


def _qwen_text_config(tokenizer, config_class: type, hidden: int, layers: int, **extra):
    """A Qwen decoder config: `hidden` wide (2 query heads of hidden/2, 1 key/value head: grouped-query attention
    as the released models), SwiGLU of 2 x hidden, RoPE; vocabulary exactly the tokenizer's."""
    ids = _qwen_ids(tokenizer)
    return config_class(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        attention_dropout=0.0,
        bos_token_id=ids["bos_token_id"],
        eos_token_id=ids["eos_token_id"],
        pad_token_id=ids["pad_token_id"],
        **extra,
    )


def qwen3_encoder(
    seed: int, component: str, tokenizer, hidden: int = 32, layers: int = 2, model_class: type = Qwen3ForCausalLM
) -> torch.nn.Module:
    """A Qwen3 decoder (`Qwen3ForCausalLM` as FLUX.2 klein ships it, or `Qwen3Model` as Z-Image does), 2 heads of
    hidden/2 with q/k RMSNorm. `layers` is at least the deepest hidden state the pipeline reads."""
    config = _qwen_text_config(tokenizer, Qwen3Config, hidden, layers, head_dim=hidden // 2, tie_word_embeddings=True)
    return seeded_module(seed, component, lambda: model_class(config))


def _qwen2_5_vl_text_config(tokenizer, hidden: int, layers: int) -> Qwen2_5_VLTextConfig:
    # multimodal RoPE: the halves of each head's rotary frequencies split over (time, height, width)
    half = hidden // 4  # head_dim / 2 with 2 heads
    section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]  # (16, 24, 24) in Qwen2.5-VL-7B's 64
    return _qwen_text_config(
        tokenizer,
        Qwen2_5_VLTextConfig,
        hidden,
        layers,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": section},
    )


def qwen2_5_vl_encoder(
    seed: int, component: str, tokenizer, hidden: int = 32, layers: int = 2, vision_hidden: int = 32
) -> Qwen2_5_VLForConditionalGeneration:
    """`Qwen2_5_VLForConditionalGeneration` (Qwen-Image's text encoder): the text decoder above plus a 2-block
    vision tower (patch 14, 2x2 merge, temporal patch 2: the released geometry, which the image processor must
    match), windowed attention in block 0 and full attention in block 1, projected to the text width."""
    text_config = _qwen2_5_vl_text_config(tokenizer, hidden, layers)
    ids = _qwen_ids(tokenizer)
    config = Qwen2_5_VLConfig(
        text_config=text_config.to_dict(),
        vision_config={
            "depth": 2,
            "hidden_size": vision_hidden,
            "intermediate_size": 2 * vision_hidden,
            "num_heads": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "out_hidden_size": hidden,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
    )
    return seeded_module(seed, component, lambda: Qwen2_5_VLForConditionalGeneration(config))


def qwen2_5_vl_text_encoder(
    seed: int, component: str, tokenizer, hidden: int = 32, layers: int = 2
) -> Qwen2_5_VLTextModel:
    """`Qwen2_5_VLTextModel`, the language half of Qwen2.5-VL (HunyuanVideo 1.5's text encoder)."""
    config = _qwen2_5_vl_text_config(tokenizer, hidden, layers)
    return seeded_module(seed, component, lambda: Qwen2_5_VLTextModel(config))


def qwen2_vl_processor(tokenizer, max_pixels: int = 112 * 112) -> Qwen2VLProcessor:
    """Qwen2-VL's processor (Qwen-Image-Edit's) around `tokenizer`, with the released image geometry (patch 14,
    2x2 merge, temporal patch 2) and CLIP normalization; `max_pixels` caps an image at (by default) 8x8 patches,
    16 merged image tokens, whatever size the pipeline hands over (the released one allows 12.8M pixels).

    transformers builds this processor only with torchvision installed (its video-processor slot)."""
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=56 * 56,
        max_pixels=max_pixels,
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
    )
    from transformers import Qwen2VLVideoProcessor  # needs torchvision, as the processor does

    return Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),  # never used (no video input), but the processor requires one
        chat_template=QWEN_CHAT_TEMPLATE,
    )
