"""Calibration: score every transformer block on a few prompts, seeds and all denoising steps of their runs.

Scores, per block (higher = more important; the plan removes the lowest first):
- influence (ShortGPT, arXiv 2403.03853): 1 - cos(x_in, x_out), cosine per token of the block's image stream,
  averaged over tokens, batch items, steps and calibration runs;
- angular (Gromov et al., arXiv 2403.17887): for every contiguous run of n blocks l..l+n-1 of a stack,
  d = arccos(cos(x_l, x_{l+n})) / pi (per token, then averaged as above); x_l is the input of block l and
  x_N the stack's output. Stored per stack and n; the plan removes the run with the smallest d;
- drop_one: ||z - z_full|| / ||z_full||, the relative change of the final latent when that block alone is skipped
  (a whole pipeline run per block, same prompt and seed), averaged over the runs.
The image stream (`hidden_states`) is the state measured: it is the one the VAE decodes. Every run uses the
model's defaults (size, guidance) with `steps` steps and generators seeded 0..seeds-1: the result is
deterministic. Protected blocks (see `accel.pruning.plan`) get influence and angular scores but no drop-one run.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from accel.adapters import adapter_for
from accel.apply import accelerate
from accel.pruning.plan import Plan, block_sizes, fingerprint, protected_blocks


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine per token, [batch, tokens], in fp32."""
    return F.cosine_similarity(a.float().flatten(0, -2), b.float().flatten(0, -2), dim=-1).clamp(-1.0, 1.0)


class _StateRecorder:
    """Native forward hooks: per denoiser call, the image-stream state before each block and after the last."""

    def __init__(self, pipe: Any):
        self.adapter = adapter_for(pipe)
        self.stacks = self.adapter.block_stacks(pipe.transformer)
        self.states: dict[str, list[torch.Tensor]] = {s: [] for s in self.stacks}
        self.influence: dict[str, float] = {}
        self.angular: dict[str, dict[int, list[float]]] = {}
        self.calls = 0
        self.enabled = True  # off during the drop-one runs, which are not measured
        self.handles = []
        for stack, blocks in self.stacks.items():
            for index, block in enumerate(blocks):
                self.handles.append(block.register_forward_hook(self._hook(stack, index, block), with_kwargs=True))
        self.handles.append(pipe.transformer.register_forward_hook(self._end_of_call))

    def _hook(self, stack: str, index: int, block: torch.nn.Module) -> Callable:
        from accel.adapters import BlockIO

        io = BlockIO(block)

        def hook(module, args, kwargs, output):
            if not self.enabled:
                return
            states = self.states[stack]
            if index == 0:
                states.clear()
                states.append(io.inputs(args, kwargs)[0].detach())
            states.append(io.outputs(output)[0].detach())

        return hook

    def _end_of_call(self, module, args, output):
        if not self.enabled:
            return
        self.calls += 1
        for stack, states in self.states.items():
            n_blocks = len(states) - 1
            for index in range(n_blocks):
                name = f"{stack}.{index}"
                value = float((1.0 - _cos(states[index], states[index + 1])).mean())
                self.influence[name] = self.influence.get(name, 0.0) + value
            runs = self.angular.setdefault(stack, {})
            for n in range(1, n_blocks):
                sums = runs.setdefault(n, [0.0] * (n_blocks - n + 1))
                for start in range(n_blocks - n + 1):
                    d = torch.arccos(_cos(states[start], states[start + n])).mean() / math.pi
                    sums[start] += float(d)
            states.clear()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _latent(pipe: Any, prompt: str, seed: int, kwargs: dict[str, Any]) -> torch.Tensor:
    out = pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), output_type="latent", **kwargs)
    latents = out.frames if hasattr(out, "frames") else out.images
    return torch.as_tensor(latents).float()


def calibrate(pipe: Any, prompts: Iterable[str], *, steps: int = 8, seeds: int = 1, drop_one: bool = True,
              progress: bool = True, **pipe_kwargs: Any) -> Plan:
    """Score every block of `pipe`'s transformer; return the plan (write it with `plan.save(path)`).

    Interrupting (Ctrl-C) raises KeyboardInterrupt out of here with nothing written and every hook removed."""
    from tqdm.auto import tqdm

    prompts = list(prompts)
    if not prompts or steps < 1 or seeds < 1:
        raise ValueError("calibrate needs at least one prompt, one step and one seed")
    transformer = pipe.transformer
    # a loaded pipeline's call fills in the model's own defaults (size, guidance, text length) by itself
    kwargs: dict[str, Any] = {**pipe_kwargs, "num_inference_steps": steps}
    protected = protected_blocks(transformer)
    sizes = block_sizes(transformer)
    names = [f"{s}.{i}" for s, n in sizes.items() for i in range(n)]
    candidates = [b for b in names if b not in protected] if drop_one else []
    cases = [(p, s) for p in prompts for s in range(seeds)]
    drop_sums = {b: 0.0 for b in candidates}
    bar = tqdm(total=len(cases) * (1 + len(candidates)), desc="calibrate", unit="run", disable=not progress)
    recorder = _StateRecorder(pipe)
    try:
        with torch.inference_mode():
            for prompt, seed in cases:
                recorder.enabled = True
                full = _latent(pipe, prompt, seed, kwargs)
                bar.update(1)
                recorder.enabled = False
                for name in candidates:
                    with accelerate(pipe, {"method": "prune", "blocks": [name]}):
                        dropped = _latent(pipe, prompt, seed, kwargs)
                    drop_sums[name] += float((dropped - full).norm() / full.norm().clamp_min(1e-12))
                    bar.update(1)
    finally:
        recorder.close()
        bar.close()
    calls = max(1, recorder.calls)
    scores: dict[str, dict[str, float]] = {"influence": {b: recorder.influence.get(b, 0.0) / calls for b in names}}
    if drop_one:
        scores["drop_one"] = {b: drop_sums[b] / len(cases) for b in candidates}
    angular = {stack: {str(n): [v / calls for v in sums] for n, sums in runs.items()}
               for stack, runs in recorder.angular.items()}
    return Plan(
        fingerprint=fingerprint(transformer), protected=protected, scores=scores, angular=angular,
        recommended="drop_one" if drop_one else "influence",
        calibration={"prompts": prompts, "steps": steps, "seeds": seeds,
                     **{k: v for k, v in kwargs.items() if isinstance(v, (int, float, str)) and k != "num_inference_steps"}},
    )

