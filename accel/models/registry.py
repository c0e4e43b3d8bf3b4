"""The built-in models: name -> what it is, its generation defaults, and the function that builds it.

`accel.loading` looks built-in names up here; the model modules only build pipelines and never import this table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from diffusers import DiffusionPipeline

from accel.errors import ModelNotFoundError
from accel.models.pipelines import ModelDefaults, prepare
from accel.models.shapes_flux import LORAS as SHAPES_FLUX_LORAS
from accel.models.shapes_flux import MAX_SEQUENCE_LENGTH, load_shapes_flux
from accel.models.cogvideox import build_tiny_cogvideox
from accel.models.flux2 import build_tiny_flux2
from accel.models.hunyuanvideo15 import build_tiny_hunyuanvideo15
from accel.models.ltx import build_tiny_ltx
from accel.models.pixart import build_tiny_pixart
from accel.models.qwen_image import build_tiny_qwen_image, build_tiny_qwen_image_edit
from accel.models.tiny import build_bench_flux, build_tiny_flux, build_tiny_flux_kontext, build_tiny_sd3, build_tiny_wan
from accel.models.wan22 import build_tiny_wan22, build_tiny_wan22_i2v
from accel.models.zimage import build_tiny_zimage

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "RANDOM_MODELS",
    "TRAINED_MODELS",
    "BuiltinModel",
    "build_pipeline",
    "builtin_models",
]

DEFAULT_MODEL = "shapes-flux"  # the embedded default of the CLI and the server: trained here, no download


@dataclass(frozen=True)
class BuiltinModel:
    """A built-in model: what it is, its generation defaults, and the function that builds it.

    `pipeline_kwargs` are extra pipeline-call arguments the model wants by default (e.g. `max_sequence_length`);
    `default_fps` is the frame rate for writing videos (None for images); `loras` are the model's own LoRA adapters
    (name -> LoRA file or directory in the package), which `accel.load_pipeline` loads (disabled until a call asks).
    """

    name: str
    task: Literal["text-to-image", "text-to-video", "image-edit", "image-to-video"]
    family: str  # an `accel.adapters.ADAPTERS` key
    description: str
    default_height: int
    default_width: int
    default_steps: int
    default_frames: int | None
    default_guidance: float | None  # None: the pipeline takes no guidance_scale (HunyuanVideo 1.5: its guider)
    builder: Callable[[int], DiffusionPipeline] = field(repr=False, compare=False)
    default_fps: int | None = None
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict, compare=False)
    loras: dict[str, Any] = field(default_factory=dict, compare=False)

    def defaults(self) -> ModelDefaults:
        """The record's defaults as the `ModelDefaults` that loading attaches to the pipeline."""
        return ModelDefaults(
            height=self.default_height,
            width=self.default_width,
            num_inference_steps=self.default_steps,
            guidance_scale=self.default_guidance,
            num_frames=self.default_frames,
            fps=self.default_fps or (8 if self.default_frames else None),
            extra=dict(self.pipeline_kwargs),
        )


def _records(*models: BuiltinModel) -> dict[str, BuiltinModel]:
    return {model.name: model for model in models}


# trained here: weights in the package (accel/models/weights)
TRAINED_MODELS = _records(
    BuiltinModel(
        name="shapes-flux",
        task="text-to-image",
        family="flux",
        description=(
            "FLUX (3 dual + 6 single blocks, 6x32 heads, 7.6M params) trained here on coloured shapes; "
            "prompts like 'a red circle on the left and a blue square at the top', scored by accel.eval.shapes_scorer"
        ),
        default_height=128,
        default_width=128,
        default_steps=28,
        default_frames=None,
        default_guidance=1.0,  # no guidance embedding: FluxPipeline ignores guidance_scale for this model
        builder=load_shapes_flux,
        pipeline_kwargs={"max_sequence_length": MAX_SEQUENCE_LENGTH},
        loras=dict(SHAPES_FLUX_LORAS),  # star: the shape word 'star', trained here (tools/refmodel/train_lora.py)
    ),
)

# random weights, built from configs (accel.models.tiny)
RANDOM_MODELS = _records(
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
        name="tiny-flux-kontext",
        task="image-edit",
        family="flux",
        description="random FLUX.1 Kontext (tiny-flux's weights in FluxKontextPipeline): image editing",
        default_height=128,
        default_width=128,
        default_steps=8,
        default_frames=None,
        default_guidance=3.5,
        builder=build_tiny_flux_kontext,
        # the output's area (default 1024²), and no snapping to Kontext's preferred resolutions (about 1 MP)
        pipeline_kwargs={"max_area": 128 * 128, "_auto_resize": False},
    ),
    BuiltinModel(
        name="tiny-flux2",
        task="text-to-image",
        family="flux2",
        description=(
            "random FLUX.2 [klein] (Flux2KleinPipeline: 2 dual + 2 single blocks, 4x16 heads, Qwen3 text encoder "
            "28 layers deep, 32 wide); FLUX.2 [dev]'s Mistral processor needs torchvision"
        ),
        default_height=64,
        default_width=64,
        default_steps=8,
        default_frames=None,
        default_guidance=4.0,
        builder=build_tiny_flux2,
    ),
    BuiltinModel(
        name="tiny-qwen-image",
        task="text-to-image",
        family="qwen-image",
        description=(
            "random Qwen-Image (2 dual-stream blocks, 4x16 heads, Qwen2.5-VL text encoder), "
            "for tests and fidelity checks"
        ),
        default_height=64,
        default_width=64,
        default_steps=8,
        default_frames=None,
        default_guidance=1.0,
        builder=build_tiny_qwen_image,
    ),
    BuiltinModel(
        name="tiny-qwen-image-edit",
        task="image-edit",
        family="qwen-image",
        description=(
            "random Qwen-Image-Edit-Plus (tiny-qwen-image's weights in QwenImageEditPlusPipeline): image editing; "
            "needs torchvision (Qwen2VLProcessor)"
        ),
        default_height=64,
        default_width=64,
        default_steps=8,
        default_frames=None,
        default_guidance=1.0,
        builder=build_tiny_qwen_image_edit,
    ),
    BuiltinModel(
        name="tiny-zimage",
        task="text-to-image",
        family="zimage",
        description=(
            "random Z-Image (2 single-stream blocks after 2 noise / 2 caption refiner blocks, 4x16 heads, "
            "Qwen3 text encoder), for tests and fidelity checks"
        ),
        default_height=64,
        default_width=64,
        default_steps=8,
        default_frames=None,
        default_guidance=5.0,
        builder=build_tiny_zimage,
    ),
    BuiltinModel(
        name="tiny-pixart",
        task="text-to-image",
        family="pixart",
        description=(
            "random PixArt-Sigma (2 blocks, 2x16 heads, patch 2, learned sigma; T5 text encoder, 4-channel VAE), "
            "for tests and fidelity checks"
        ),
        default_height=64,
        default_width=64,
        default_steps=8,
        default_frames=None,
        default_guidance=4.5,
        builder=build_tiny_pixart,
        # the requested size as is (binning would denoise at the 256-px bin and resize); prompts as given
        pipeline_kwargs={"use_resolution_binning": False, "clean_caption": False},
    ),
    BuiltinModel(
        name="tiny-wan22",
        task="text-to-video",
        family="wan",
        description=(
            "random Wan 2.2 T2V A14B layout: two experts (high-noise transformer, low-noise transformer_2, "
            "boundary 0.875), each 2 blocks, 2x16 heads, for tests and fidelity checks"
        ),
        default_height=64,
        default_width=64,
        default_steps=8,  # 6 high-noise + 2 low-noise steps (flow shift 12)
        default_frames=5,
        default_guidance=4.0,  # the release's high-noise scale; guidance_scale_2 (low noise) defaults to it
        builder=build_tiny_wan22,
        default_fps=16,
    ),
    BuiltinModel(
        name="tiny-wan22-i2v",
        task="image-to-video",
        family="wan",
        description=(
            "random Wan 2.2 I2V A14B layout: two experts (boundary 0.9), each 2 blocks, 2x16 heads, "
            "image as VAE latents (no image encoder), for tests and fidelity checks"
        ),
        default_height=64,
        default_width=64,
        default_steps=8,  # 3 high-noise + 5 low-noise steps (flow shift 5)
        default_frames=5,
        default_guidance=3.5,  # the release's, both experts
        builder=build_tiny_wan22_i2v,
        default_fps=16,
    ),
    BuiltinModel(
        name="tiny-hunyuanvideo15",
        task="text-to-video",
        family="hunyuanvideo15",
        description=(
            "random HunyuanVideo 1.5 text-to-video (2 dual-stream blocks, 2x16 heads, Qwen2.5-VL + ByT5 encoders, "
            "16x spatial / 4x temporal VAE), for tests and fidelity checks"
        ),
        default_height=64,
        default_width=64,
        default_steps=8,
        default_frames=5,
        default_guidance=None,  # the call has no guidance_scale: CFG at the guider's own scale (6.0)
        builder=build_tiny_hunyuanvideo15,
        default_fps=8,
    ),
    BuiltinModel(
        name="tiny-ltx",
        task="text-to-video",
        family="ltx",
        description=(
            "random LTX-Video (2 blocks, 2x16 heads, patch 1; T5 text encoder, 32x spatial / 8x temporal VAE), "
            "for tests and fidelity checks"
        ),
        default_height=64,
        default_width=64,
        default_steps=8,
        default_frames=9,
        default_guidance=3.0,
        builder=build_tiny_ltx,
        default_fps=25,  # the pipeline's frame_rate default, which scales the rotary time positions
    ),
    BuiltinModel(
        name="tiny-cogvideox",
        task="text-to-video",
        family="cogvideox",
        description=(
            "random CogVideoX 1.0 (5B layout: 2 expert blocks, 2x16 heads, patch 2, 3D rotary embeddings; "
            "T5 text encoder), for tests and fidelity checks"
        ),
        default_height=64,
        default_width=64,
        default_steps=8,
        default_frames=9,  # 8k + 1: an odd number of latent frames (5 frames would decode to 8)
        default_guidance=6.0,
        builder=build_tiny_cogvideox,
        default_fps=8,
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

BUILTIN_MODELS: dict[str, BuiltinModel] = {**TRAINED_MODELS, **RANDOM_MODELS}


def builtin_models() -> dict[str, BuiltinModel]:
    """Built-in model names -> their records, the default model first."""
    return dict(BUILTIN_MODELS)


def build_pipeline(name: str, seed: int = 0) -> DiffusionPipeline:
    """The plain diffusers pipeline of built-in `name` (fp32, CPU, eval mode, progress bar off); same name and
    seed, same weights. `accel.load_pipeline(name)` gives it the model's call defaults as well."""
    if name not in BUILTIN_MODELS:
        raise ModelNotFoundError(f"unknown built-in model {name!r}; built-ins: {', '.join(BUILTIN_MODELS)}")
    return prepare(BUILTIN_MODELS[name].builder(seed))
