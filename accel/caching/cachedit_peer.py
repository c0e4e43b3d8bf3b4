"""cache-dit's DBCache as a per-call method, `dbcache`: an out-of-tree peer measured side by side with ours.

Optional: needs the `cache-dit` package (in the `dev` and `peers` extras). cache-dit patches the pipeline itself,
so it is applied when the `accelerate` block is entered (not at the first denoiser call) and removed on exit with
`cache_dit.disable_cache`, which restores bit-identical output.
"""

from __future__ import annotations

import logging
from typing import Literal

from pydantic import Field

from accel.base import Method, MethodConfig, MethodHandle
from accel.errors import SpecError
from accel.session import AccelSession


class DBCacheConfig(MethodConfig):
    """cache-dit DBCache: the first Fn and last Bn blocks always run; the rest is skipped while the residual of
    the first Fn blocks changes by at most `threshold` (relative L1)."""

    method: Literal["dbcache"] = "dbcache"
    Fn: int = Field(8, ge=1, le=100, description="Leading blocks always computed (cache-dit default 8).")
    Bn: int = Field(0, ge=0, le=100, description="Trailing blocks always computed (default 0).")
    threshold: float = Field(0.08, ge=0.0, le=10.0, description="Residual difference threshold (default 0.08).")
    warmup_steps: int = Field(8, ge=0, le=1000, description="Leading steps always computed (default 8).")
    max_continuous_cached_steps: int = Field(-1, ge=-1, description="Most consecutive cached steps (-1: no limit).")
    taylorseer: bool = Field(False, description="Use cache-dit's TaylorSeer calibrator (order 1).")


def apply_dbcache(session: AccelSession, config: DBCacheConfig) -> MethodHandle:
    try:
        import cache_dit
    except ImportError:
        raise SpecError("dbcache: needs the optional package cache-dit (pip install 'diffusion-accel[peers]')",
                        field="dbcache") from None
    smallest = min(session.stack_sizes.values())
    if config.Fn + config.Bn >= smallest:
        raise SpecError(f"dbcache.Fn: Fn + Bn ({config.Fn} + {config.Bn}) must be less than the {smallest} blocks of "
                        "this model's smallest block stack", field="dbcache.Fn")
    logging.getLogger("cache_dit").setLevel(logging.WARNING)
    calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1) if config.taylorseer else None
    try:
        cache_dit.enable_cache(
            session.pipe,
            cache_config=cache_dit.DBCacheConfig(
                Fn_compute_blocks=config.Fn,
                Bn_compute_blocks=config.Bn,
                residual_diff_threshold=config.threshold,
                max_warmup_steps=config.warmup_steps,
                max_continuous_cached_steps=config.max_continuous_cached_steps,
            ),
            calibrator_config=calibrator,
        )
    except Exception:
        cache_dit.disable_cache(session.pipe)  # leave no half-patched pipeline behind
        raise
    return MethodHandle(on_remove=lambda: cache_dit.disable_cache(session.pipe))


DBCACHE = Method(
    "dbcache", DBCacheConfig, apply_dbcache, "cache-dit DBCache (out-of-tree peer; optional package)",
    exclusive="cache", at_attach=True, batch_invariant=False,  # skips when the batch's residual changes little
)
