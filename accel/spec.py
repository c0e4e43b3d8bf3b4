"""Parse and validate accelerator specs.

A spec may be given as: None or [] (no acceleration); a `MethodConfig`; a dict with a `method` key; a JSON
string (object or list); a shorthand `method:key=value,key=value` (values are JSON where they parse, e.g.
`sortblock:K=4,beta=0.2`, `x:layers=[0,1]`); a preset name (`accel.presets`); or a list of any of these
(composition; in one string, items are joined with `;`). The result is a list of validated configs in application order (`accel.methods`).
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Annotated, Any, Union

from pydantic import Field, TypeAdapter, ValidationError

from accel.base import MethodConfig
from accel.errors import SpecError
from accel.methods import APPLICATION_ORDER, METHODS
from accel.presets import PRESETS


@lru_cache(maxsize=1)
def _spec_adapter() -> TypeAdapter:
    configs = tuple(method.config_cls for method in METHODS.values())
    union = Annotated[Union[configs], Field(discriminator="method")]  # type: ignore[valid-type]
    return TypeAdapter(union)


def method_names() -> str:
    return ", ".join(METHODS)


def _format_validation_error(method: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if p != method]
        field = ".".join([method, *loc]) if loc else method
        parts.append(f"{field}: {err['msg']}")
    return "; ".join(parts)


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets or quotes."""
    parts, depth, quote, current = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        lowered = text.lower()
        if lowered in ("true", "false"):
            return lowered == "true"
        if lowered in ("none", "null"):
            return None
        return text


def parse_shorthand(text: str) -> dict[str, Any]:
    """`method:key=value,...` -> dict."""
    method, _, rest = text.partition(":")
    spec: dict[str, Any] = {"method": method.strip()}
    for item in _split_top_level(rest):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"{method.strip()}: expected key=value, got {item!r}")
        spec[key.strip()] = _parse_value(value.strip())
    return spec


def validate_one(item: Any) -> MethodConfig:
    """One spec item (config, dict or shorthand without presets) -> validated config."""
    if isinstance(item, MethodConfig):
        return item
    if isinstance(item, str):
        item = parse_shorthand(item)
    if not isinstance(item, dict):
        raise SpecError(f"accelerator spec must be an object, a string or a list, got {type(item).__name__}")
    method = item.get("method")
    if method not in METHODS:
        raise SpecError(f"unknown accelerator method {method!r}; known methods: {method_names()}")
    try:
        return _spec_adapter().validate_python(item)
    except ValidationError as exc:
        raise SpecError(_format_validation_error(method, exc)) from None


def _expand(spec: Any) -> list[Any]:
    """Flatten lists, presets and JSON strings into a list of single items."""
    if spec is None:
        return []
    if isinstance(spec, (list, tuple)):
        return [item for element in spec for item in _expand(element)]
    if isinstance(spec, str):
        text = spec.strip()
        if not text or text in ("none", "off"):
            return []
        if text[0] in "[{":
            try:
                return _expand(json.loads(text))
            except json.JSONDecodeError as exc:
                raise SpecError(f"accelerator spec is not valid JSON: {exc}") from None
        if ";" in text:  # composition in one string: "fbcache:threshold=0.1;magcache"
            return _expand([part for part in text.split(";") if part.strip()])
        if text in PRESETS:
            return _expand(PRESETS[text])
        if ":" not in text and text not in METHODS:
            raise SpecError(
                f"unknown accelerator or preset {text!r}; presets: {', '.join(PRESETS)}; methods: {method_names()}"
            )
        return [text]
    return [spec]


def parse_spec(spec: Any) -> list[MethodConfig]:
    """Validate a spec (any accepted form) into configs in application order; errors name the field."""
    configs = [validate_one(item) for item in _expand(spec)]
    seen: dict[str, str] = {}
    groups: dict[str, str] = {}
    for config in configs:
        if config.method in seen:
            raise SpecError(f"{config.method}: given twice in one spec")
        seen[config.method] = config.method
        group = METHODS[config.method].exclusive
        if group is not None:
            if group in groups:
                raise SpecError(
                    f"{config.method}: cannot be combined with {groups[group]} (both are '{group}' methods; pick one)"
                )
            groups[group] = config.method
    return sorted(configs, key=lambda c: APPLICATION_ORDER.index(c.method))


def spec_to_json(configs: list[MethodConfig]) -> list[dict[str, Any]]:
    return [c.model_dump(mode="json") for c in configs]


def method_schemas() -> dict[str, dict[str, Any]]:
    """Every method's JSON schema and one-line summary (for `GET /v1/accelerators` and `--help`)."""
    return {
        name: {"summary": method.summary, "schema": method.config_cls.model_json_schema()}
        for name, method in METHODS.items()
    }
