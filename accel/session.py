"""The session of one accelerated pipeline call: what every method builds on.

How one call runs (`accel.apply.accelerate` creates the session with the resolved methods):
1. `attach()`: the pipeline's call is wrapped so its arguments are recorded (`call_kwargs`), methods that patch the
   pipeline itself (`Method.at_attach`) are applied, and a `StepTracker` hook goes on the transformer. Nothing
   else changes yet, so a pipeline that is never called inside the block is left as it was.
2. First denoiser call (`start()`): the call's plan is read from the scheduler (steps, timesteps, sigmas), a
   counting hook goes on every block (innermost, so it counts real block executions only) and the methods are
   applied in application order (`accel/methods.py`).
3. Every denoiser call: the tracker derives the step index and the CFG branch — also for pipelines that set no
   cache context (SD3, PixArt) or one without step information (FLUX) — sets a full diffusers `CacheContext` for
   the call (so our per-branch state *and* diffusers' own caches find state keyed on the step index), and runs the
   methods' call hooks around the transformer's forward.
4. `detach()`: every hook is removed in reverse order, the transformer's `forward` and child order restored, the
   pipeline's class put back, and all state dropped: the next call starts clean.

Step derivation: the pipeline's own `step_index` when its context gives one (Wan); otherwise a new step starts
whenever the timestep passed to the transformer changes (the cond and uncond calls of one step share it).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, CacheContext, StateManager, _set_cache_context

from accel.adapters import BlockIO, ModelAdapter, adapter_for
from accel.base import Counters, Method, MethodConfig
from accel.errors import SpecError
from accel.models.pipelines import fill_model_defaults

TRACKER_HOOK = "accel_step_tracker"
COUNTER_HOOK = "accel_block_counter"
_UNSET = object()


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

    def cache_context(self, name: str | None = None) -> CacheContext:
        """The diffusers `CacheContext` of this call (under another name, e.g. for a side pass)."""
        return CacheContext(name or self.branch, step_index=self.step_index, num_inference_steps=self.num_steps,
                            timestep=self.timestep, sigma=self.sigma)


@dataclass
class AccelReport:
    """What the accelerators did in one call. Counts are exact: they do not depend on the machine."""

    methods: list[str]
    steps: int = 0
    transformer_calls: int = 0  # denoiser calls the pipeline made
    blocks_total: dict[str, int] = field(default_factory=dict)  # block forwards a plain run makes, per stack
    blocks_computed: dict[str, int] = field(default_factory=dict)  # block forwards actually executed, per stack
    details: dict[str, Counters] = field(default_factory=dict)  # each method's own counters

    @property
    def extra_forwards(self) -> int:
        """Denoiser passes the methods ran on top of the pipeline's own calls (e.g. S²'s sub-network)."""
        return sum(counters.extra_forwards for counters in self.details.values())

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
            "details": {name: asdict(counters) for name, counters in self.details.items()},
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
        report = session.report
        report.transformer_calls += 1
        report.steps = max(report.steps, ctx.step_index + 1)
        for stack, size in session.stack_sizes.items():
            report.blocks_total[stack] += size
        session.enter_call(ctx)
        call = functools.partial(self.fn_ref.original_forward, *args, **kwargs)
        for around in session.call_hooks:  # first registered = innermost
            call = functools.partial(around, ctx, call)
        try:
            return call()
        finally:
            session.exit_call(outer)


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


def _recording_class(cls: type, session: "AccelSession") -> type:
    """A subclass of the pipeline's class whose `__call__` records its arguments in `session.call_kwargs` (the
    values the pipeline will use: the model's defaults, then the pipeline's, for what the caller left out), then
    runs the original call."""
    signature = inspect.signature(cls.__call__)

    @functools.wraps(cls.__call__)
    def __call__(pipe, *args, **kwargs):
        bound = signature.bind_partial(pipe, *args, **kwargs)
        fill_model_defaults(pipe, bound)
        bound.apply_defaults()
        session.call_kwargs = {name: value for name, value in bound.arguments.items() if name != "self"}
        try:
            return cls.__call__(pipe, *args, **kwargs)
        finally:
            session.call_kwargs = None

    return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__})


class AccelSession:
    """The state of one accelerated pipeline call: pipeline, adapter, plan, hooks, report.

    `methods` are (registry entry, validated config) pairs in application order; the session never looks methods up
    itself (`accel.apply` resolves the spec)."""

    def __init__(self, pipe: Any, methods: list[tuple[Method, MethodConfig]], seed: int | None = None):
        self.pipe = pipe
        self.seed = seed  # the request's seed, for methods that draw random numbers (reproducible requests)
        self.transformer: torch.nn.Module = pipe.transformer
        self.adapter: ModelAdapter = adapter_for(pipe)
        self.methods = methods
        self.stacks = self.adapter.block_stacks(self.transformer)
        self.stack_sizes = self.adapter.block_sizes(self.transformer)
        self.report = AccelReport(methods=[config.shorthand() for _, config in methods])
        self.report.blocks_total = dict.fromkeys(self.stacks, 0)
        self.report.blocks_computed = dict.fromkeys(self.stacks, 0)
        self.plan: CallPlan | None = None
        self.tracker = StepTracker(self)
        self.current: StepContext | None = None
        self.call_kwargs: dict[str, Any] | None = None  # the running pipeline call's arguments, defaults filled in
        self.started = False
        self.call_hooks: list[Callable[[StepContext, Callable[[], Any]], Any]] = []
        self._undo: list[Callable[[], None]] = []  # removals, in installation order; run in reverse on exit
        self._branch_states: list[StateManager] = []
        self._block_io: dict[type, BlockIO] = {}
        self._pipe_class = type(pipe)
        # the instance-level `forward` of the transformer and every block, restored on exit whatever a peer
        # library did (cache-dit's FLUX support replaces transformer.forward and does not put it back)
        self._forwards = save_forwards([self.transformer, *(block for _, _, block in self.blocks())])
        # and the order of its children: cache-dit re-inserts the block lists, which moves them to the end, and
        # diffusers' caches take the "first block" in that order
        self._children = list(self.transformer._modules.items())
        for method, _ in methods:
            if method.families is not None and self.adapter.family not in method.families:
                raise SpecError(f"{method.name}: not available for the {self.adapter.family} family; supported: "
                                f"{', '.join(method.families)}", field=method.name)

    # -- what methods use --------------------------------------------------------------------------------------
    def add_hook(self, module: torch.nn.Module, hook: ModelHook, name: str) -> None:
        """Register a diffusers hook that the session removes on exit."""
        registry = HookRegistry.check_if_exists_or_initialize(module)
        registry.register_hook(hook, name)
        self._undo.append(lambda: registry.remove_hook(name, recurse=False))

    def add_call_hook(self, around: Callable[[StepContext, Callable[[], Any]], Any]) -> None:
        """Wrap every denoiser call from now on: `around(ctx, call)` must return `call()`'s result or a stand-in
        of the same structure (a denoiser-level cache returns an extrapolated output without calling). The
        session's step context is set when it runs; hooks are dropped with the session."""
        self.call_hooks.append(around)

    def branch_state(self, state_cls: type[BaseState]) -> StateManager:
        """A method's state per CFG branch: `manager.get_state()` during a denoiser call is the state of that
        call's branch (created on first use). The session sets the branch on every call and resets all on exit."""
        manager = StateManager(state_cls)
        self._branch_states.append(manager)
        return manager

    def block_io(self, block: torch.nn.Module) -> BlockIO:
        cls = type(block)
        if cls not in self._block_io:
            self._block_io[cls] = BlockIO(block)
        return self._block_io[cls]

    def blocks(self) -> Iterator[tuple[str, int, torch.nn.Module]]:
        """(stack, index, block) for every block, in execution order."""
        for stack, blocks in self.stacks.items():
            for index, block in enumerate(blocks):
                yield stack, index, block

    @contextlib.contextmanager
    def side_pass(self, ctx: StepContext, name: str) -> Iterator["SidePass"]:
        """An extra denoiser pass a method runs inside a call (e.g. S²'s sub-network): it runs under its own
        diffusers cache context `name`, and its block executions are not counted as the pipeline's but given to
        the caller in the yielded `SidePass` (filled in when the block ends)."""
        counted = dict(self.report.blocks_computed)
        pass_counters = SidePass()
        _set_cache_context(self.transformer, ctx.cache_context(name))
        try:
            yield pass_counters
        finally:
            _set_cache_context(self.transformer, ctx.cache_context())
            for stack, count in self.report.blocks_computed.items():
                pass_counters.blocks_computed += count - counted[stack]
                self.report.blocks_computed[stack] = counted[stack]

    # -- life cycle --------------------------------------------------------------------------------------------
    def attach(self) -> None:
        self.pipe.__class__ = _recording_class(self._pipe_class, self)
        self._undo.append(self._restore_pipe_class)
        for method, config in self.methods:  # methods that wrap the pipeline call itself go on before it starts
            if method.at_attach:
                self._apply(method, config)
        self.add_hook(self.transformer, _StepTrackerHook(self), TRACKER_HOOK)

    def _restore_pipe_class(self) -> None:
        self.pipe.__class__ = self._pipe_class

    def _apply(self, method: Method, config: MethodConfig) -> None:
        handle = method.apply(self, config)
        self._undo.append(handle.remove)
        self.report.details[method.name] = handle.counters

    def start(self) -> None:
        """First denoiser call: read the plan, count blocks, apply the methods (inner hooks first)."""
        self.started = True
        self.plan = CallPlan.from_scheduler(getattr(self.pipe, "scheduler", None))
        for stack, _, block in self.blocks():
            self.add_hook(block, _BlockCounterHook(self.report, stack), COUNTER_HOOK)
        for method, config in self.methods:
            if not method.at_attach:
                self._apply(method, config)
        HookRegistry.check_if_exists_or_initialize(self.transformer).invalidate_child_registries_cache()

    def enter_call(self, ctx: StepContext) -> None:
        """A denoiser call starts: its step context, for our per-branch state and for diffusers' caches."""
        self.current = ctx
        context = ctx.cache_context()
        for manager in self._branch_states:
            manager.set_context(context)
        _set_cache_context(self.transformer, context)

    def exit_call(self, outer: CacheContext | None) -> None:
        _set_cache_context(self.transformer, outer)
        self.current = None

    def detach(self) -> None:
        while self._undo:
            self._undo.pop()()
        self.call_hooks.clear()
        for manager in self._branch_states:
            manager.reset()
        if list(self.transformer._modules.items()) != self._children:
            self.transformer._modules.clear()
            self.transformer._modules.update(self._children)
        restore_forwards(self._forwards)
        registry = HookRegistry.check_if_exists_or_initialize(self.transformer)
        registry.invalidate_child_registries_cache()
        _set_cache_context(self.transformer, None)


@dataclass
class SidePass:
    """Work of one side pass (see `AccelSession.side_pass`)."""

    blocks_computed: int = 0


def save_forwards(modules: list[torch.nn.Module]) -> dict[torch.nn.Module, Any]:
    """Each module's instance-level `forward` (or the mark that it has none), for `restore_forwards`."""
    return {module: module.__dict__.get("forward", _UNSET) for module in modules}


def restore_forwards(saved: dict[torch.nn.Module, Any]) -> None:
    for module, forward in saved.items():
        if forward is _UNSET:
            module.__dict__.pop("forward", None)
        else:
            module.forward = forward
