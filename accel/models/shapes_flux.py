"""``shapes-flux``: a small FLUX-architecture text-to-image model trained by this project on coloured shapes.

Why: accelerator fidelity and prompt-adherence numbers only mean something on a model that actually follows its
prompts. ``shapes-flux`` is a real `FluxPipeline` (dual- and single-stream `FluxTransformer2DModel`, `AutoencoderKL`,
CLIP + T5 text encoders, FLUX's scheduler with dynamic shifting) trained from scratch here
(``python -m tools.refmodel.train``, see ``docs/refmodel.md``) on scenes of the caption grammar in
``accel.eval.shapes_captions``; its outputs are checked exactly by ``accel.eval.shapes_scorer``.

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

Built-in LoRA adapter (``LORAS``, trained by ``python -m tools.refmodel.train_lora``, see ``docs/refmodel.md``):
``star`` teaches the shape word ``star``, which the base model has never seen; `accel.load_pipeline("shapes-flux")`
loads it (disabled until a call asks for it: ``lora=[{"name": "star", "scale": 1.0}]``).

Generation sizes must be multiples of 32 (the VAE's factor 16 times FLUX's 2x2 packing); the model was trained at
128x128 only, with T5 prompts padded to ``MAX_SEQUENCE_LENGTH`` tokens. `load_shapes_flux` returns the plain
diffusers pipeline; as a built-in (`accel.load_pipeline("shapes-flux")`) its call defaults are the model's
(`accel.models.pipelines.with_defaults`).
"""

from __future__ import annotations

from pathlib import Path

from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel

from accel.eval.shapes_captions import COLORS, POSITIONS, SHAPES
from accel.models.components import flux_scheduler, flux_text_encoders, flux_transformer, image_vae
from accel.models.pipelines import own_memory, prepare

__all__ = [
    "LORAS",
    "LORAS_DIR",
    "MAX_SEQUENCE_LENGTH",
    "VOCABULARY",
    "WEIGHTS_DIR",
    "ShapesFluxWeightsMissing",
    "build_transformer",
    "build_untrained",
    "build_vae",
    "load_shapes_flux",
]

WEIGHTS_DIR = Path(__file__).parent / "weights" / "shapes-flux"
LORAS_DIR = Path(__file__).parent / "weights" / "shapes-flux-loras"
LORAS: dict[str, Path] = {"star": LORAS_DIR / "star"}  # the built-in adapters: name -> diffusers LoRA directory

# The T5 tokenizer knows the grammar's words as whole tokens (other words fall back to characters): the longest
# caption ("a yellow triangle at the bottom and a yellow triangle in the center") is 13 words + </s> = 14 tokens;
# 16 truncates no caption of the grammar. (CLIP's byte-level tokenizer drops spaces: at most 57 tokens, under 77;
# FluxPipeline only reads its pooled output.)
MAX_SEQUENCE_LENGTH = 16
VOCABULARY: tuple[str, ...] = ("a", "and", *COLORS, *SHAPES, *(w for p in POSITIONS for w in p.split()))

CLIP_HIDDEN = 64
T5_DIM = 64
VAE_CHANNELS = (16, 32, 64, 64, 64)


class ShapesFluxWeightsMissing(FileNotFoundError):
    """The trained shapes-flux weights are not where they should be."""


def build_vae(seed: int = 0, scaling_factor: float = 1.0, shift_factor: float = 0.0) -> AutoencoderKL:
    """The untrained shapes-flux VAE (spatial factor 16 = 2 ** (levels - 1))."""
    return image_vae(seed, scaling_factor=scaling_factor, shift_factor=shift_factor, channels=VAE_CHANNELS,
                     norm_groups=8, sample_size=128)


def build_transformer(seed: int = 0) -> FluxTransformer2DModel:
    """The untrained shapes-flux transformer: 3 dual + 6 single blocks, 6 heads of 32."""
    return flux_transformer(seed, dual=3, single=6, heads=6, head_dim=32, text_dim=T5_DIM, pooled_dim=CLIP_HIDDEN,
                            guidance_embeds=False, axes_dims_rope=(8, 12, 12))


def build_untrained(seed: int = 0, vae: AutoencoderKL | None = None) -> FluxPipeline:
    """The shapes-flux architecture with random weights (text encoders frozen, everything in eval mode; training
    unfreezes T5 with ``--train-text-encoder``)."""
    encoders = flux_text_encoders(seed, CLIP_HIDDEN, T5_DIM, words=VOCABULARY)
    for encoder in (encoders["text_encoder"], encoders["text_encoder_2"]):
        encoder.requires_grad_(False)
    pipe = FluxPipeline(
        scheduler=flux_scheduler(),
        vae=vae if vae is not None else build_vae(seed),
        transformer=build_transformer(seed),
        **encoders,
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
            "train them from a checkout of the repository with `python -m tools.refmodel.train --stage all --out DIR` "
            "(see docs/refmodel.md) and copy DIR there"
        )
    pipe = FluxPipeline.from_pretrained(path, local_files_only=True)
    own_memory(pipe)
    return prepare(pipe)
