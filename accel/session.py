"""The session of an `accelerate` block: what every method builds on.

How it runs (`accel.apply.accelerate` creates the session with the resolved methods):
1. `attach()`: the pipeline's call is wrapped so that each call is seen (its arguments are recorded in
   `call_kwargs`), methods that patch the pipeline itself (`Method.at_attach`) are applied, and a `StepTracker`
   hook goes on each transformer (Wan 2.2 has two: `transformer`, `transformer_2`). Nothing else changes yet, so a
   pipeline that is never called inside the block is left as it was.
2. Every pipeline call inside the block is accelerated with fresh state: at its first denoiser call (`start()`)
   the plan is read from the scheduler (steps, timesteps, sigmas), a counting hook goes on every block (innermost,
   so it counts real block executions only) and the methods are applied in application order
   (`accel/methods.py`); when the call returns (`end_call()`) their hooks and state are removed and the call's
   report is added to the block's totals. A transformer called directly (no pipeline call) opens a call that ends
   with the block.
3. Every denoiser call: the tracker derives the step index and the branch, sets a full diffusers `CacheContext`
   for the call (so our per-branch state *and* diffusers' own caches find state keyed on the step index), and
   runs the methods' call hooks around the transformer's forward.
4. `detach()`: every hook is removed in reverse order, the transformers' `forward` and child order restored, the
   pipeline's class put back, and all state dropped.

Steps: the pipeline's own `step_index` when its context gives one (Wan); otherwise a new step starts whenever the
timestep passed to the transformer changes (all calls of one step share it).
Branches (one state per branch): the pipeline's context name when it sets one (FLUX text-to-image, Wan); otherwise
by the call's order inside its step: FLUX-family pipelines without a context (img2img, inpaint, Kontext, Fill, ...)
call cond then uncond (true CFG); a batched-CFG pipeline (SD3) calls cat([uncond, cond]) ("batch"); any further
call of a step (SD3's skip-layer guidance) is an extra branch of its own (`extra1`, ...). Calls of a second
transformer get their own branches (`cond@transformer_2`). `StepContext.guidance` gives the role of the call.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Iterator, Literal

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, CacheContext, StateManager, _set_cache_context

from accel.adapters import BlockIO, ModelAdapter, adapter_for
from accel.base import Counters, Method, MethodConfig
from accel.errors import SpecError
from accel.models.pipelines import fill_model_defaults

TRACKER_HOOK = "accel_step_tracker"
COUNTER_HOOK = "accel_block_counter"
TRANSFORMERS = ("transformer", "transformer_2")  # pipeline attributes that hold a denoiser, in stage order
_UNSET = object()


@dataclass
class CallPlan:
    """What the scheduler says about the call, read at the first denoiser call."""

    num_steps: int
    timesteps: list[float]  # on the scheduler's own scale (0..1000 for the flow-matching schedulers here)
    sigmas: list[float] | None  # noise levels in 0..1 (flow-matching time); one more than steps when the final 0 is kept

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
        if sigma_list is not None and not _flow_sigmas(scheduler):
            # a VP scheduler's sigma is sqrt((1 - a) / a), up to ~150: its sample divided by sqrt(a) (1 + sigma) is
            # the flow-matching sample at time sigma / (1 + sigma), which is the 0..1 noise level methods read
            sigma_list = [s / (1.0 + s) for s in sigma_list]
        return cls(num_steps=len(steps) // order, timesteps=steps, sigmas=sigma_list)


def _flow_sigmas(scheduler: Any) -> bool:
    config = getattr(scheduler, "config", {})
    return (type(scheduler).__name__.startswith("FlowMatch") or bool(config.get("use_flow_sigmas"))
            or config.get("prediction_type") == "flow_prediction")


@dataclass
class StepContext:
    """Where the denoising loop is at the current transformer call."""

    step_index: int
    branch: str  # the state key: "cond", "uncond", "batch" (cat([uncond, cond])), "extra1", ...; "@transformer_2"
    timestep: float  # 0..1000 scale, from the scheduler's plan when available
    sigma: float | None
    num_steps: int
    guidance: Literal["cond", "uncond", "batch", "extra"] = "cond"  # the call's role in the guidance combine
    transformer: str = "transformer"  # the pipeline attribute of the transformer being called
    latents: Any = None  # the call's `hidden_states` input (x_t and any concatenated conditioning), when it has one
    sigma_next: float | None = None  # the noise level the scheduler steps to after this step

    def cache_context(self, name: str | None = None) -> CacheContext:
        """The diffusers `CacheContext` of this call (under another name, e.g. for a side pass)."""
        return CacheContext(name or self.branch, step_index=self.step_index, num_inference_steps=self.num_steps,
                            timestep=self.timestep, sigma=self.sigma)


@dataclass
class AccelReport:
    """What the accelerators did: for one pipeline call, or the totals of an `accelerate` block with each call in
    `calls`. Counts are exact: they do not depend on the machine."""

    methods: list[str]
    steps: int = 0
    transformer_calls: int = 0  # denoiser calls the pipeline made
    blocks_total: dict[str, int] = field(default_factory=dict)  # block forwards a plain run makes, per stack
    blocks_computed: dict[str, int] = field(default_factory=dict)  # block forwards actually executed, per stack
    details: dict[str, Counters] = field(default_factory=dict)  # each method's own counters
    calls: list["AccelReport"] = field(default_factory=list)  # per pipeline call (totals only)
    target: dict[str, Any] | None = None  # a fidelity target's resolution (`accel.calibration.target`)
    estimate: dict[str, Any] | None = None  # the fidelity estimate of the call (`accel.calibration.estimate`)

    @property
    def extra_forwards(self) -> int:
        """Denoiser passes the methods ran on top of the pipeline's own calls (e.g. S²'s sub-network)."""
        return sum(counters.extra_forwards for counters in self.details.values())

    @property
    def block_fraction_computed(self) -> float:
        total = sum(self.blocks_total.values())
        return sum(self.blocks_computed.values()) / total if total else 1.0

    def add(self, call: "AccelReport") -> None:
        """Add one call's report to these totals."""
        self.steps += call.steps
        self.transformer_calls += call.transformer_calls
        for mine, theirs in ((self.blocks_total, call.blocks_total), (self.blocks_computed, call.blocks_computed)):
            for stack, count in theirs.items():
                mine[stack] = mine.get(stack, 0) + count
        for name, counters in call.details.items():
            if name in self.details:
                self.details[name].add(counters)
            else:
                self.details[name] = copy.deepcopy(counters)
        if call.estimate is not None:  # the block's estimate: its least faithful call's
            if self.estimate is None or (call.estimate.get("psnr") or 100) < (self.estimate.get("psnr") or 100):
                self.estimate = call.estimate
        self.calls.append(call)

    def as_dict(self) -> dict[str, Any]:
        data = {
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
        if self.target is not None:
            data["target"] = self.target
        if self.estimate is not None:
            data["estimate"] = self.estimate
        if len(self.calls) > 1:
            data["pipeline_calls"] = len(self.calls)
            data["per_call"] = [call.as_dict() for call in self.calls]
        return data


class _BlockCounterHook(ModelHook):
    """Innermost hook on a block: counts executions of the block's real forward."""

    def __init__(self, session: "AccelSession", stack: str):
        super().__init__()
        self.session, self.stack = session, stack

    def pre_forward(self, module, *args, **kwargs):
        self.session.report.blocks_computed[self.stack] += 1
        return args, kwargs


class _NoState(BaseState):
    def reset(self) -> None:
        pass


class _StepTrackerHook(ModelHook):
    """Outermost hook on a transformer: starts the call's methods and sets a full cache context for each call.

    It is "stateful" only so that the context a pipeline sets with `transformer.cache_context(...)` reaches its
    `StateManager`, which is how it reads the branch name (and Wan's step index).
    """

    _is_stateful = True

    def __init__(self, session: "AccelSession", name: str):
        super().__init__()
        self.session, self.name = session, name
        self.pipeline_context = StateManager(_NoState)

    def reset_state(self, module):
        return module

    def new_forward(self, module, *args, **kwargs):
        session = self.session
        outer = self.pipeline_context._context
        timestep = session.adapter.timestep_of(module, args, kwargs)
        if session.report is None:  # the transformer called outside a pipeline call
            session.begin_call(None)
        elif not session.in_pipeline_call and session.tracker.restarts(outer, timestep):
            session.end_call()  # another denoising loop (e.g. a second pipeline sharing this transformer): fresh state
            session.begin_call(None)
        if not session.started:
            session.start()
        ctx = session.tracker.advance(outer, timestep, self.name)
        ctx.latents = session.adapter.latents_of(module, args, kwargs)
        report = session.report
        report.transformer_calls += 1
        report.steps = max(report.steps, ctx.step_index + 1)
        for stack in session.stacks_of[self.name]:
            report.blocks_total[stack] += session.stack_sizes[stack]
        skip = session.adapter.skip_layers_argument
        if skip and kwargs.get(skip):  # blocks the transformer skips itself (SD3's skip-layer guidance call)
            report.blocks_total[session.stacks_of[self.name][0]] -= len(kwargs[skip])
        session.enter_call(ctx, module)
        call = functools.partial(self.fn_ref.original_forward, *args, **kwargs)
        for around in session.call_hooks:  # first registered = innermost
            call = functools.partial(around, ctx, call)
        try:
            return call()
        finally:
            session.exit_call(outer, module)


class StepTracker:
    """Derives (step, branch, guidance role) for every transformer call of one pipeline call."""

    def __init__(self, session: "AccelSession"):
        self.session = session
        self.step_index = -1
        self.order = 0  # calls so far in the current step
        self._last_timestep: float | None = None

    def restarts(self, outer: CacheContext | None, timestep: Any) -> bool:
        """Whether this call starts a new denoising loop: the step goes back (the pipeline's own step index, or a
        timestep above the last one: timesteps fall within a loop)."""
        if outer is not None and outer.step_index is not None:
            return int(outer.step_index) < self.step_index
        value = _timestep_value(timestep)
        return value is not None and self._last_timestep is not None and value > self._last_timestep

    def advance(self, outer: CacheContext | None, timestep: Any, transformer: str = "transformer") -> StepContext:
        value = _timestep_value(timestep)
        previous = self.step_index
        if outer is not None and outer.step_index is not None:
            self.step_index = int(outer.step_index)
        elif value is None or value != self._last_timestep:
            self.step_index += 1
        self.order = 0 if self.step_index != previous else self.order + 1
        self._last_timestep = value
        plan = self.session.plan
        step = self.step_index
        if plan is not None and step < len(plan.timesteps):
            t = plan.timesteps[step]
            sigma = plan.sigmas[step] if plan.sigmas is not None and step < len(plan.sigmas) else None
            sigma_next = plan.sigmas[step + 1] if plan.sigmas is not None and step + 1 < len(plan.sigmas) else None
        else:
            t, sigma, sigma_next = (value if value is not None else 0.0), None, None
        branch, guidance = self._branch(outer)
        if transformer != "transformer":
            branch = f"{branch}@{transformer}"
        num_steps = (plan.num_steps if plan is not None else 0) or (outer.num_inference_steps if outer else 0) or 0
        return StepContext(step_index=step, branch=branch, timestep=float(t), sigma=sigma, num_steps=num_steps,
                           guidance=guidance, transformer=transformer, sigma_next=sigma_next)

    def _branch(self, outer: CacheContext | None) -> tuple[str, str]:
        """(branch name, guidance role): the role is "cond", "uncond", "batch" (both halves in one call) or
        "extra" (another guidance pass)."""
        batched = self.session.adapter.cfg_layout == "batch"
        if outer is not None:  # the pipeline names its calls
            role = _CONTEXT_ROLES.get(outer.name, "extra")
            if role == "batch" and not self._cfg_active():
                role = "cond"  # "cond_uncond" without guidance: the conditional half alone
            return outer.name, role
        if batched:
            if self.order == 0:
                return ("batch", "batch") if self._cfg_active() else ("cond", "cond")
        elif self.order < 2:  # separate calls, cond first (FLUX's true CFG)
            return ("cond", "cond") if self.order == 0 else ("uncond", "uncond")
        first_extra = 1 if batched else 2
        return f"extra{self.order - first_extra + 1}", "extra"

    def _cfg_active(self) -> bool:
        return self.session.adapter.runs_cfg(self.session.pipe, self.session.call_kwargs)


# the cache-context names diffusers pipelines give their transformer calls -> the call's guidance role
_CONTEXT_ROLES = {"cond": "cond", "uncond": "uncond", "pred_cond": "cond", "pred_uncond": "uncond",
                  "cond_uncond": "batch"}


def _timestep_value(timestep: Any) -> float | None:
    """One number per call: the largest entry (LTX's image-to-video gives each token its own timestep, 0 on the
    conditioning frame's tokens)."""
    if isinstance(timestep, torch.Tensor):
        return float(timestep.max()) if timestep.numel() else None
    return timestep


@functools.cache
def _recording_class(cls: type) -> type:
    """A subclass of the pipeline's class (one per class, made once) whose `__call__` opens a call of the session
    attached to the pipeline (`pipe._accel_session`) with its arguments (the values the pipeline will use: the
    model's defaults, then the pipeline's, for what the caller left out), runs the original call, and closes the
    session's call. The session is found on the instance, so the class keeps no session alive."""
    signature = inspect.signature(cls.__call__)

    @functools.wraps(cls.__call__)
    def __call__(pipe, *args, **kwargs):
        session = pipe.__dict__.get("_accel_session")
        if session is None or session.in_pipeline_call:  # no block, or a pipeline calling itself: one call
            return cls.__call__(pipe, *args, **kwargs)
        bound = signature.bind_partial(pipe, *args, **kwargs)
        fill_model_defaults(pipe, bound)
        bound.apply_defaults()
        session.begin_call({name: value for name, value in bound.arguments.items() if name != "self"})
        try:
            return cls.__call__(pipe, *args, **kwargs)
        finally:
            session.end_call()

    return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__, "__qualname__": cls.__qualname__})


def refuse_unsupported(pipe: Any, methods: list[tuple[Any, Any]]) -> None:
    """Refuse (a SpecError naming the method or `method.knob`) what this pipeline cannot run: a method outside its
    families, a knob value its family or scheduler cannot run (`MethodConfig.unsupported`), an expert on a
    one-transformer pipeline. A session checks it when it is made; the server when a request arrives (so that an
    async video job is refused, not accepted and failed)."""
    adapter = adapter_for(pipe)
    for method, config in methods:
        if method.families is not None and adapter.family not in method.families:
            raise SpecError(f"{method.name}: not available for the {adapter.family} family; supported: "
                            f"{', '.join(method.families)}", field=method.name)
        if (problem := config.unsupported(adapter, pipe)) is not None:
            raise SpecError(f"{method.name}.{problem[0]}: {problem[1]}", field=f"{method.name}.{problem[0]}")
        if config.expert != "both" and getattr(pipe, "transformer_2", None) is None:
            raise SpecError(f"{method.name}.expert: {config.expert!r} needs a pipeline with two experts "
                            "(transformer_2, e.g. Wan 2.2); this one has one transformer", field=f"{method.name}.expert")


class AccelSession:
    """The state of one `accelerate` block: pipeline, adapter, and per pipeline call the plan, hooks and report.

    `methods` are (registry entry, validated config) pairs in application order; the session never looks methods up
    itself (`accel.apply` resolves the spec)."""

    def __init__(self, pipe: Any, methods: list[tuple[Method, MethodConfig]], seed: int | list[int] | None = None,
                 observers: list[Callable[["AccelSession"], Any]] | None = None):
        self.pipe = pipe
        # made at each call's start after the methods (so their call hooks are outermost); each has `finish(report)`
        self.observers = list(observers or [])
        self._live_observers: list[Any] = []
        self.tolerance_scale = 1.0  # per call: adaptive methods multiply their tolerance by it (a guard lowers it)
        self.seed = seed  # the request's seed, or one per output, for methods that draw random numbers
        self.adapter: ModelAdapter = adapter_for(pipe)
        self.methods = methods
        self.transformers: dict[str, torch.nn.Module] = {
            name: getattr(pipe, name) for name in TRANSFORMERS if getattr(pipe, name, None) is not None
        }
        self.transformer: torch.nn.Module = pipe.transformer
        self.stacks: dict[str, torch.nn.ModuleList] = {}
        self.stacks_of: dict[str, list[str]] = {}  # transformer attribute -> its stack names
        for name, transformer in self.transformers.items():
            prefix = "" if name == "transformer" else f"{name}."
            own = {prefix + stack: blocks for stack, blocks in self.adapter.block_stacks(transformer).items()}
            self.stacks.update(own)
            self.stacks_of[name] = list(own)
        self.stack_sizes = {name: len(blocks) for name, blocks in self.stacks.items()}
        self.total = AccelReport(methods=[config.shorthand() for _, config in methods])
        self.report: AccelReport | None = None  # the running call's report
        self.plan: CallPlan | None = None
        self.tracker = StepTracker(self)
        self.current: StepContext | None = None
        self.call_kwargs: dict[str, Any] | None = None  # the running pipeline call's arguments, defaults filled in
        self.in_pipeline_call = False
        self.started = False
        self.call_hooks: list[Callable[[StepContext, Callable[[], Any]], Any]] = []
        self._undo: list[Callable[[], None]] = []  # the block's removals, in installation order; run in reverse
        self._call_undo: list[Callable[[], None]] = []  # the running call's removals
        self._branch_states: list[StateManager] = []
        self._block_details: dict[str, Counters] = {}  # counters of the methods applied for the whole block
        self._block_io: dict[type, BlockIO] = {}
        self._pipe_class = type(pipe)
        # the instance-level `forward` of every module of the transformers, restored on exit whatever a hook removal
        # (diffusers leaves the original bound method as an instance attribute) or a peer library did (cache-dit's
        # FLUX support replaces transformer.forward and does not put it back)
        self._forwards = save_forwards([m for t in self.transformers.values() for m in t.modules()])
        # and the order of their children: cache-dit re-inserts the block lists, which moves them to the end, and
        # diffusers' caches take the "first block" in that order
        self._children = {t: list(t._modules.items()) for t in self.transformers.values()}
        refuse_unsupported(pipe, methods)

    # -- what methods use --------------------------------------------------------------------------------------
    def add_hook(self, module: torch.nn.Module, hook: ModelHook, name: str) -> None:
        """Register a diffusers hook that the session removes at the end of the call (or of the block, for hooks
        registered before the first call)."""
        registry = HookRegistry.check_if_exists_or_initialize(module)
        registry.register_hook(hook, name)
        (self._call_undo if self.report is not None else self._undo).append(
            lambda: registry.remove_hook(name, recurse=False))

    def add_call_hook(self, around: Callable[[StepContext, Callable[[], Any]], Any]) -> None:
        """Wrap every denoiser call of the running pipeline call: `around(ctx, call)` must return `call()`'s result
        or a stand-in of the same structure (a denoiser-level cache returns an extrapolated output without
        calling). The session's step context is set when it runs; hooks are dropped with the call."""
        self.call_hooks.append(around)

    def branch_state(self, state_cls: type[BaseState]) -> StateManager:
        """A method's state per branch: `manager.get_state()` during a denoiser call is the state of that call's
        branch (created on first use). The session sets the branch on every call and drops all at the call's end."""
        manager = StateManager(state_cls)
        self._branch_states.append(manager)
        return manager

    def block_io(self, block: torch.nn.Module) -> BlockIO:
        cls = type(block)
        if cls not in self._block_io:
            self._block_io[cls] = BlockIO(block)
        return self._block_io[cls]

    def blocks(self) -> Iterator[tuple[str, int, torch.nn.Module]]:
        """(stack, index, block) for every block of every transformer, in execution order."""
        for stack, blocks in self.stacks.items():
            for index, block in enumerate(blocks):
                yield stack, index, block

    def item_seeds(self, items: int) -> list[int | None]:
        """One seed per item of a denoiser call's batch: the per-output seeds when given (one per output, so an
        item's random draws do not depend on the rest of its batch), else the one seed for every item."""
        if isinstance(self.seed, (list, tuple)):
            if len(self.seed) == items:
                return list(self.seed)
            if len(self.seed) and items % len(self.seed) == 0:  # e.g. several images per prompt
                return [s for s in self.seed for _ in range(items // len(self.seed))]
            return [self.seed[0] if self.seed else None] * items
        return [self.seed] * items

    @contextlib.contextmanager
    def side_pass(self, ctx: StepContext, name: str) -> Iterator["SidePass"]:
        """An extra denoiser pass a method runs inside a call (e.g. S²'s sub-network): it runs under its own
        branch `name` (diffusers' cache context and every `branch_state`, so no method's state of the call's
        branch is read or written), and its block executions are not counted as the pipeline's but given to the
        caller in the yielded `SidePass` (filled in when the block ends)."""
        counted = dict(self.report.blocks_computed)
        pass_counters = SidePass()
        transformer = self.transformers[ctx.transformer]
        self._set_branch(ctx.cache_context(name), transformer)
        saved = self.current
        self.current = replace(ctx, branch=name)
        try:
            yield pass_counters
        finally:
            self.current = saved
            self._set_branch(ctx.cache_context(), transformer)
            for stack, count in self.report.blocks_computed.items():
                pass_counters.blocks_computed += count - counted[stack]
                self.report.blocks_computed[stack] = counted[stack]

    def scoped(self, config: MethodConfig) -> "AccelSession":
        """The session as the method `config` sees it: itself, or restricted to one expert (`config.expert`)."""
        if config.expert == "both":
            return self
        return ExpertView(self, "transformer" if config.expert == "high" else "transformer_2")  # type: ignore[return-value]

    # -- life cycle --------------------------------------------------------------------------------------------
    def attach(self) -> None:
        self.pipe.__class__ = _recording_class(self._pipe_class)
        self.pipe.__dict__["_accel_session"] = self
        self._undo.append(self._restore_pipe_class)
        for method, config in self.methods:  # methods that wrap the pipeline call itself go on before it starts
            if method.at_attach:
                handle = method.apply(self.scoped(config), config)
                self._undo.append(handle.remove)
                self._block_details[method.name] = handle.counters
        for name, transformer in self.transformers.items():
            self.add_hook(transformer, _StepTrackerHook(self, name), TRACKER_HOOK)

    def _restore_pipe_class(self) -> None:
        self.pipe.__dict__.pop("_accel_session", None)
        self.pipe.__class__ = self._pipe_class

    def begin_call(self, call_kwargs: dict[str, Any] | None) -> None:
        """A pipeline call starts (or the transformer is called directly): fresh plan, tracker, report."""
        if self.report is not None:
            self.end_call()  # a direct transformer call before this pipeline call
        self.in_pipeline_call = call_kwargs is not None
        self.call_kwargs = call_kwargs
        self.report = AccelReport(methods=list(self.total.methods), blocks_total=dict.fromkeys(self.stacks, 0),
                                  blocks_computed=dict.fromkeys(self.stacks, 0), target=self.total.target)
        self.tolerance_scale = 1.0
        self.plan, self.tracker, self.started = None, StepTracker(self), False

    def start(self) -> None:
        """First denoiser call of a call: read the plan, count blocks, apply the methods (inner hooks first)."""
        self.started = True
        self.plan = CallPlan.from_scheduler(getattr(self.pipe, "scheduler", None))
        for stack, _, block in self.blocks():
            self.add_hook(block, _BlockCounterHook(self, stack), COUNTER_HOOK)
        for method, config in self.methods:
            if not method.at_attach:
                handle = method.apply(self.scoped(config), config)
                self._call_undo.append(handle.remove)
                self.report.details[method.name] = handle.counters
        self._live_observers = [make(self) for make in self.observers]
        for transformer in self.transformers.values():
            HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()

    def end_call(self) -> None:
        """The call returned: remove its hooks and state, add its report to the totals."""
        if self.report is None:
            return
        for observer in self._live_observers:
            observer.finish(self.report)
        self._live_observers = []
        while self._call_undo:
            self._call_undo.pop()()
        self.call_hooks.clear()
        for manager in self._branch_states:
            manager.reset()
        self._branch_states.clear()
        for transformer in self.transformers.values():
            HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
            _set_cache_context(transformer, None)
        for name, counters in self._block_details.items():  # at_attach methods count for the whole block
            self.report.details.setdefault(name, counters)
        if self.started:
            self.total.add(self.report)
        self.report, self.call_kwargs, self.current = None, None, None
        self.in_pipeline_call = self.started = False

    def enter_call(self, ctx: StepContext, transformer: torch.nn.Module) -> None:
        """A denoiser call starts: its step context, for our per-branch state and for diffusers' caches."""
        self.current = ctx
        self._set_branch(ctx.cache_context(), transformer)

    def exit_call(self, outer: CacheContext | None, transformer: torch.nn.Module) -> None:
        _set_cache_context(transformer, outer)
        self.current = None

    def _set_branch(self, context: CacheContext, transformer: torch.nn.Module) -> None:
        for manager in self._branch_states:
            manager.set_context(context)
        _set_cache_context(transformer, context)

    def detach(self) -> None:
        self.end_call()
        while self._undo:
            self._undo.pop()()
        for transformer, children in self._children.items():
            if list(transformer._modules.items()) != children:
                transformer._modules.clear()
                transformer._modules.update(children)
        restore_forwards(self._forwards)
        for transformer in self.transformers.values():
            HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
            _set_cache_context(transformer, None)


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


class ExpertView:
    """A session restricted to one transformer of a two-expert pipeline (a method's `expert` knob): its
    transformers, stacks and blocks are that expert's, and its call hooks run on that expert's calls only (the
    other expert's calls pass straight through). Everything else is the session's."""

    def __init__(self, session: AccelSession, transformer: str):
        self._session, self._name = session, transformer
        self.transformers = {transformer: session.transformers[transformer]}
        self.transformer = session.transformers[transformer]
        self.stacks_of = {transformer: session.stacks_of[transformer]}
        self.stacks = {stack: session.stacks[stack] for stack in session.stacks_of[transformer]}
        self.stack_sizes = {stack: session.stack_sizes[stack] for stack in self.stacks}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    blocks = AccelSession.blocks  # over the view's own stacks

    def add_call_hook(self, around: Callable[[StepContext, Callable[[], Any]], Any]) -> None:
        name = self._name

        def on_expert(ctx: StepContext, call: Callable[[], Any]) -> Any:
            return around(ctx, call) if ctx.transformer == name else call()

        self._session.add_call_hook(on_expert)
