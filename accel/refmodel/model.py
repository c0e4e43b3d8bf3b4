"""``shapes-flux``: a small FLUX-architecture text-to-image model trained by this project on coloured shapes.

Why: accelerator fidelity and prompt-adherence numbers only mean something on a model that actually follows its
prompts. ``shapes-flux`` is a real `FluxPipeline` (dual- and single-stream `FluxTransformer2DModel`, `AutoencoderKL`,
CLIP + T5 text encoders, FLUX's scheduler with dynamic shifting) trained from scratch here
(``python -m accel.refmodel.train``, see ``docs/refmodel.md``) on ``accel.refmodel.shapes``; its outputs are checked
exactly by ``accel.refmodel.scorer``.

Architecture (``build_untrained``):

- transformer: 3 dual-stream + 6 single-stream blocks, 6 heads of 32 (width 192), no guidance embedding
  (``guidance_embeds=False``: plain flow matching, so ``guidance_scale`` is ignored by the pipeline; real CFG is
  available through ``true_cfg_scale`` + ``negative_prompt``, since 10% of training captions were empty);
- VAE: `AutoencoderKL` with 5 levels (channels 16-32-64-64-64, spatial factor 16), 16 latent channels, no quant
  convs, no mid-block attention; ``scaling_factor`` / ``shift_factor`` set from measured latent statistics. A
  128x128 image is an 8x8x16 latent, i.e. 16 image tokens after FLUX's 2x2 packing;
- text encoders: tiny CLIP (random, frozen; FluxPipeline reads only its pooled output) and T5 (trained with the
  transformer: FLUX gives text tokens no position, so which colour goes with which position must come from T5's
  outputs, and a random T5 does not separate them); in-memory tokenizers, T5's with the grammar's words as whole
  tokens (``VOCABULARY``);
- scheduler: FLUX.1's (dynamic shifting, base/max shift 0.5/1.15).

Generation sizes must be multiples of 32 (the VAE's factor 16 times FLUX's 2x2 packing); the model was trained at
128x128 only.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, T5Config, T5EncoderModel

from accel.loading import own_memory
from accel.refmodel.shapes import COLORS, POSITIONS, SHAPES
from accel.testing.tiny import (
    BuiltinModel,
    _build,
    _clip_config,
    _flux_scheduler,
    _t5_kwargs,
    clip_tokenizer,
    image_vae,
    t5_tokenizer,
)

__all__ = [
    "WEIGHTS_DIR",
    "MAX_SEQUENCE_LENGTH",
    "REFMODELS",
    "ShapesFluxWeightsMissing",
    "build_untrained",
    "load_shapes_flux",
]

WEIGHTS_DIR = Path(__file__).parent / "weights" / "shapes-flux"

# The T5 tokenizer knows the grammar's words as whole tokens (other words fall back to characters): the longest
# caption ("a yellow triangle at the bottom and a yellow triangle in the center") is 13 words + </s> = 14 tokens;
# 16 truncates no caption of the grammar. (CLIP's byte-level tokenizer drops spaces: at most 57 tokens, under 77;
# FluxPipeline only reads its pooled output.)
MAX_SEQUENCE_LENGTH = 16
VOCABULARY: tuple[str, ...] = ("a", "and", *COLORS, *SHAPES, *(w for p in POSITIONS for w in p.split()))

CLIP_HIDDEN = 64
T5_DIM = 64
VAE_CHANNELS = (16, 32, 64, 64, 64)
LATENT_CHANNELS = 16  # fixed in accel.testing.tiny.image_vae


class ShapesFluxWeightsMissing(FileNotFoundError):
    """The trained shapes-flux weights are not where they should be."""


def build_vae(seed: int = 0, scaling_factor: float = 1.0, shift_factor: float = 0.0) -> AutoencoderKL:
    """The untrained shapes-flux VAE (spatial factor 16 = 2 ** (levels - 1))."""
    return image_vae(seed, scaling_factor=scaling_factor, shift_factor=shift_factor, channels=VAE_CHANNELS,
                     norm_groups=8, sample_size=128)


def build_transformer(seed: int = 0) -> FluxTransformer2DModel:
    """The untrained shapes-flux transformer: 3 dual + 6 single blocks, 6 heads of 32."""
    return _build(
        seed,
        "transformer",
        lambda: FluxTransformer2DModel(
            patch_size=1,
            in_channels=4 * LATENT_CHANNELS,  # 16 latent channels packed 2x2
            num_layers=3,
            num_single_layers=6,
            attention_head_dim=32,
            num_attention_heads=6,
            joint_attention_dim=T5_DIM,
            pooled_projection_dim=CLIP_HIDDEN,  # FluxPipeline pools CLIPTextModel's pooler_output (hidden size)
            guidance_embeds=False,
            axes_dims_rope=(8, 12, 12),
        ),
    )


def build_untrained(seed: int = 0, vae: AutoencoderKL | None = None) -> FluxPipeline:
    """The shapes-flux architecture with random weights (text encoders frozen, everything in eval mode; training
    unfreezes T5 with ``--train-text-encoder``)."""
    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer(words=VOCABULARY)
    text_encoder = _build(
        seed, "text_encoder", lambda: CLIPTextModel(_clip_config(tokenizer, CLIP_HIDDEN, CLIP_HIDDEN))
    )
    text_encoder_2 = _build(seed, "text_encoder_2", lambda: T5EncoderModel(T5Config(**_t5_kwargs(tokenizer_2, T5_DIM))))
    for encoder in (text_encoder, text_encoder_2):
        encoder.requires_grad_(False)
    pipe = FluxPipeline(
        scheduler=_flux_scheduler(),
        vae=vae if vae is not None else build_vae(seed),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=build_transformer(seed),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_shapes_flux(seed: int = 0, weights_dir: str | Path | None = None) -> FluxPipeline:
    """The trained shapes-flux pipeline (fp32, CPU, eval mode, progress bar off), loaded offline.

    ``seed`` is accepted for the built-in model interface (``builder(seed)``) and ignored: the weights are fixed.
    """
    del seed
    path = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    if not (path / "model_index.json").is_file():
        raise ShapesFluxWeightsMissing(
            f"shapes-flux weights not found in {path} (expected a diffusers directory with model_index.json); "
            "train them with `python -m accel.refmodel.train --stage all --out DIR` (see docs/refmodel.md) "
            "and copy DIR there"
        )
    pipe = FluxPipeline.from_pretrained(path, local_files_only=True)
    own_memory(pipe)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


REFMODELS: dict[str, BuiltinModel] = {
    "shapes-flux": BuiltinModel(
        name="shapes-flux",
        task="text-to-image",
        family="flux",
        description=(
            "FLUX (3 dual + 6 single blocks, 6x32 heads, 7.6M params) trained here on coloured shapes; "
            "prompts like 'a red circle on the left and a blue square at the top', scored by accel.refmodel.scorer"
        ),
        default_height=128,
        default_width=128,
        default_steps=28,
        default_frames=None,
        default_guidance=1.0,  # no guidance embedding: FluxPipeline ignores guidance_scale for this model
        builder=load_shapes_flux,
        pipeline_kwargs={"max_sequence_length": MAX_SEQUENCE_LENGTH},
    ),
}
