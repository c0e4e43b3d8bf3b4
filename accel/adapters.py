"""Model adapters: per transformer family, where the block stacks are, what a block takes and returns, and how the
pipeline lays out classifier-free guidance. Accelerators never hard-code a family; they ask the adapter.

Supporting a new family means one `ModelAdapter` entry in `ADAPTERS` (its block classes must be known to
diffusers' `TransformerBlockRegistry`, which says where `hidden_states` / `encoder_hidden_states` sit in a
block's inputs and outputs).
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

from accel.errors import SpecError, UnsupportedModelError

log = logging.getLogger("accel")


@dataclass(frozen=True)
class ModelAdapter:
    """How one transformer family is laid out.

    stacks: attribute names of the `nn.ModuleList`s of blocks, in execution order (FLUX: dual-stream then
        single-stream).
    cfg_layout: how the pipeline runs classifier-free guidance: "separate" (one transformer call per branch, under
        `cache_context("cond"/"uncond")` or in that order), or "batch" (one call on both halves, see `batch_order`).
    batch_order: which half of a batched-CFG call is the conditional one: "uncond_first" (`cat([uncond, cond])`,
        SD3, PixArt, LTX, CogVideoX) or "cond_first" (Z-Image's `cat([positive, negative])`).
    guidance: where the scale λ of the pipeline's CFG combine `u + λ(c - u)` comes from (`cfg_scale`):
        "true_cfg" (FLUX.1, Qwen-Image: `true_cfg_scale` with a negative prompt; an embedded `guidance_scale` is no
        combine), "cfg" (`guidance_scale` when the pipeline runs CFG: its `do_classifier_free_guidance`, or, for
        pipelines without that property, a scale above 1 on a transformer that does not embed it; Wan 2.2's
        `guidance_scale_2` below the expert boundary), "guider" (a diffusers guider on `pipe.guider`: HunyuanVideo
        1.5).
    guidance_offset: added to the scale to get λ: Z-Image combines `c + s(c - u)`, which is λ = s + 1.
    timestep_argument: the transformer's argument carrying the timestep (by name or position; Z-Image's is `t`).
    latent_packing: latent patches the pipeline packs into one token itself (FLUX-style 2x2; None: the
        transformer's own `patch_size`), for the size multiple.
    block_metadata: where hidden states sit in the inputs and outputs of block classes that diffusers'
        `TransformerBlockRegistry` lacks or describes wrongly (Z-Image's blocks take `x`).
    self_attention: attribute of a block's self-attention module (the one attention methods may change), or None
        where no attention method supports the family yet.
    text_first: whether text tokens lead that attention's sequence (FLUX's joint [text, image] attention).
    mag_ratios: published per-step magnitude ratios of the family's reference checkpoint (MagCache's default).
    skip_layers_argument: the transformer's argument naming blocks it skips by itself (SD3's skip-layer guidance):
        those are not counted as block forwards a plain run makes.
    flow_output: the transformer's output is the flow velocity v = eps - x0 of the latents leading its
        `hidden_states` input (x_t = (1 - sigma) x0 + sigma eps), used as is by the scheduler: what methods that
        reason about the noise prediction need (AB-Cache's `prediction="noise_blend"`). Not Z-Image (its pipeline
        negates the output), PixArt (epsilon), CogVideoX (v-prediction), LTX (per-token timesteps on I2V).
    """

    family: str
    transformer_class: str
    pipeline_classes: tuple[str, ...]  # pipelines whose call layout the conformance tests check
    stacks: tuple[str, ...]
    cfg_layout: Literal["separate", "batch"]
    task: Literal["text-to-image", "text-to-video"]
    guidance: Literal["true_cfg", "cfg", "guider"] = "cfg"
    guidance_offset: float = 0.0
    batch_order: Literal["uncond_first", "cond_first"] = "uncond_first"
    timestep_argument: str = "timestep"
    latent_packing: int | None = None
    # (block class name, metadata); not part of the adapter's hash (diffusers' metadata objects are unhashable)
    block_metadata: tuple[tuple[str, TransformerBlockMetadata], ...] = field(default=(), hash=False, compare=False)
    self_attention: str | None = None
    text_first: bool = False
    mag_ratios: tuple[float, ...] | None = None
    skip_layers_argument: str | None = None  # the transformer's argument listing blocks it skips itself (SD3's SLG)
    unbatched_arguments: tuple[str, ...] = ()  # the transformer's tensor arguments without a batch dimension
    flow_output: bool = False

    def block_stacks(self, transformer: torch.nn.Module) -> dict[str, torch.nn.ModuleList]:
        return {name: getattr(transformer, name) for name in self.stacks}

    def block_sizes(self, transformer: torch.nn.Module) -> dict[str, int]:
        return {name: len(getattr(transformer, name)) for name in self.stacks}

    def cfg_scale(self, pipe: Any, call_kwargs: dict[str, Any] | None, timestep: float) -> float | None:
        """λ of the CFG combine that follows the current denoiser call, or None when none follows. `call_kwargs`:
        the running pipeline call's arguments with its defaults (`AccelSession.call_kwargs`; None when the
        transformer is called outside a pipeline call); `timestep` on the 0..1000 scale."""
        scale = self._guidance_scale(pipe, call_kwargs, timestep)
        return None if scale is None else scale + self.guidance_offset

    def runs_cfg(self, pipe: Any, call_kwargs: dict[str, Any] | None) -> bool:
        """Whether the running call combines a conditional and an unconditional prediction (the same rule as
        `cfg_scale`; the timestep only picks Wan 2.2's scale)."""
        return self._guidance_scale(pipe, call_kwargs, 1000.0) is not None

    def _guidance_scale(self, pipe: Any, call_kwargs: dict[str, Any] | None, timestep: float) -> float | None:
        if self.guidance == "true_cfg":
            if call_kwargs is None:
                return None
            negative = call_kwargs.get("negative_prompt") is not None or (
                call_kwargs.get("negative_prompt_embeds") is not None
                and ("negative_pooled_prompt_embeds" not in call_kwargs  # pipelines without pooled embeddings
                     or call_kwargs.get("negative_pooled_prompt_embeds") is not None)
            )
            scale = float(call_kwargs.get("true_cfg_scale") or 1.0)
            return scale if scale > 1 and negative else None
        if self.guidance == "guider":
            guider = getattr(pipe, "guider", None)
            enabled = guider is not None and getattr(guider, "_enabled", True) and guider.num_conditions > 1
            return float(guider.guidance_scale) if enabled else None
        scale = getattr(pipe, "guidance_scale", None) if call_kwargs is None else call_kwargs.get("guidance_scale")
        if scale is None:
            return None
        if hasattr(type(pipe), "do_classifier_free_guidance"):
            if not pipe.do_classifier_free_guidance:
                return None
        elif float(scale) <= 1 or _config(pipe.transformer, "guidance_embeds", False):
            return None  # diffusers' rule without the property; an embedded guidance scale is no combine
        boundary = _config(pipe, "boundary_ratio", None)
        if call_kwargs is not None and boundary is not None \
                and timestep < boundary * pipe.scheduler.config.num_train_timesteps:
            second = call_kwargs.get("guidance_scale_2")  # Wan 2.2: the low-noise expert's scale
            scale = second if second is not None else scale
        return float(scale)

    def timestep_of(self, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        """The timestep a transformer call was given (by keyword or by position in its `forward`)."""
        return call_argument(type(transformer).forward, self.timestep_argument, args, kwargs)

    def latents_of(self, transformer: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        """The `hidden_states` a transformer call was given (x_t, with any conditioning concatenated after it)."""
        return call_argument(type(transformer).forward, "hidden_states", args, kwargs)

    def size_multiple(self, pipe: Any) -> int:
        """Height and width must be multiples of this: the VAE's spatial factor times the latent patch."""
        vae_factor = (getattr(pipe, "vae_scale_factor_spatial", None)
                      or getattr(pipe, "vae_spatial_compression_ratio", None)
                      or getattr(pipe, "vae_scale_factor", 8))
        patch = self.latent_packing or _config(pipe.transformer, "patch_size", None) or 1
        if isinstance(patch, (list, tuple)):  # Wan: (t, h, w)
            patch = patch[-1]
        return int(vae_factor) * int(patch)


def _config(obj: Any, name: str, default: Any) -> Any:
    config = getattr(obj, "config", None)
    return config.get(name, default) if hasattr(config, "get") else getattr(config, name, default)


@functools.cache
def _positions(function: Any) -> dict[str, int]:
    """Argument name -> position in a call of the method `function` on an instance (self excluded)."""
    return {name: i for i, name in enumerate(list(inspect.signature(function).parameters)[1:])}


def call_argument(function: Any, name: str, args: tuple, kwargs: dict) -> Any:
    """The value of argument `name` in a call `instance.function(*args, **kwargs)`, by keyword or by position;
    None when the call does not give it."""
    if name in kwargs:
        return kwargs[name]
    index = _positions(function).get(name)
    return args[index] if index is not None and index < len(args) else None


ADAPTERS: dict[str, ModelAdapter] = {
    adapter.family: adapter
    for adapter in (
        ModelAdapter(
            family="flux",
            flow_output=True,
            transformer_class="FluxTransformer2DModel",
            pipeline_classes=("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxKontextPipeline"),
            stacks=("transformer_blocks", "single_transformer_blocks"),
            cfg_layout="separate",
            task="text-to-image",
            guidance="true_cfg",
            latent_packing=2,
            unbatched_arguments=("img_ids", "txt_ids"),  # (tokens, 3) position ids, shared by the batch
            self_attention="attn",  # joint [text, image] attention in dual and single blocks
            text_first=True,
            mag_ratios=tuple(float(r) for r in FLUX_MAG_RATIOS),
        ),
        ModelAdapter(
            family="wan",
            flow_output=True,
            transformer_class="WanTransformer3DModel",
            pipeline_classes=("WanPipeline", "WanImageToVideoPipeline"),
            stacks=("blocks",),
            cfg_layout="separate",
            task="text-to-video",
            self_attention="attn1",  # self-attention over video tokens; attn2 (cross-attention to text) untouched
        ),
        ModelAdapter(
            family="flux2",
            flow_output=True,
            transformer_class="Flux2Transformer2DModel",
            pipeline_classes=("Flux2KleinPipeline",),  # Flux2Pipeline ([dev]): its processor needs torchvision here
            stacks=("transformer_blocks", "single_transformer_blocks"),
            cfg_layout="separate",  # Klein: "cond" then "uncond"; FLUX.2 [dev] embeds guidance (no combine)
            task="text-to-image",
            latent_packing=2,
            self_attention="attn",  # joint [text, image] attention (dual blocks); single blocks: the joint sequence
            text_first=True,
        ),
        ModelAdapter(
            family="qwen-image",
            flow_output=True,
            transformer_class="QwenImageTransformer2DModel",
            pipeline_classes=("QwenImagePipeline",),  # the Edit pipelines' processor needs torchvision here
            stacks=("transformer_blocks",),
            cfg_layout="separate",
            task="text-to-image",
            guidance="true_cfg",  # the combine is followed by a rescale to the cond norm: λ is approximate there
            latent_packing=2,
            self_attention="attn",  # joint [text, image] attention
            text_first=True,
        ),
        ModelAdapter(
            family="zimage",
            transformer_class="ZImageTransformer2DModel",
            pipeline_classes=("ZImagePipeline",),
            # image tokens refined, text tokens refined, then the joint [image, text] layers
            stacks=("noise_refiner", "context_refiner", "layers"),
            cfg_layout="batch",
            batch_order="cond_first",
            guidance_offset=1.0,
            timestep_argument="t",
            latent_packing=2,
            task="text-to-image",
            block_metadata=(("ZImageTransformerBlock", TransformerBlockMetadata(
                return_hidden_states_index=0, return_encoder_hidden_states_index=None,
                hidden_states_argument_name="x")),),
        ),
        ModelAdapter(
            family="pixart",
            transformer_class="PixArtTransformer2DModel",
            pipeline_classes=("PixArtSigmaPipeline",),
            stacks=("transformer_blocks",),
            cfg_layout="batch",
            task="text-to-image",
            self_attention="attn1",  # image tokens only; attn2 is cross-attention to the text
        ),
        ModelAdapter(
            family="hunyuanvideo15",
            flow_output=True,
            transformer_class="HunyuanVideo15Transformer3DModel",
            pipeline_classes=("HunyuanVideo15Pipeline", "HunyuanVideo15ImageToVideoPipeline"),
            stacks=("transformer_blocks",),
            cfg_layout="separate",  # the guider's "pred_cond" / "pred_uncond" contexts
            guidance="guider",
            task="text-to-video",
            block_metadata=(("HunyuanVideo15TransformerBlock", TransformerBlockMetadata(
                return_hidden_states_index=0, return_encoder_hidden_states_index=1)),),
        ),
        ModelAdapter(
            family="ltx",
            transformer_class="LTXVideoTransformer3DModel",
            pipeline_classes=("LTXPipeline", "LTXImageToVideoPipeline"),
            stacks=("transformer_blocks",),
            cfg_layout="batch",  # under cache_context("cond_uncond")
            task="text-to-video",
            self_attention="attn1",  # video tokens only; attn2 is cross-attention to the text
        ),
        ModelAdapter(
            family="cogvideox",
            transformer_class="CogVideoXTransformer3DModel",
            pipeline_classes=("CogVideoXPipeline",),
            stacks=("transformer_blocks",),
            cfg_layout="batch",  # under cache_context("cond_uncond")
            task="text-to-video",
            self_attention="attn1",  # joint [text, video] attention
            text_first=True,
        ),
        ModelAdapter(
            family="sd3",
            flow_output=True,
            transformer_class="SD3Transformer2DModel",
            pipeline_classes=("StableDiffusion3Pipeline",),
            stacks=("transformer_blocks",),
            cfg_layout="batch",
            task="text-to-image",
            skip_layers_argument="skip_layers",
        ),
    )
}


# What a pipeline class does, when it is not its family's text-to-X task: the input images its call takes
# (`image=`, one or a list) make it an editing or an image-to-video pipeline. FLUX.2 both generates and edits (its
# `image=` is a list of reference images).
PIPELINE_TASKS: dict[str, tuple[str, ...]] = {
    "FluxKontextPipeline": ("image-edit",),
    "QwenImageEditPipeline": ("image-edit",),
    "QwenImageEditPlusPipeline": ("image-edit",),
    "Flux2Pipeline": ("text-to-image", "image-edit"),
    "Flux2KleinPipeline": ("text-to-image", "image-edit"),
    "WanImageToVideoPipeline": ("image-to-video",),
    "HunyuanVideo15ImageToVideoPipeline": ("image-to-video",),
    "LTXImageToVideoPipeline": ("image-to-video",),
    "CogVideoXImageToVideoPipeline": ("image-to-video",),
}
# how many input images a pipeline's `image=` takes (1 unless listed)
PIPELINE_MAX_IMAGES: dict[str, int] = {"QwenImageEditPlusPipeline": 3, "Flux2Pipeline": 4, "Flux2KleinPipeline": 4}


def _by_pipeline_class(pipe: Any, table: dict[str, Any]) -> Any:
    """`table`'s entry for the pipeline's class (wrapped pipeline classes are subclasses of the diffusers class)."""
    for cls in type(pipe).__mro__:
        if cls.__name__ in table:
            return table[cls.__name__]
    return None


def pipeline_tasks(pipe: Any) -> tuple[str, ...]:
    """The tasks a pipeline can serve: its class's (`PIPELINE_TASKS`), else its family's."""
    return _by_pipeline_class(pipe, PIPELINE_TASKS) or (adapter_for(pipe).task,)


def pipeline_max_images(pipe: Any) -> int:
    """How many input images one call of the pipeline takes (`PIPELINE_MAX_IMAGES`, else 1)."""
    return _by_pipeline_class(pipe, PIPELINE_MAX_IMAGES) or 1


# block classes whose metadata the adapters give (missing from diffusers' registry, or wrong there)
BLOCK_METADATA: dict[str, TransformerBlockMetadata] = {
    name: meta for adapter in ADAPTERS.values() for name, meta in adapter.block_metadata
}


def parse_block_name(name: str, sizes: dict[str, int], field: str) -> tuple[str, int]:
    """"stack.index" -> (stack, index), checked against the stacks' sizes; a SpecError for `field` naming the
    blocks that exist otherwise. The one parser of block names (prune, S², plan files)."""
    stack, _, index = name.rpartition(".")
    if stack not in sizes or not index.isdigit() or int(index) >= sizes[stack]:
        raise SpecError(f"{field}: no block {name!r}; blocks are "
                        + ", ".join(f"{s}.0..{s}.{n - 1}" for s, n in sizes.items()), field=field)
    return stack, int(index)


def supported_families() -> str:
    return ", ".join(f"{a.family} ({a.transformer_class})" for a in ADAPTERS.values())


@functools.cache
def _note_unchecked(adapter: ModelAdapter, pipeline_class: str) -> None:
    """Once per pipeline class: a pipeline of a known family whose call layout the tests have not checked
    (`ModelAdapter.pipeline_classes`, the conformance matrix) works, but is said to be unchecked."""
    if pipeline_class not in adapter.pipeline_classes:
        log.warning("%s: a %s pipeline not in the checked list (%s); accelerators apply, results are unverified",
                    pipeline_class, adapter.family, ", ".join(adapter.pipeline_classes))


def adapter_for(pipe_or_transformer: Any) -> ModelAdapter:
    """The adapter for a pipeline or a transformer; a clear error naming what is supported otherwise."""
    transformer = getattr(pipe_or_transformer, "transformer", pipe_or_transformer)
    if transformer is None:
        raise UnsupportedModelError(
            f"{type(pipe_or_transformer).__name__} has no transformer; supported families: {supported_families()}"
        )
    name = type(transformer).__name__
    for adapter in ADAPTERS.values():
        if adapter.transformer_class == name:
            if transformer is not pipe_or_transformer:
                _note_unchecked(adapter, type(pipe_or_transformer).__name__)
            return adapter
    raise UnsupportedModelError(f"unsupported transformer {name}; supported families: {supported_families()}")


class BlockIO:
    """Reads a block's hidden states from its call and builds its return value, for one block class.

    A thin wrapper over diffusers' `TransformerBlockMetadata` so accelerators handle dual-stream blocks (which
    return image and text streams, in a class-specific order) and single-stream blocks the same way.
    """

    def __init__(self, block: torch.nn.Module):
        meta = BLOCK_METADATA.get(type(block).__name__)
        if meta is None:
            try:
                meta = TransformerBlockRegistry.get(type(block))
            except ValueError as exc:
                raise UnsupportedModelError(f"block class {type(block).__name__} is not registered with diffusers") from exc
        self.meta: TransformerBlockMetadata = meta
        self._forward = type(block).forward
        self.has_encoder_stream = self.meta.return_encoder_hidden_states_index is not None

    def _arg(self, name: str, args: tuple, kwargs: dict) -> Any:
        return call_argument(self._forward, name, args, kwargs)

    def inputs(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden_states, encoder_hidden_states or None) as passed to the block."""
        hidden = self._arg(self.meta.hidden_states_argument_name, args, kwargs)
        encoder = self._arg(self.meta.encoder_hidden_states_argument_name, args, kwargs) if self.has_encoder_stream else None
        return hidden, encoder

    def outputs(self, output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden_states, encoder_hidden_states or None) from what the block returned."""
        if not isinstance(output, tuple):
            return output, None
        hidden = output[self.meta.return_hidden_states_index]
        encoder = output[self.meta.return_encoder_hidden_states_index] if self.has_encoder_stream else None
        return hidden, encoder

    def identity_output(self, block: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        """What a skipped block returns: its inputs, in its own output structure (a block that returns no text
        stream, SD3's last (`context_pre_only`), returns None for it)."""
        hidden, encoder = self.inputs(args, kwargs)
        if getattr(block, "context_pre_only", False):
            encoder = None
        return self.make_output(hidden, encoder)

    def make_output(self, hidden: torch.Tensor, encoder: torch.Tensor | None) -> Any:
        """A return value shaped like the block's own."""
        if not self.has_encoder_stream:
            return hidden
        result: list[Any] = [None, None]
        result[self.meta.return_hidden_states_index] = hidden
        result[self.meta.return_encoder_hidden_states_index] = encoder
        return tuple(result)


def unwrap_denoiser_output(output: Any) -> tuple[torch.Tensor, Any]:
    """(sample tensor, function rebuilding the transformer's return structure around a tensor).

    Transformers return a tensor, a tuple `(sample, ...)` (`return_dict=False`, what pipelines use), an output
    dataclass with `.sample`, or (Z-Image) a list of per-item samples in that tuple, stacked here into one batch;
    methods that replace a denoiser output keep the structure the pipeline expects."""
    if isinstance(output, torch.Tensor):
        return output, lambda t: t
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], (list, tuple)):
        items = output[0]  # per-item samples of one shape (one resolution per call)
        rest = output[1:]
        return torch.stack(list(items)), lambda t: (list(t.unbind(0)), *rest)
    if isinstance(output, tuple):
        return output[0], lambda t: (t, *output[1:])
    return output.sample, lambda t: type(output)(sample=t)
