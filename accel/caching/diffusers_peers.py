"""diffusers' own caches as per-call methods: `fbcache`, `taylorseer`, `magcache`.

They are the in-process peers our caches are measured against. Wrapping them behind the same interface lets a
request pick them per call and lets `accel bench` run them side by side with ours. Because the session sets a
full cache context on every call, they also work on pipelines that set none (SD3, PixArt), where
`transformer.enable_cache` alone fails with "No cache context is set".
"""

from __future__ import annotations

from typing import Literal

import torch
from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig
from pydantic import Field

from accel.apply import AccelSession
from accel.base import Method, MethodConfig, MethodHandle
from accel.errors import SpecError


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


def _enable(session: AccelSession, config) -> MethodHandle:
    transformer = session.transformer
    transformer.enable_cache(config)
    return MethodHandle(on_remove=transformer.disable_cache)


def apply_fbcache(session: AccelSession, config: FBCacheConfig) -> MethodHandle:
    return _enable(session, FirstBlockCacheConfig(threshold=config.threshold))


def apply_taylorseer(session: AccelSession, config: TaylorSeerConfig) -> MethodHandle:
    return _enable(
        session,
        TaylorSeerCacheConfig(
            cache_interval=config.cache_interval,
            disable_cache_before_step=config.disable_cache_before_step,
            disable_cache_after_step=config.disable_cache_after_step,
            max_order=config.max_order,
            taylor_factors_dtype=getattr(torch, config.factors_dtype),
            use_lite_mode=config.lite,
        ),
    )


def apply_magcache(session: AccelSession, config: MagCachePeerConfig) -> MethodHandle:
    ratios = config.mag_ratios
    if ratios is None and not config.calibrate:
        if session.adapter.family != "flux":
            raise SpecError(
                f"magcache.mag_ratios: required for the {session.adapter.family} family (or set calibrate=true)"
            )
        from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

        ratios = FLUX_MAG_RATIOS
    steps = session.plan.num_steps if session.plan and session.plan.num_steps else 28
    return _enable(
        session,
        MagCacheConfig(
            threshold=config.threshold,
            max_skip_steps=config.max_skip_steps,
            retention_ratio=config.retention_ratio,
            num_inference_steps=steps,
            mag_ratios=ratios,
            calibrate=config.calibrate,
        ),
    )


FBCACHE = Method("fbcache", FBCacheConfig, apply_fbcache, "diffusers First Block Cache (peer)", exclusive="cache")
TAYLORSEER = Method("taylorseer", TaylorSeerConfig, apply_taylorseer, "diffusers TaylorSeer (peer)", exclusive="cache")
MAGCACHE = Method("magcache", MagCachePeerConfig, apply_magcache, "diffusers MagCache (peer)", exclusive="cache")
