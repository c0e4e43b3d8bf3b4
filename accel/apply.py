"""`accelerate(pipe, spec)`: attach accelerators for the pipeline calls inside a `with` block, remove every hook on
exit. The spec is resolved here to registry entries; the session (`accel/session.py`) runs them."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from accel.calibration.estimate import observers_for
from accel.calibration.target import resolve_target
from accel.methods import METHODS
from accel.session import AccelReport, AccelSession, refuse_unsupported
from accel.spec import parse_spec


@contextlib.contextmanager
def accelerate(pipe: Any, spec: Any = None, *, seed: int | list[int] | None = None) -> Iterator[AccelReport]:
    """Apply the accelerators of `spec` to the next call(s) of `pipe` inside the block; yield the live report.

        with accelerate(pipe, "fbcache:threshold=0.1") as report:
            image = pipe(prompt, generator=torch.Generator().manual_seed(0)).images[0]
        print(report.as_dict())

    `spec` is anything `accel.spec.parse_spec` takes: None or [] (no acceleration), a config, a dict, JSON, a
    `method:key=value` shorthand, a preset name, or a list of those; an already parsed `AccelSpec` is used as is.
    A fidelity target (`{"target": {"psnr": 35}}`) is resolved on the pipeline's calibrated profile
    (`accel.calibration.target`) at the model's default size and steps; the report says what it chose
    (`report.target`), and the call's fidelity estimate (`report.estimate`) when the profile has an estimator.
    Every pipeline call inside the block is accelerated, each with fresh state; the report gives the totals and
    each call (`report.calls`). `seed` is the request's seed, or one seed per output of the batch: methods that draw
    random numbers use it, so a request is reproducible and an output does not depend on the rest of its batch.
    """
    configs = parse_spec(spec)
    if configs.target is not None:  # a fidelity target: the model's profile chooses the methods (its default size)
        configs = resolve_target(pipe, configs.target)
    session = AccelSession(pipe, [(METHODS[config.method], config) for config in configs], seed=seed,
                           observers=observers_for(pipe, configs, configs.guard_psnr))
    session.total.target = configs.target_info
    try:
        session.attach()
        yield session.total
    finally:
        session.detach()


def check_supported(pipe: Any, spec: Any) -> None:
    """Refuse (a SpecError naming the method or knob) a parsed spec's methods this pipeline cannot run, before any
    work: what `accelerate` would refuse when its session is made (a fidelity target has no methods yet)."""
    refuse_unsupported(pipe, [(METHODS[config.method], config) for config in spec])
