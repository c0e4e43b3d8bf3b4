"""Shared test helpers: one plain call of a tiny pipeline with fixed, small settings."""

import numpy as np
import torch

# per family: small settings and the kwargs that switch classifier-free guidance on
SMALL = {
    "tiny-flux": dict(height=64, width=64, num_inference_steps=4),
    "tiny-wan": dict(height=32, width=32, num_frames=5, num_inference_steps=4, guidance_scale=1.0),
    "tiny-sd3": dict(height=64, width=64, num_inference_steps=4, guidance_scale=1.0),
}
CFG = {
    "tiny-flux": dict(true_cfg_scale=2.0, negative_prompt="blurry"),
    "tiny-wan": dict(guidance_scale=3.0, negative_prompt="blurry"),
    "tiny-sd3": dict(guidance_scale=3.0, negative_prompt="blurry"),
}


def run(pipe, name, *, prompt="a red circle on the left", seed=0, cfg=False, batch=1, **overrides):
    kwargs = dict(SMALL[name])
    if cfg:
        kwargs.update(CFG[name])
    kwargs.update(overrides)
    if batch > 1:
        prompt = [prompt, "a blue square at the top"][:batch] + [prompt] * max(0, batch - 2)
        if "negative_prompt" in kwargs:
            kwargs["negative_prompt"] = [kwargs["negative_prompt"]] * batch
    out = pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs)
    return np.asarray(out.frames if hasattr(out, "frames") else out.images)


def registries_empty(module: torch.nn.Module) -> bool:
    """True when no diffusers hook is left anywhere under `module`."""
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        if registry is not None and registry.hooks:
            return False
    return getattr(module, "_cache_config", None) is None


def assert_eval_fp32(pipe) -> None:
    """Every module of a built pipeline is in eval mode (no dropout) and fp32."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            assert not component.training
            assert all(p.dtype == torch.float32 for p in component.parameters())
