"""`accelerate(pipe, spec)`: attach accelerators for exactly one pipeline call, remove every hook on exit.

How one call runs:
1. On entry the spec is validated and a `StepTracker` hook is put on the transformer. Nothing else changes yet,
   so a pipeline that is never called inside the block is left as it was.
2. At the first denoiser call the tracker reads the call's plan from the scheduler (number of steps, timesteps,
   sigmas), puts a counting hook on every block (innermost, so it counts real block executions only) and applies
   the methods in the order `accel/methods.py` defines.
3. At every denoiser call the tracker runs the methods' call hooks (`add_call_hook`, for decisions per call
   and for skipping the whole call) around the transformer's forward. It derives the step index and the CFG branch, also for pipelines that set no
   cache context (SD3, PixArt) or set one without step information (FLUX), and sets a full diffusers
   `CacheContext` for the duration of the call. So our hooks *and* diffusers' own caches find per-branch state
   keyed on the step index, on every pipeline.
4. On exit every hook is removed (in reverse order) and all state dropped: the next call starts clean.

Step derivation: the pipeline's own `step_index` when its context gives one (Wan); otherwise a new step starts
whenever the timestep passed to the transformer changes (the cond and uncond calls of one step share it).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, CacheContext, StateManager, _set_cache_context

from accel.adapters import BlockIO, ModelAdapter, adapter_for
from accel.base import MethodConfig
from accel.errors import SpecError

TRACKER_HOOK = "accel_step_tracker"
_UNSET = object()
COUNTER_HOOK = "accel_block_counter"


@dataclass
class CallPlan:
    """What the scheduler says about the call, read at the first denoiser call."""

    num_steps: int
    timesteps: list[float]  # on the scheduler's own scale (0..1000 for the flow-matching schedulers here)
    sigmas: list[float] | None  # noise levels; one more than steps when the scheduler keeps the final 0

    @classmethod
    def from_scheduler(cls, scheduler: Any) -> "CallPlan":
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is None or len(timesteps) == 0:
            return cls(num_steps=0, timesteps=[], sigmas=None)
        begin = getattr(scheduler, "begin_index", None) or 0
        order = getattr(scheduler, "order", 1) or 1
        steps = [float(t) for t in timesteps[begin:]]
        sigmas = getattr(scheduler, "sigmas", None)
        sigma_list = [float(s) for s in sigmas[begin:]] if sigmas is not None else None
        return cls(num_steps=len(steps) // order, timesteps=steps, sigmas=sigma_list)


@dataclass
class StepContext:
    """Where the denoising loop is at the current transformer call."""

    step_index: int
    branch: str  # "cond", "uncond", or the pipeline's own context name; "batch" for cat([uncond, cond]) calls
    timestep: float  # 0..1000 scale, from the scheduler's plan when available
    sigma: float | None
    num_steps: int


@dataclass
class AccelReport:
    """What the accelerators did in one call. Counts are exact: they do not depend on the machine."""

    methods: list[str]
    steps: int = 0
    transformer_calls: int = 0  # denoiser calls the pipeline made
    blocks_total: dict[str, int] = field(default_factory=dict)  # block forwards a plain run makes, per stack
    blocks_computed: dict[str, int] = field(default_factory=dict)  # block forwards actually executed, per stack
    details: dict[str, dict[str, Any]] = field(default_factory=dict)  # each method's own counters

    @property
    def extra_forwards(self) -> int:
        return int(sum(d.get("extra_forwards", 0) for d in self.details.values()))

    @property
    def block_fraction_computed(self) -> float:
        total = sum(self.blocks_total.values())
        return sum(self.blocks_computed.values()) / total if total else 1.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "methods": list(self.methods),
            "steps": self.steps,
            "transformer_calls": self.transformer_calls,
            "blocks": {
                stack: {
                    "computed": self.blocks_computed.get(stack, 0),
                    "skipped": total - self.blocks_computed.get(stack, 0),
                    "total": total,
                }
                for stack, total in self.blocks_total.items()
            },
            "block_fraction_computed": round(self.block_fraction_computed, 6),
            "extra_forwards": self.extra_forwards,
            "details": {name: dict(d) for name, d in self.details.items()},
        }


class _BlockCounterHook(ModelHook):
    """Innermost hook on a block: counts executions of the block's real forward."""

    def __init__(self, report: AccelReport, stack: str):
        super().__init__()
        self.report, self.stack = report, stack

    def pre_forward(self, module, *args, **kwargs):
        self.report.blocks_computed[self.stack] += 1
        return args, kwargs


class _NoState(BaseState):
    def reset(self) -> None:
        pass


class _StepTrackerHook(ModelHook):
    """Outermost hook on the transformer: starts the session and sets a full cache context for each call.

    It is "stateful" only so that the context a pipeline sets with `transformer.cache_context(...)` reaches its
    `StateManager`, which is how it reads the branch name (and Wan's step index).
    """

    _is_stateful = True

    def __init__(self, session: "AccelSession"):
        super().__init__()
        self.session = session
        self.pipeline_context = StateManager(_NoState)

    def reset_state(self, module):
        return module

    def new_forward(self, module, *args, **kwargs):
        session = self.session
        if not session.started:
            session.start()
        outer = self.pipeline_context._context
        ctx = session.tracker.advance(outer, kwargs.get("timestep"))
        session.report.transformer_calls += 1
        session.report.steps = max(session.report.steps, ctx.step_index + 1)
        for stack, blocks in session.stacks.items():
            session.report.blocks_total[stack] += len(blocks)
        session.current = ctx
        _set_cache_context(
            module,
            CacheContext(
                ctx.branch,
                step_index=ctx.step_index,
                num_inference_steps=ctx.num_steps,
                timestep=ctx.timestep,
                sigma=ctx.sigma,
            ),
        )
        call = functools.partial(self.fn_ref.original_forward, *args, **kwargs)
        for around in session.call_hooks:  # first registered = innermost
            call = functools.partial(around, ctx, call)
        try:
            return call()
        finally:
            _set_cache_context(module, outer)
            session.current = None


class StepTracker:
    """Derives (step, branch) for every transformer call of one pipeline call."""

    def __init__(self, session: "AccelSession"):
        self.session = session
        self.step_index = -1
        self._last_timestep: float | None = None

    def advance(self, outer: CacheContext | None, timestep: Any) -> StepContext:
        value = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else timestep
        if outer is not None and outer.step_index is not None:
            self.step_index = int(outer.step_index)
        elif value is None or value != self._last_timestep:
            self.step_index += 1
        self._last_timestep = value
        plan = self.session.plan
        step = self.step_index
        if plan is not None and step < len(plan.timesteps):
            t = plan.timesteps[step]
            sigma = plan.sigmas[step] if plan.sigmas is not None and step < len(plan.sigmas) else None
        else:
            t, sigma = (value if value is not None else 0.0), None
        if outer is not None:
            branch = outer.name
        elif self.session.adapter.cfg_layout == "batch" and getattr(self.session.pipe, "do_classifier_free_guidance", False):
            branch = "batch"
        else:
            branch = "cond"
        num_steps = (plan.num_steps if plan is not None else 0) or (outer.num_inference_steps if outer else 0) or 0
        return StepContext(step_index=step, branch=branch, timestep=float(t), sigma=sigma, num_steps=num_steps)


class AccelSession:
    """The state of one accelerated pipeline call: pipeline, adapter, plan, hooks, report."""

    def __init__(self, pipe: Any, configs: list[MethodConfig], seed: int | None = None):
        from accel.methods import METHODS

        self.pipe = pipe
        self.seed = seed  # the request's seed, for methods that draw random numbers (reproducible requests)
        self.transformer: torch.nn.Module = pipe.transformer
        self.adapter: ModelAdapter = adapter_for(pipe)
        self.configs = configs
        self.stacks = self.adapter.block_stacks(self.transformer)
        self.report = AccelReport(methods=[c.shorthand() for c in configs])
        self.report.blocks_total = {name: 0 for name in self.stacks}
        self.report.blocks_computed = {name: 0 for name in self.stacks}
        self.plan: CallPlan | None = None
        self.tracker = StepTracker(self)
        self.current: StepContext | None = None
        self.started = False
        self._methods = METHODS
        self._undo: list[Callable[[], None]] = []  # removals, in installation order; run in reverse on exit
        # the instance-level `forward` of the transformer and every block, restored on exit whatever a peer
        # library did (cache-dit's FLUX support replaces transformer.forward and does not put it back)
        self._forwards = {m: m.__dict__.get("forward", _UNSET) for m in (self.transformer, *self._all_blocks())}
        # and the order of its children: cache-dit re-inserts the block lists, which moves them to the end, and
        # diffusers' caches take the "first block" in that order
        self._children = list(self.transformer._modules.items())
        self.call_hooks: list[Callable[[StepContext, Callable[[], Any]], Any]] = []
        self._block_io: dict[type, BlockIO] = {}
        for config in configs:
            families = METHODS[config.method].families
            if families is not None and self.adapter.family not in families:
                raise SpecError(
                    f"{config.method}: not available for the {self.adapter.family} family; supported: {', '.join(families)}"
                )

    # -- hooks -----------------------------------------------------------------------------------------------
    def add_hook(self, module: torch.nn.Module, hook: ModelHook, name: str) -> None:
        """Register a diffusers hook that the session removes on exit."""
        registry = HookRegistry.check_if_exists_or_initialize(module)
        registry.register_hook(hook, name)
        self._undo.append(lambda: registry.remove_hook(name, recurse=False))

    def add_call_hook(self, around: Callable[["StepContext", Callable[[], Any]], Any]) -> None:
        """Wrap every denoiser call from now on: `around(ctx, call)` must return `call()`'s result or a stand-in
        of the same structure (a denoiser-level cache returns an extrapolated output without calling). The
        session's step context is set when it runs; hooks are dropped with the session."""
        self.call_hooks.append(around)

    def block_io(self, block: torch.nn.Module) -> BlockIO:
        cls = type(block)
        if cls not in self._block_io:
            self._block_io[cls] = BlockIO(block)
        return self._block_io[cls]

    def _all_blocks(self) -> list[torch.nn.Module]:
        return [block for blocks in self.stacks.values() for block in blocks]

    def blocks(self) -> Iterator[tuple[str, int, torch.nn.Module]]:
        """(stack, index, block) for every block, in execution order."""
        for stack, blocks in self.stacks.items():
            for index, block in enumerate(blocks):
                yield stack, index, block

    # -- life cycle ------------------------------------------------------------------------------------------
    def attach(self) -> None:
        for config in self.configs:  # methods that must wrap the pipeline call itself go on before it starts
            if self._methods[config.method].at_attach:
                self._apply(config)
        self.add_hook(self.transformer, _StepTrackerHook(self), TRACKER_HOOK)

    def _apply(self, config: MethodConfig) -> None:
        handle = self._methods[config.method].apply(self, config)
        self._undo.append(handle.remove)
        self.report.details[config.method] = handle.counters

    def start(self) -> None:
        """First denoiser call: read the plan, count blocks, apply the methods (inner hooks first)."""
        self.started = True
        self.plan = CallPlan.from_scheduler(getattr(self.pipe, "scheduler", None))
        for stack, _, block in self.blocks():
            self.add_hook(block, _BlockCounterHook(self.report, stack), COUNTER_HOOK)
        for config in self.configs:
            if not self._methods[config.method].at_attach:
                self._apply(config)
        HookRegistry.check_if_exists_or_initialize(self.transformer).invalidate_child_registries_cache()

    def detach(self) -> None:
        while self._undo:
            self._undo.pop()()
        self.call_hooks.clear()
        if list(self.transformer._modules.items()) != self._children:
            self.transformer._modules.clear()
            self.transformer._modules.update(self._children)
        for module, forward in self._forwards.items():
            if forward is _UNSET:
                module.__dict__.pop("forward", None)
            else:
                module.forward = forward
        registry = HookRegistry.check_if_exists_or_initialize(self.transformer)
        registry.invalidate_child_registries_cache()
        _set_cache_context(self.transformer, None)


@contextlib.contextmanager
def accelerate(pipe: Any, spec: Any = None, *, seed: int | None = None) -> Iterator[AccelReport]:
    """Apply the accelerators of `spec` to the next call(s) of `pipe` inside the block; yield the live report.

        with accelerate(pipe, "fbcache:threshold=0.1") as report:
            image = pipe(prompt, generator=torch.Generator().manual_seed(0)).images[0]
        print(report.as_dict())

    `spec` is anything `accel.spec.parse_spec` takes: None or [] (no acceleration), a config, a dict, JSON, a
    `method:key=value` shorthand, a preset name, or a list of those. Use one `with` block per pipeline call.
    `seed` is the request's seed: methods that draw random numbers use it, so a request is reproducible.
    """
    from accel.spec import parse_spec

    configs = parse_spec(spec)
    session = AccelSession(pipe, configs, seed=seed)
    try:
        session.attach()
        yield session.report
    finally:
        session.detach()
