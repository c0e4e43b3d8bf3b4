"""Server settings: environment variables (prefix `ACCEL_`, nested with `__`) and an optional YAML/TOML file,
validated at start-up. A bad setting stops the server with a message naming it.

    ACCEL_QUEUE_SIZE=64 ACCEL_API_KEYS='["secret"]' accel-server --config server.yaml
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from accel.errors import SpecError, validation_errors
from accel.loading import DEFAULT_MODEL
from accel.lora import LORA_NAME_PATTERN
from accel.spec import AccelSpec, method_schemas, parse_spec


# the playground page's static files (`server/static`): they hold no data, and a browser's navigation cannot send
# a bearer header; the API calls the page makes send the key typed on it
PLAYGROUND_PATHS = ["/", "/static/index.html", "/static/playground.js", "/static/playground.css"]


class ModelSettings(BaseModel):
    """One model the server loads at start-up. Requests can only name configured ids."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(..., min_length=1, max_length=100, pattern=r"^[A-Za-z0-9][\w.-]*$")
    source: str = Field(..., description="built-in name, local diffusers directory, or hub id")
    dtype: str | None = Field(None, description="float32, bfloat16, float16 (default: by device)")
    default_preset: str = Field("off", description="acceleration when a request gives none")
    prune_plan: str | None = Field(None, description="pruning plan file applied at load")
    prune_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    prune_plans: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9][\w.-]{0,63}$")], str] = Field(
        default_factory=dict, description="plans per-call pruning may use: name -> plan file; requests name them "
        "(prune:plan=<name>), never a path")
    loras: dict[Annotated[str, Field(pattern=LORA_NAME_PATTERN)], str] = Field(
        default_factory=dict, description="LoRA adapters requests may activate: name -> local diffusers/PEFT LoRA file "
        "(or a directory holding pytorch_lora_weights.safetensors), loaded and checked against the model at start-up; "
        "requests name them (`lora: [{\"name\": ..., \"scale\": ...}]`), never a path")
    builtin_loras: bool = Field(True, description="also offer a built-in model's own adapters (shapes-flux: star)")
    compile: bool = False
    profile: str | list[str] | None = Field(None, description="calibrated profile file(s) (`accel calibrate`) for "
                                            "fidelity targets: the base model's, and one per LoRA adapter set "
                                            "(`accel calibrate --lora ...`); refused at start-up when calibrated on "
                                            "another model or with adapters the model does not offer")
    calibrate: bool = Field(False, description="calibrate the model on first load when no profile fits it (cached "
                            "under calibration_dir; /ready says 'calibrating' with progress meanwhile)")
    calibration_prompts: str | None = Field(None, description="file of calibration prompts (default: built-in ones)")


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ACCEL_", env_nested_delimiter="__", extra="forbid")

    models: list[ModelSettings] = Field(default_factory=lambda: [ModelSettings(id=DEFAULT_MODEL, source=DEFAULT_MODEL)])
    device: str | None = Field(None, description="cpu, cuda, cuda:0 (default: cuda if present)")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    queue_size: int = Field(32, ge=1, le=100000, description="requests waiting (not running) before 429")
    max_batch_size: int = Field(4, ge=1, le=64)
    max_batch_wait_ms: float = Field(10.0, ge=0.0, le=10000.0)
    request_timeout_s: float = Field(300.0, gt=0.0, description="default per-request deadline (504 after)")
    max_pixels: int = Field(1024 * 1024, ge=64 * 64)
    max_frames: int = Field(129, ge=1)
    max_steps: int = Field(100, ge=1)
    max_n: int = Field(4, ge=1, le=16)
    max_prompt_chars: int = Field(2000, ge=1)
    max_body_bytes: int = Field(1_000_000, ge=1024, description="request body, uploaded files included (413 beyond)")
    max_input_images: int = Field(4, ge=1, le=16, description="input images one request may upload (edits)")
    max_input_pixels: int = Field(
        2048 * 2048, ge=64 * 64, le=Image.MAX_IMAGE_PIXELS,
        description="pixels of one uploaded image, read from its header before it is decoded (400 beyond)")
    allowed_methods: list[str] | None = Field(
        None, description="accelerator methods requests (and presets) may use; None: all, []: none")
    method_limits: dict[str, dict[str, tuple[float, float]]] = Field(
        default_factory=dict, description='per method, the range each numeric knob must lie in, e.g. '
        '{"sparse_attention": {"sparsity": [0.5, 0.9]}}')
    api_docs: bool = Field(False, description="serve /docs and /redoc (their scripts load from a CDN)")
    api_keys: list[SecretStr] = Field(default_factory=list, description="Bearer keys; empty: no auth")
    shutdown_grace_s: float = Field(30.0, ge=0.0)
    job_ttl_s: float = Field(3600.0, gt=0.0, description="finished video jobs are forgotten after this")
    max_jobs: int = Field(1000, ge=1, description="video jobs kept (queued, running or finished)")
    job_store: Literal["memory", "redis"] = Field(
        "memory", description="where video jobs live: this process (one replica) or Redis (shared by replicas)")
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis for job_store=redis (redis://, rediss://, unix://)")
    redis_prefix: str = Field("accel:", min_length=1, max_length=100, description="key prefix in Redis")
    job_poll_s: float = Field(0.25, gt=0.0, le=60.0, description="how often queued jobs check for a cancel elsewhere")
    warmup: bool = Field(True, description="run one tiny generation per model before /ready turns true")
    calibration_dir: str | None = Field(None, description="where profiles calibrated on load are kept "
                                        "(<dir>/<model id>.json), and looked up for models without one")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    public_paths: list[str] = Field(
        default_factory=lambda: ["/health", "/ready", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect",
                                 "/redoc", *PLAYGROUND_PATHS],
        description="paths answered without an API key when api_keys are set (exact paths); every other needs one")
    body_timeout_s: float = Field(20.0, gt=0.0, le=3600.0, description="time for a request's body to arrive (408)")
    max_header_bytes: int = Field(16384, ge=1024, le=1 << 20, description="request line and headers (400 beyond)")
    max_connections: int = Field(1024, ge=1, description="connections and requests at once (uvicorn's 503 beyond)")

    @field_validator("models")
    @classmethod
    def _models(cls, models: list[ModelSettings]) -> list[ModelSettings]:
        if not models:
            raise ValueError("at least one model is required")
        ids = [m.id for m in models]
        if len(set(ids)) != len(ids):
            raise ValueError(f"model ids must be unique, got {ids}")
        for model in models:
            parse_spec(model.default_preset, plans=model.prune_plans)  # a SpecError (a ValueError) names it
        return models

    @model_validator(mode="after")
    def _calibration(self) -> "ServerSettings":
        for model in self.models:
            if model.calibrate and not self.calibration_dir:
                raise ValueError(f"model {model.id}: calibrate: true needs calibration_dir (where profiles are kept)")
        return self

    @field_validator("allowed_methods")
    @classmethod
    def _allowed_methods(cls, names: list[str] | None) -> list[str] | None:
        unknown = set(names or ()) - set(method_schemas())
        if unknown:
            raise ValueError(f"unknown methods {sorted(unknown)}; known: {', '.join(method_schemas())}")
        return names

    @field_validator("method_limits")
    @classmethod
    def _method_limits(cls, limits: dict[str, dict[str, tuple[float, float]]]) -> dict:
        schemas = method_schemas()
        for method, knobs in limits.items():
            if method not in schemas:
                raise ValueError(f"unknown method {method!r}; known: {', '.join(schemas)}")
            for knob, (low, high) in knobs.items():
                if knob == "method" or knob not in schemas[method]["schema"]["properties"]:
                    raise ValueError(f"{method} has no knob {knob!r}")
                if low > high:
                    raise ValueError(f"{method}.{knob}: the range [{low}, {high}] is empty")
        return limits

    @model_validator(mode="after")
    def _presets_allowed(self) -> "ServerSettings":
        for model in self.models:
            try:
                self.check_spec(parse_spec(model.default_preset, plans=model.prune_plans))
            except SpecError as exc:
                raise ValueError(f"model {model.id}: default_preset: {exc}") from None
        return self

    def check_spec(self, spec: AccelSpec) -> None:
        """Refuse (SpecError naming `acceleration.<method>[.<knob>]`) a spec that uses a method this server does
        not allow or a knob outside its limits: the operator decides which costs clients may ask for."""
        for config in spec:
            if self.allowed_methods is not None and config.method not in self.allowed_methods:
                allowed = ", ".join(self.allowed_methods) or "none"
                raise SpecError(f"acceleration.{config.method}: not allowed on this server; allowed: {allowed}",
                                field=config.method)
            for knob, (low, high) in self.method_limits.get(config.method, {}).items():
                value = getattr(config, knob)
                for number in value if isinstance(value, (list, tuple)) else [value]:
                    if isinstance(number, (int, float)) and not isinstance(number, bool) and not low <= number <= high:
                        raise SpecError(f"acceleration.{config.method}.{knob}: {number} is outside this server's "
                                        f"limits [{low}, {high}]", field=f"{config.method}.{knob}")

    @field_validator("public_paths")
    @classmethod
    def _public_paths(cls, paths: list[str]) -> list[str]:
        bad = [p for p in paths if not p.startswith("/")]
        if bad:
            raise ValueError(f"paths start with '/', got {bad}")
        return paths

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, url: str) -> str:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"must start with redis://, rediss:// or unix://, got {url!r}")
        return url


class SettingsError(ValueError):
    """Invalid server settings: the message names each bad setting."""


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> ServerSettings:
    """Settings: explicit overrides win over the config file (YAML, TOML or JSON), which wins over `ACCEL_*`
    environment variables, which win over the defaults."""
    data: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise SettingsError(f"config file {path} does not exist")
        text = path.read_text()
        try:
            if path.suffix in (".toml",):
                data = tomllib.loads(text)
            elif path.suffix in (".json",):
                data = json.loads(text)
            else:
                import yaml

                data = yaml.safe_load(text) or {}
        except Exception as exc:  # noqa: BLE001 - any parse error is one message
            raise SettingsError(f"config file {path}: {exc}") from None
        if not isinstance(data, dict):
            raise SettingsError(f"config file {path}: expected a mapping of settings")
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return ServerSettings(**data)
    except ValidationError as exc:
        raise SettingsError("invalid settings: " + validation_errors(exc.errors())[0]) from None
    except ValueError as exc:
        raise SettingsError(f"invalid settings: {exc}") from None
