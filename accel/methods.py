"""The one place that lists the accelerators and the order in which they are applied.

Order matters because hooks nest: a method applied earlier sits *inside* one applied later on the same module.
From inner to outer:
  1. structural methods that change which blocks exist or run (pruning, sub-network guidance);
  2. attention methods (they replace attention processors inside blocks);
  3. block-level feature caches (skip or predict whole blocks);
  4. denoiser-level caches (skip the whole transformer call).
The step tracker is always outermost. Add a new method to `METHODS` at its place in this order.
"""

from __future__ import annotations

from accel.base import Method
from accel.attention import sparse
from accel.caching import abcache, abcache_adaptive, cachedit_peer, diffusers_peers, sortblock
from accel.guidance import s2
from accel.pruning import prune

METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        prune.PRUNE,
        s2.S2,
        sparse.SPARSE_ATTENTION,
        sortblock.SORTBLOCK,
        diffusers_peers.FBCACHE,
        diffusers_peers.TAYLORSEER,
        diffusers_peers.MAGCACHE,
        cachedit_peer.DBCACHE,
        abcache.ABCACHE,
        abcache_adaptive.ABCACHE_ADAPTIVE,
    )
}

APPLICATION_ORDER: tuple[str, ...] = tuple(METHODS)
