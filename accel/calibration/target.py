"""Fidelity targets: `{"target": {"psnr": 35}}` or `{"target": {"speedup": 2.5}}` resolved to a calibrated setting.

A PSNR target picks the setting with the least work among those whose *lower* bound (the 10th percentile of PSNR
over the calibration prompts, `psnr_p10`) meets it: a target holds for most prompts, not for the average one. A
speedup target picks the most faithful setting (highest `psnr_p10`) among those whose measured speedup reaches it.
A target nothing meets gets the closest setting (the most faithful one, or the fastest) and a note saying so, never
an error. The bucket is the profile's at the request's size and step count, else the nearest (by log pixel count,
then log steps), with a note. What it returns replaces the target: an `AccelSpec` of the chosen methods carrying
`target_info` (target, chosen spec, expected PSNR median and bound, expected speedup and work, note), which the
report and the response show.

The OpenAI `quality` levels map to targets (`QUALITY_TO_TARGET`) when the model has a profile.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from accel.calibration.profile import Bucket, NoProfileError, Profile, SettingStats, Target, profile_for
from accel.spec import parse_spec

# documented targets of the OpenAI quality levels (README, "Fidelity targets")
QUALITY_TO_TARGET: dict[str, dict[str, float]] = {"high": {"psnr": 40.0}, "medium": {"psnr": 35.0},
                                                   "low": {"psnr": 30.0}, "auto": {"psnr": 35.0}}


def no_profile_message(name: str) -> str:
    return (f"model {name} has no calibrated profile, so a fidelity target cannot be resolved: calibrate it with "
            f"`accel calibrate --model {name} --out profile.json` (then load it with that profile), or set "
            "`calibrate: true` in the server's model settings")


def choose_bucket(profile: Profile, height: int | None, width: int | None, steps: int | None,
                  frames: int | None = None) -> tuple[Bucket, str | None]:
    """The bucket measured at this size and step count, else the nearest one and a note saying so."""
    def distance(bucket: Bucket) -> tuple[float, float]:
        pixels = (height or bucket.height or 1) * (width or bucket.width or 1) * (frames or bucket.frames or 1)
        mine = (bucket.height or 1) * (bucket.width or 1) * (bucket.frames or 1)
        return abs(math.log(pixels / mine)), abs(math.log((steps or bucket.steps) / bucket.steps))

    bucket = min(profile.buckets, key=distance)
    asked = dict(height=height, width=width, steps=steps, frames=frames)
    differs = [f"{name} {value}" for name, value in asked.items()
               if value is not None and value != getattr(bucket, name)]
    note = None
    if differs:
        note = (f"requested {', '.join(differs)} is outside the calibrated range; using the nearest calibrated bucket "
                f"({bucket.describe()})")
    return bucket, note


def choose_setting(bucket: Bucket, target: Target,
                   allowed: Callable[[SettingStats], bool] | None = None) -> tuple[SettingStats, str | None]:
    """The setting for `target` (see the module), and a note when no setting meets it."""
    candidates = [s for s in bucket.settings if allowed is None or allowed(s)]
    if not candidates:
        raise NoProfileError("no calibrated setting is allowed on this server", field="acceleration")
    if target.psnr is not None:
        meeting = [s for s in candidates if s.psnr_p10 >= target.psnr]
        if meeting:
            return min(meeting, key=lambda s: (s.work, -s.psnr_p10, -s.speedup)), None
        best = max(candidates, key=lambda s: (s.psnr_p10, -s.work))
        return best, (f"no calibrated setting reaches {target.psnr:g} dB at the 10th percentile; chose the most "
                      f"faithful one ({best.psnr_p10:.1f} dB); request no acceleration for the exact output")
    meeting = [s for s in candidates if s.speedup >= target.speedup]
    if meeting:
        return max(meeting, key=lambda s: (s.psnr_p10, s.psnr_median, -s.work)), None
    best = max(candidates, key=lambda s: (s.speedup, s.psnr_p10))
    return best, (f"no calibrated setting reaches a {target.speedup:g}x speedup; chose the fastest one "
                  f"({best.speedup:.2f}x)")


def resolve_target(pipe: Any, target: Target, *, height: int | None = None, width: int | None = None,
                   steps: int | None = None, frames: int | None = None,
                   allowed: Callable[[Any], bool] | None = None, lora: Any = ()) -> Any:
    """The `AccelSpec` that meets `target` on this pipeline's profile, with `target_info` set; `allowed(spec)` may
    refuse settings (the server's allowed methods). Size and steps default to the model's. `lora` (the request's adapters)
    picks the profile calibrated with that set, else the base model's with a note."""
    profile, lora_note = profile_for(pipe, lora)
    if profile is None:
        name = getattr(pipe, "accel_source", None) or type(pipe).__name__
        raise NoProfileError(no_profile_message(name), field="acceleration.target")
    defaults = getattr(pipe, "accel_defaults", None)
    if defaults is not None:
        height, width = height or defaults.height, width or defaults.width
        steps, frames = steps or defaults.num_inference_steps, frames or defaults.num_frames
    bucket, bucket_note = choose_bucket(profile, height, width, steps, frames)
    check = None if allowed is None else (lambda s: allowed(parse_spec(s.spec)))
    chosen, note = choose_setting(bucket, target, check)
    spec = parse_spec(chosen.spec)
    notes = [n for n in (note, bucket_note, lora_note) if n]
    if profile.random_weights:
        notes.append("profile calibrated on random weights")
    guard = target.guard and target.psnr is not None
    spec.target_info = {
        "target": target.model_dump(exclude_none=True),
        "chosen": chosen.spec,
        "expected_psnr": {"median": round(chosen.psnr_median, 2), "p10": round(chosen.psnr_p10, 2)},
        "expected_speedup": round(chosen.speedup, 3),
        "expected_work": round(chosen.work, 4),
        "bucket": bucket.describe(),
        "met": note is None,
        "guard": guard,
        "note": "; ".join(notes) or None,
    }
    spec.guard_psnr = target.psnr if guard else None
    return spec
