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
from dataclasses import dataclass
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
    cfg_layout: how the pipeline runs classifier-free guidance: "separate" (one transformer call per branch inside
        `cache_context("cond"/"uncond")`), or "batch" (one call on `cat([uncond, cond])`).
    guidance: where the scale λ of the pipeline's CFG combine comes from (`cfg_scale`): "true_cfg" (FLUX:
        `true_cfg_scale` with a negative prompt; its embedded `guidance_scale` is no combine), "cfg"
        (`guidance_scale`, and Wan 2.2's `guidance_scale_2` below the expert boundary).
    self_attention: attribute of a block's self-attention module (the one attention methods may change), or None
        where no attention method supports the family yet.
    text_first: whether text tokens lead that attention's sequence (FLUX's joint [text, image] attention).
    mag_ratios: published per-step magnitude ratios of the family's reference checkpoint (MagCache's default).
    skip_layers_argument: the transformer's argument naming blocks it skips by itself (SD3's skip-layer guidance):
        those are not counted as block forwards a plain run makes.
    """

    family: str
    transformer_class: str
    pipeline_classes: tuple[str, ...]  # pipelines whose call layout the conformance tests check
    stacks: tuple[str, ...]
    cfg_layout: Literal["separate", "batch"]
    task: Literal["text-to-image", "text-to-video"]
    guidance: Literal["true_cfg", "cfg"] = "cfg"
    self_attention: str | None = None
    text_first: bool = False
    mag_ratios: tuple[float, ...] | None = None
    skip_layers_argument: str | None = None  # the transformer's argument listing blocks it skips itself (SD3's SLG)
    unbatched_arguments: tuple[str, ...] = ()  # the transformer's tensor arguments without a batch dimension

    def block_stacks(self, transformer: torch.nn.Module) -> dict[str, torch.nn.ModuleList]:
        return {name: getattr(transformer, name) for name in self.stacks}

    def block_sizes(self, transformer: torch.nn.Module) -> dict[str, int]:
        return {name: len(getattr(transformer, name)) for name in self.stacks}

    def cfg_scale(self, pipe: Any, call_kwargs: dict[str, Any] | None, timestep: float) -> float | None:
        """λ of the CFG combine that follows the current denoiser call, or None when none follows. `call_kwargs`:
        the running pipeline call's arguments with its defaults (`AccelSession.call_kwargs`; None when the
        transformer is called outside a pipeline call); `timestep` on the 0..1000 scale."""
        if self.guidance == "true_cfg":
            if call_kwargs is None:
                return None
            negative = call_kwargs.get("negative_prompt") is not None or (
                call_kwargs.get("negative_prompt_embeds") is not None
                and call_kwargs.get("negative_pooled_prompt_embeds") is not None
            )
            scale = float(call_kwargs.get("true_cfg_scale") or 1.0)
            return scale if scale > 1 and negative else None
        if not getattr(pipe, "do_classifier_free_guidance", False):
            return None
        if call_kwargs is None:
            return float(pipe.guidance_scale)
        scale = call_kwargs["guidance_scale"]
        boundary = pipe.config.get("boundary_ratio") if hasattr(pipe.config, "get") else None
        if boundary is not None and timestep < boundary * pipe.scheduler.config.num_train_timesteps:
            second = call_kwargs.get("guidance_scale_2")  # Wan 2.2: the low-noise expert's scale
            scale = second if second is not None else scale
        return float(scale)

    def size_multiple(self, pipe: Any) -> int:
        """Height and width must be multiples of this: the VAE's spatial factor times the transformer's patch."""
        vae_factor = getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_scale_factor", 8)
        config = pipe.transformer.config
        patch = config.get("patch_size", 2) if hasattr(config, "get") else getattr(config, "patch_size", 2)
        if isinstance(patch, (list, tuple)):  # Wan: (t, h, w)
            patch = patch[-1]
        if self.family == "flux":  # FLUX packs 2x2 latent patches; patch_size in its config is 1
            patch = 2
        return int(vae_factor) * int(patch)


ADAPTERS: dict[str, ModelAdapter] = {
    adapter.family: adapter
    for adapter in (
        ModelAdapter(
            family="flux",
            transformer_class="FluxTransformer2DModel",
            pipeline_classes=("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline", "FluxKontextPipeline"),
            stacks=("transformer_blocks", "single_transformer_blocks"),
            cfg_layout="separate",
            task="text-to-image",
            guidance="true_cfg",
            unbatched_arguments=("img_ids", "txt_ids"),  # (tokens, 3) position ids, shared by the batch
            self_attention="attn",  # joint [text, image] attention in dual and single blocks
            text_first=True,
            mag_ratios=tuple(float(r) for r in FLUX_MAG_RATIOS),
        ),
        ModelAdapter(
            family="wan",
            transformer_class="WanTransformer3DModel",
            pipeline_classes=("WanPipeline",),
            stacks=("blocks",),
            cfg_layout="separate",
            task="text-to-video",
            self_attention="attn1",  # self-attention over video tokens; attn2 (cross-attention to text) untouched
        ),
        ModelAdapter(
            family="sd3",
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


def pipeline_tasks(pipe: Any) -> tuple[str, ...]:
    """The tasks a pipeline can serve: its class's (`PIPELINE_TASKS`), else its family's."""
    for cls in type(pipe).__mro__:  # wrapped pipeline classes are subclasses of the diffusers class
        if cls.__name__ in PIPELINE_TASKS:
            return PIPELINE_TASKS[cls.__name__]
    return (adapter_for(pipe).task,)


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
        try:
            self.meta: TransformerBlockMetadata = TransformerBlockRegistry.get(type(block))
        except ValueError as exc:
            raise UnsupportedModelError(f"block class {type(block).__name__} is not registered with diffusers") from exc
        self.meta._cls = type(block)
        params = list(inspect.signature(type(block).forward).parameters)[1:]
        self._index = {name: i for i, name in enumerate(params)}
        self.has_encoder_stream = self.meta.return_encoder_hidden_states_index is not None

    def _arg(self, name: str, args: tuple, kwargs: dict) -> Any:
        if name in kwargs:
            return kwargs[name]
        index = self._index.get(name)
        return args[index] if index is not None and index < len(args) else None

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

    Transformers return a tensor, a tuple `(sample, ...)` (`return_dict=False`, what pipelines use) or an output
    dataclass with `.sample`; methods that replace a denoiser output keep the structure the pipeline expects."""
    if isinstance(output, torch.Tensor):
        return output, lambda t: t
    if isinstance(output, tuple):
        return output[0], lambda t: (t, *output[1:])
    return output.sample, lambda t: type(output)(sample=t)
