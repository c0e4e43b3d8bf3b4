"""diffusers' own caches as per-call methods: `fbcache`, `taylorseer`, `magcache`.

They are the in-process peers our caches are measured against. Wrapping them behind the same interface lets a
request pick them per call and lets `accel bench` run them side by side with ours. Because the session sets a
full cache context on every call, they also work on pipelines that set none (SD3, PixArt), where
`transformer.enable_cache` alone fails with "No cache context is set".
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from diffusers.hooks import (
    FirstBlockCacheConfig,
    HookRegistry,
    MagCacheConfig,
    TaylorSeerCacheConfig,
    apply_first_block_cache,
    apply_mag_cache,
    apply_taylorseer_cache,
)
from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK
from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK, _MAG_CACHE_LEADER_BLOCK_HOOK
from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK
from pydantic import Field

from accel.adapters import ADAPTERS
from accel.base import Counters, Method, MethodConfig, MethodHandle
from accel.errors import SpecError
from accel.session import AccelSession


class FBCacheConfig(MethodConfig):
    """First Block Cache (ParaAttention; diffusers `FirstBlockCacheConfig`)."""

    method: Literal["fbcache"] = "fbcache"
    threshold: float = Field(
        0.05,
        ge=0.0,
        le=1.0,
        description="Skip the remaining blocks when the relative L1 change of the first block's residual is at or "
        "under this (0 recomputes every step). Default 0.05; range 0-1.",
    )


class TaylorSeerConfig(MethodConfig):
    """TaylorSeer (diffusers `TaylorSeerCacheConfig`): Taylor-extrapolated block outputs between full steps."""

    method: Literal["taylorseer"] = "taylorseer"
    cache_interval: int = Field(5, ge=1, le=100, description="Full computation every this many steps. Default 5.")
    disable_cache_before_step: int = Field(3, ge=0, description="Compute every step before this one. Default 3.")
    disable_cache_after_step: int | None = Field(None, ge=0, description="Compute every step after this one.")
    max_order: int = Field(1, ge=0, le=4, description="Order of the Taylor extrapolation. Default 1.")
    factors_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="dtype of the stored Taylor factors (diffusers defaults to bfloat16)."
    )
    lite: bool = Field(False, description="TaylorSeer-Lite: cache only the final projection.")


class MagCachePeerConfig(MethodConfig):
    """MagCache (diffusers `MagCacheConfig`): skip steps while the accumulated magnitude-ratio error is small."""

    method: Literal["magcache"] = "magcache"
    threshold: float = Field(0.06, ge=0.0, le=1.0, description="Accumulated error allowed. Default 0.06.")
    max_skip_steps: int = Field(3, ge=1, le=50, description="Most consecutive skipped steps. Default 3.")
    retention_ratio: float = Field(0.2, ge=0.0, le=1.0, description="Leading fraction of steps never skipped.")
    mag_ratios: list[float] | None = Field(
        None,
        description="Per-step magnitude ratios of this checkpoint; default: diffusers' FLUX ratios on the flux "
        "family, required elsewhere (or calibrate=true).",
    )
    calibrate: bool = Field(False, description="Skip nothing; log this model's magnitude ratios.")


@dataclass
class ModuleCounters(Counters):
    """TaylorSeer predicts attention / feed-forward outputs *inside* blocks, so block counts do not show its
    savings; these counts of the hooked modules' calls do, exactly."""

    module_forwards_total: int = 0  # calls the hooked modules received
    module_forwards_computed: int = 0  # of those, calls that ran the module's real forward


def _enable(session: AccelSession, apply_fn, config, hook_names: tuple[str, ...],
            counters: Counters | None = None, count_hook: str | None = None) -> MethodHandle:
    """Apply one of diffusers' caches with its own `apply_*` function (not every transformer has `enable_cache`,
    e.g. SD3's lacks `CacheMixin`) to every transformer of the pipeline, and remove its hooks by name on exit.
    With `count_hook`, the calls of every module carrying that hook are counted into `counters` for the call."""
    undo = []

    def remove() -> None:  # counting wrappers first: removing a hook hands its forward back to the module
        for step in undo:
            step()

    try:
        for transformer in session.transformers.values():
            registry = HookRegistry.check_if_exists_or_initialize(transformer)
            undo.extend(functools.partial(registry.remove_hook, name, recurse=True) for name in hook_names)
            apply_fn(transformer, config)
            if count_hook is not None:
                undo.insert(0, _count_hooked_calls(transformer, count_hook, counters))
    except Exception:
        remove()  # a failure on a later transformer leaves no hook on the earlier ones
        raise
    return MethodHandle(counters or Counters(), on_remove=remove)


def apply_fbcache(session: AccelSession, config: FBCacheConfig) -> MethodHandle:
    return _enable(
        session,
        apply_first_block_cache,
        FirstBlockCacheConfig(threshold=config.threshold),
        (_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK),
    )


def _count_hooked_calls(transformer: torch.nn.Module, hook_name: str, counters: ModuleCounters) -> Callable[[], None]:
    """Count, for every module carrying `hook_name`, the calls it saw and the ones that ran the real forward;
    return the function that takes the counting wrappers off again."""
    wrapped = []
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        hook = registry.get_hook(hook_name) if registry is not None else None
        if hook is None:
            continue
        ref = hook.fn_ref
        wrapped.append((ref, ref.forward, ref.original_forward))
        ref.forward = _counting(ref.forward, counters, "module_forwards_total")
        ref.original_forward = _counting(ref.original_forward, counters, "module_forwards_computed")

    def unwrap() -> None:
        for ref, forward, original in wrapped:
            ref.forward, ref.original_forward = forward, original

    return unwrap


def _counting(fn, counters: ModuleCounters, key: str):
    def wrapper(*args, **kwargs):
        setattr(counters, key, getattr(counters, key) + 1)
        return fn(*args, **kwargs)

    return wrapper


def apply_taylorseer(session: AccelSession, config: TaylorSeerConfig) -> MethodHandle:
    return _enable(
        session,
        apply_taylorseer_cache,
        TaylorSeerCacheConfig(
            cache_interval=config.cache_interval,
            disable_cache_before_step=config.disable_cache_before_step,
            disable_cache_after_step=config.disable_cache_after_step,
            max_order=config.max_order,
            taylor_factors_dtype=getattr(torch, config.factors_dtype),
            use_lite_mode=config.lite,
        ),
        (_TAYLORSEER_CACHE_HOOK,),
        counters=ModuleCounters(),
        count_hook=_TAYLORSEER_CACHE_HOOK,
    )


def apply_magcache(session: AccelSession, config: MagCachePeerConfig) -> MethodHandle:
    ratios = config.mag_ratios if config.mag_ratios is not None else session.adapter.mag_ratios
    if ratios is None and not config.calibrate:
        raise SpecError(
            f"magcache.mag_ratios: required for the {session.adapter.family} family (or set calibrate=true)",
            field="magcache.mag_ratios",
        )
    steps = session.plan.num_steps if session.plan and session.plan.num_steps else 28
    return _enable(
        session,
        apply_mag_cache,
        MagCacheConfig(
            threshold=config.threshold,
            max_skip_steps=config.max_skip_steps,
            retention_ratio=config.retention_ratio,
            num_inference_steps=steps,
            mag_ratios=ratios,
            calibrate=config.calibrate,
        ),
        (_MAG_CACHE_LEADER_BLOCK_HOOK, _MAG_CACHE_BLOCK_HOOK),
    )


# diffusers' FBCache differences the first block's outputs as its registry describes them. It fails on SD3 (the last
# block (context_pre_only) returns None for the text stream), FLUX.2 (the single-stream blocks return the joint
# sequence alone) and the families whose blocks diffusers' registry lacks or misdescribes (Z-Image, HunyuanVideo
# 1.5); the conformance matrix runs it on every other family.
FBCACHE = Method(
    "fbcache", FBCacheConfig, apply_fbcache, "diffusers First Block Cache (peer)", exclusive="cache",
    families=("flux", "wan", "qwen-image", "pixart", "ltx", "cogvideox"), batch_invariant=False,  # skips when the batch's first-block residual changes little
)
TAYLORSEER = Method("taylorseer", TaylorSeerConfig, apply_taylorseer, "diffusers TaylorSeer (peer)", exclusive="cache")
MAGCACHE = Method(
    "magcache", MagCachePeerConfig, apply_magcache, "diffusers MagCache (peer)", exclusive="cache",
    # diffusers' MagCache reads blocks through its TransformerBlockRegistry, which lacks or misdescribes the block
    # classes the adapters describe themselves (HunyuanVideo 1.5's, Z-Image's)
    families=tuple(adapter.family for adapter in ADAPTERS.values() if not adapter.block_metadata),
)
