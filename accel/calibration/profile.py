"""Calibrated speed/fidelity profiles: what `accel calibrate` writes and what a fidelity target is chosen from.

A profile is JSON (`accel-profile/1`), validated by pydantic at load, so a corrupt, truncated or hand-broken file is
one clear `ProfileError` when it is read, never a crash in the middle of a request:

    {"format": "accel-profile/1", "model": "shapes-flux",
     "fingerprint": {"weights": "<sha256 of sampled weights>", "pipeline": "FluxPipeline",
                     "transformer": "FluxTransformer2DModel"},
     "random_weights": false, "command": "accel calibrate ...", "device": "cpu ...", "created": "...",
     "buckets": [{"height": 128, "width": 128, "frames": null, "steps": 28, "prompts": [...], "seed": 0,
                  "settings": [{"line": "abcache_adaptive", "spec": "abcache_adaptive:tolerance=0.1", "work": 0.22,
                                "speedup": 2.9, "psnr": [...per prompt...], "psnr_median": 42.1, "psnr_p10": 39.0,
                                ...}, ...],
                  "front": ["<spec>", ...]}],
     "estimator": {"coefficients": {"abcache_adaptive": [a, b], ...}, "default": [a, b], ...}}

The fingerprint says which model the numbers belong to: a hash of the transformer's weights (a fixed sample of
every parameter, rounded to bfloat16 so the same weights loaded in fp32 or bf16 agree), the pipeline class and the
transformer class. A bucket says at which resolution and step count they were measured; a request at another size
or step count falls back to the nearest bucket, with a note (`accel.calibration.target`). Files are written
atomically (a temporary file in the same folder, then `os.replace`), so a reader never sees half a profile.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from accel.errors import AccelError, validation_errors
from accel.lora import LoraRef, adapter_set, lora_names

PROFILE_FORMAT = "accel-profile/1"
PROFILES_DIR = Path(__file__).resolve().parents[1] / "models" / "profiles"  # built-in models' profiles (package data)
_SAMPLES_PER_PARAMETER = 1024


class ProfileError(AccelError):
    """A profile that cannot be used: unreadable, invalid, or calibrated on another model."""


class NoProfileError(AccelError):
    """A fidelity target for a model that has no calibrated profile."""


class Fingerprint(BaseModel):
    model_config = ConfigDict(extra="forbid")

    weights: str = Field(..., min_length=8, max_length=64, description="sha256 of sampled transformer weights")
    pipeline: str = Field(..., min_length=1, description="the diffusers pipeline class")
    transformer: str = Field(..., min_length=1, description="the transformer class")


class SettingStats(BaseModel):
    """One calibrated setting: its spec and what it did over the calibration prompts."""

    model_config = ConfigDict(extra="forbid")

    line: str  # the method (knob sweep) it belongs to
    spec: str
    work: float = Field(..., ge=0.0, le=2.0, description="attention computations over the plain run's (to_q)")
    speedup: float = Field(..., gt=0.0, description="plain time over this setting's, median over prompts")
    psnr: list[float] = Field(..., min_length=1, description="PSNR against the plain output, per prompt")
    psnr_median: float
    psnr_p10: float = Field(..., description="10th percentile over prompts: the bound a target is checked on")
    ssim_median: float | None = None
    adherence: float | None = Field(None, description="prompt adherence (shapes scorer) where it applies")
    error: list[float] | None = Field(None, description="the online error E per prompt (the estimator's input)")

    @model_validator(mode="after")
    def _finite(self) -> "SettingStats":
        for value in (self.work, self.speedup, self.psnr_median, self.psnr_p10, *self.psnr):
            if not math.isfinite(value):
                raise ValueError(f"{self.spec}: non-finite number")
        return self


class Bucket(BaseModel):
    """The settings measured at one resolution and step count."""

    model_config = ConfigDict(extra="forbid")

    height: int | None = Field(None, ge=1)
    width: int | None = Field(None, ge=1)
    frames: int | None = Field(None, ge=1)
    steps: int = Field(..., ge=1)
    prompts: list[str] = Field(..., min_length=1)
    seed: int = 0
    plain_adherence: float | None = None
    settings: list[SettingStats] = Field(..., min_length=1)
    front: list[str] = Field(..., min_length=1, description="specs on the Pareto front (work vs PSNR p10)")

    @model_validator(mode="after")
    def _front_known(self) -> "Bucket":
        specs = {s.spec for s in self.settings}
        unknown = [spec for spec in self.front if spec not in specs]
        if unknown:
            raise ValueError(f"front names settings that are not in the bucket: {unknown}")
        return self

    def setting(self, spec: str) -> SettingStats:
        return next(s for s in self.settings if s.spec == spec)

    def describe(self) -> str:
        size = f"{self.width}x{self.height}" if self.width and self.height else "default size"
        frames = f", {self.frames} frames" if self.frames else ""
        return f"{size}{frames}, {self.steps} steps"


class Estimator(BaseModel):
    """The fitted regression from the online errors (`accel.calibration.estimate`) to the final PSNR:
    PSNR = a + b * log10(E + 1e-6), per method (`coefficients`), else `default`."""

    model_config = ConfigDict(extra="forbid")

    feature: Literal["log10_weighted_error"] = "log10_weighted_error"
    coefficients: dict[str, list[float]] = Field(default_factory=dict)
    default: list[float] = Field(..., min_length=2, max_length=2)
    mae_db: dict[str, float] = Field(default_factory=dict, description="fit residuals per method (calibration)")
    samples: int = 0

    @model_validator(mode="after")
    def _pairs(self) -> "Estimator":
        for name, pair in self.coefficients.items():
            if len(pair) != 2 or not all(math.isfinite(v) for v in pair):
                raise ValueError(f"coefficients.{name}: expected two finite numbers")
        return self

    def predict(self, method: str | None, error: float) -> float:
        a, b = self.coefficients.get(method or "", self.default)
        return float(min(100.0, a + b * math.log10(max(error, 0.0) + 1e-6)))


class Profile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["accel-profile/1"] = PROFILE_FORMAT
    model: str
    fingerprint: Fingerprint
    random_weights: bool = False
    note: str = ""
    command: str = ""
    device: str = ""
    created: str = ""
    buckets: list[Bucket] = Field(..., min_length=1)
    estimator: Estimator | None = None
    lora: list[LoraRef] = Field(default_factory=list, description="the LoRA adapter set it was calibrated with "
                                "([]: the base model); a request with exactly this set uses it")
    lora_weights: str | None = Field(None, description="hash of those adapters' weights: a profile of another "
                                     "version of an adapter is refused")


    # -- checks ----------------------------------------------------------------------------------------------
    def check(self, pipe: Any, source: str = "profile") -> None:
        """Refuse (ProfileError) a profile calibrated on another model, naming what differs."""
        mine = fingerprint(pipe)
        diffs = [f"{key}: {source} {getattr(self.fingerprint, key)!r}, model {getattr(mine, key)!r}"
                 for key in ("pipeline", "transformer", "weights")
                 if getattr(self.fingerprint, key) != getattr(mine, key)]
        if diffs:
            name = getattr(pipe, "accel_source", None) or "this model"
            raise ProfileError(
                f"{source} was calibrated on another model ({self.model}), not on {name}: " + "; ".join(diffs)
                + f". Calibrate this model: accel calibrate --model {name} --out profile.json", field="profile")


class Target(BaseModel):
    """A fidelity target, what `{"target": {...}}` in a spec parses to (resolved by `accel.calibration.target`):
    exactly one of `psnr` (dB against the un-accelerated output) or `speedup`."""

    model_config = ConfigDict(extra="forbid")

    psnr: float | None = Field(None, ge=15.0, le=80.0, description="PSNR the 10th-percentile prompt reaches (dB)")
    speedup: float | None = Field(None, ge=1.0, le=100.0, description="the most faithful setting at least this fast")
    guard: bool = Field(True, description="PSNR targets: tighten the schedule when the running estimate falls short")

    @model_validator(mode="after")
    def _one(self) -> "Target":
        if (self.psnr is None) == (self.speedup is None):
            raise ValueError("give exactly one of psnr or speedup")
        return self

    def shorthand(self) -> str:
        kind, value = ("psnr", self.psnr) if self.psnr is not None else ("speedup", self.speedup)
        return f"target:{kind}={value:g}" + ("" if self.guard or self.psnr is None else ",guard=false")


# -- fingerprint ---------------------------------------------------------------------------------------------
def pipeline_class_name(pipe: Any) -> str:
    """The diffusers class of a pipeline (ours are subclasses of it with the same name, made at load)."""
    for cls in type(pipe).__mro__:
        if cls.__module__.startswith("diffusers."):
            return cls.__name__
    return type(pipe).__name__


def weights_hash(transformer: torch.nn.Module) -> str:
    """sha256 over every parameter's name, shape and a fixed strided sample of its values in bfloat16: the same
    weights give the same hash in fp32 and bf16, on any device, in well under a second for a large model."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_" in name:  # LoRA adapters (per request) are not the model's weights
                continue
            _digest_parameter(digest, name.replace(".base_layer", ""), param)  # PEFT wraps layers with adapters
    return digest.hexdigest()[:32]


def _digest_parameter(digest: Any, name: str, param: torch.Tensor) -> None:
    """Add a parameter's name, shape and a fixed strided sample of its values (in bfloat16) to `digest`."""
    flat = param.detach().reshape(-1)
    step = max(1, flat.numel() // _SAMPLES_PER_PARAMETER)
    sample = flat[::step][:_SAMPLES_PER_PARAMETER].to("cpu", torch.bfloat16).view(torch.int16)
    digest.update(f"{name}:{tuple(param.shape)}".encode())
    digest.update(sample.numpy().tobytes())


def adapters_hash(pipe: Any, names: list[str]) -> str:
    """sha256 over the LoRA weights of the adapters `names` in the pipeline's transformers (sampled as
    `weights_hash` samples the model's)."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for attribute in ("transformer", "transformer_2"):
            transformer = getattr(pipe, attribute, None)
            for name, param in [] if transformer is None else transformer.named_parameters():
                if "lora_" in name and any(f".{adapter}." in name for adapter in names):
                    _digest_parameter(digest, f"{attribute}.{name}", param)
    return digest.hexdigest()[:32]


def fingerprint(pipe: Any) -> Fingerprint:
    cached = pipe.__dict__.get("_accel_fingerprint")
    if cached is None:  # computed once per loaded pipeline (weights do not change after load)
        transformer = pipe.transformer
        weights = weights_hash(transformer)
        if getattr(pipe, "transformer_2", None) is not None:
            weights = hashlib.sha256((weights + weights_hash(pipe.transformer_2)).encode()).hexdigest()[:32]
        cached = Fingerprint(weights=weights, pipeline=pipeline_class_name(pipe),
                             transformer=type(transformer).__name__)
        pipe.__dict__["_accel_fingerprint"] = cached
    return cached


# -- files ---------------------------------------------------------------------------------------------------
def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile file; any problem is one `ProfileError` naming the file and what is wrong."""
    path = Path(path)
    try:
        return _read(str(path), path.stat().st_mtime_ns)
    except FileNotFoundError:
        raise ProfileError(f"profile {path}: no such file", field="profile") from None


@lru_cache(maxsize=64)
def _read(path: str, mtime: int) -> Profile:
    try:
        text = Path(path).read_text(encoding="utf-8")
        data = json.loads(text)
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"profile {path}: cannot be read: {exc}", field="profile") from None
    except json.JSONDecodeError as exc:
        raise ProfileError(f"profile {path}: not valid JSON (truncated or corrupt?): {exc}", field="profile") from None
    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ProfileError(f"profile {path}: not an {PROFILE_FORMAT} file (format {found!r})", field="profile")
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(f"profile {path}: invalid: {validation_errors(exc.errors())[0]}", field="profile") from None


def atomic_write_json(path: str | Path, data: Any) -> Path:
    """Write JSON through a temporary file in the same folder and `os.replace`: never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_profile(profile: Profile, path: str | Path) -> Path:
    return atomic_write_json(path, profile.model_dump(mode="json"))


def builtin_profile_path(name: str) -> Path:
    return PROFILES_DIR / f"{name}.json"


def attach_profile(pipe: Any, profile: Profile | str | Path, *, source: str | None = None) -> Profile:
    """Check `profile` against the pipeline and attach it, for targets and estimates: the base model's as
    `pipe.accel_profile`, one calibrated with a LoRA adapter set in `pipe.accel_lora_profiles` (by that set)."""
    if not isinstance(profile, Profile):
        source = source or f"profile {profile}"
        profile = load_profile(profile)
    profile.check(pipe, source or "profile")
    if not profile.lora:
        pipe.accel_profile = profile
        return profile
    missing = [ref.name for ref in profile.lora if ref.name not in lora_names(pipe)]
    if missing:
        raise ProfileError(f"{source or 'profile'}: calibrated with LoRA adapter(s) {', '.join(missing)} that this "
                           f"model was not loaded with (it offers: {', '.join(lora_names(pipe)) or 'none'})",
                           field="profile")
    if profile.lora_weights and profile.lora_weights != adapters_hash(pipe, [ref.name for ref in profile.lora]):
        raise ProfileError(f"{source or 'profile'}: calibrated with other weights of LoRA adapter(s) "
                           f"{', '.join(ref.name for ref in profile.lora)} than this model loaded: calibrate again",
                           field="profile")
    pipe.__dict__.setdefault("accel_lora_profiles", {})[adapter_set(profile.lora)] = profile
    return profile


def attach_builtin_profile(pipe: Any, name: str) -> Profile | None:
    """The built-in model's shipped profile, when there is one and it matches the loaded weights (a model built
    with another seed, or pruned at load, gets none); also its shipped profiles per LoRA adapter set
    (`<name>+<adapters>.json`) whose adapters the model was loaded with."""
    attached = None
    for path in [builtin_profile_path(name), *sorted(PROFILES_DIR.glob(f"{name}+*.json"))]:
        if not path.is_file():
            continue
        try:
            profile = attach_profile(pipe, load_profile(path))
        except ProfileError:
            continue
        attached = attached or (profile if not profile.lora else None)
    return attached


def profile_of(pipe: Any) -> Profile | None:
    """The base model's profile (no LoRA adapters)."""
    return getattr(pipe, "accel_profile", None)


def profile_for(pipe: Any, lora: Any = ()) -> tuple[Profile | None, str | None]:
    """The profile calibrated with this adapter set (LoraRef list), else the base model's with a note saying so."""
    key = adapter_set(lora)
    if not key:
        return profile_of(pipe), None
    own = getattr(pipe, "accel_lora_profiles", {}).get(key)
    if own is not None:
        return own, None
    described = [f"{name}={scale:g}" for name, scale in key]
    return profile_of(pipe), (f"no profile calibrated with LoRA {', '.join(described)}: chosen on the base model's "
                              f"profile (calibrate one with `accel calibrate --lora {' --lora '.join(described)}`)")
