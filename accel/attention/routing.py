"""Route one attention module's attention computation through a method's own function, for one call.

The module's processor is replaced by a thin wrapper that runs the *original processor's own `__call__` code*
(same code object, so QK-norm, RoPE and the text-token concatenation are exactly the model's) with one name rebound
in a private copy of its globals: `dispatch_attention_fn` -> the router (or `F`, for processors calling
`F.scaled_dot_product_attention` themselves). Nothing global is patched, so other
pipelines in the process are untouched. The router receives `dispatch_attention_fn`'s arguments and finds the
original function in `router.original` (for the calls it does not handle). The swap is made by a diffusers hook
on the block (`initialize_hook` / `deinitalize_hook`) registered through the session, so it is undone on exit.
"""

from __future__ import annotations

import functools
import inspect
import types
from typing import Any

import torch
from diffusers.hooks import ModelHook

from accel.errors import UnsupportedModelError


def _rebound_call(processor: Any, router: Any):
    """The processor class's own `__call__` code with its attention function resolved to `router`:
    `dispatch_attention_fn` (layout (B, S, H, D)), or, for processors that call `F.scaled_dot_product_attention`
    directly (PixArt's and CogVideoX's, layout (B, H, S, D)), `F` replaced by a view of torch.nn.functional whose
    `scaled_dot_product_attention` transposes to the router's layout and back."""
    function = type(processor).__call__
    code = function.__code__
    namespace = dict(function.__globals__)
    if "dispatch_attention_fn" in code.co_names:
        router.original = namespace["dispatch_attention_fn"]
        namespace["dispatch_attention_fn"] = router
    elif "scaled_dot_product_attention" in code.co_names and namespace.get("F") is torch.nn.functional:
        router.original = _heads_second(torch.nn.functional.scaled_dot_product_attention)
        namespace["F"] = _FunctionalWithRouter(router)
    else:
        raise UnsupportedModelError(
            f"{type(processor).__name__} calls neither dispatch_attention_fn nor F.scaled_dot_product_attention; "
            "cannot route its attention"
        )
    rebound = types.FunctionType(code, namespace, function.__name__, function.__defaults__, function.__closure__)
    rebound.__kwdefaults__ = function.__kwdefaults__
    return functools.partial(rebound, processor)


def _heads_second(sdpa):
    """`sdpa` (heads second) called with dispatch_attention_fn's layout, heads third, and returning it."""

    def call(query, key, value, attn_mask=None, *args, **kwargs):
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        return sdpa(q, k, v, attn_mask, *args, **kwargs).transpose(1, 2)

    return call


class _FunctionalWithRouter(types.ModuleType):
    """torch.nn.functional, except `scaled_dot_product_attention`, which goes through the router."""

    def __init__(self, router: Any):
        super().__init__("torch.nn.functional")
        self._router = router

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.nn.functional, name)

    def scaled_dot_product_attention(self, query, key, value, attn_mask=None, *args, **kwargs):
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        return self._router(q, k, v, attn_mask, *args, **kwargs).transpose(1, 2)


class RoutedProcessor:
    """Calls the original processor's code with attention routed to the router. Its `__call__` signature is the
    original's (the attention module filters keyword arguments by it), see `_processor_class`."""

    def __init__(self, original: Any, router: Any):
        self.original, self.router = original, router
        self._call = _rebound_call(original, router)

    def __getattr__(self, name: str) -> Any:  # _attention_backend, _parallel_config, ... of the original
        return getattr(self.__dict__["original"], name)


@functools.cache
def _processor_class(original_cls: type) -> type:
    def __call__(self, *args, **kwargs):
        return self._call(*args, **kwargs)

    __call__.__signature__ = inspect.signature(original_cls.__call__)
    return type(f"Routed{original_cls.__name__}", (RoutedProcessor,), {"__call__": __call__})


class AttentionRoutingHook(ModelHook):
    """On a block: routes `attention`'s processor through `router` while the hook is registered."""

    def __init__(self, attention: torch.nn.Module, router: Any):
        super().__init__()
        self.attention, self.router = attention, router
        self.original = None

    def initialize_hook(self, module):
        self.original = self.attention.processor
        self.attention.set_processor(_processor_class(type(self.original))(self.original, self.router))
        return module

    def deinitalize_hook(self, module):
        if self.original is not None:
            self.attention.set_processor(self.original)
            self.original = None
        return module
