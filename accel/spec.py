"""Parse and validate accelerator specs.

A spec may be given as: None or [] (no acceleration); a `MethodConfig`; a dict with a `method` key; a JSON
string (object or list); a shorthand `method:key=value,key=value` (values are JSON where they parse, e.g.
`sortblock:K=4,beta=0.2`, `x:layers=[0,1]`); a preset name (`accel.presets`); or a list of any of these
(composition; in one string, items are joined with `;`). The result is a list of validated configs in application order (`accel.methods`).

A fidelity target (`{"target": {"psnr": 35}}`, `{"target": {"speedup": 2.5}}` or `target:psnr=35`) parses to an
empty `AccelSpec` carrying `target`; it needs the model's calibrated profile, so it is resolved where the pipeline
is known (`accel.calibration.target.resolve_target`, called by `accelerate` and `generate_batch`).
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Annotated, Any, Collection, Union

from pydantic import Field, TypeAdapter, ValidationError

from accel.adapters import ADAPTERS, PIPELINE_TASKS
from accel.base import MethodConfig
from accel.calibration.profile import Target
from accel.errors import SpecError, validation_errors
from accel.methods import APPLICATION_ORDER, METHODS
from accel.presets import PRESETS


@lru_cache(maxsize=1)
def _spec_adapter() -> TypeAdapter:
    configs = tuple(method.config_cls for method in METHODS.values())
    union = Annotated[Union[configs], Field(discriminator="method")]  # type: ignore[valid-type]
    return TypeAdapter(union)


def method_names() -> str:
    return ", ".join(METHODS)


class AccelSpec(list):
    """A validated spec: configs in application order, each method at most once, no conflicting methods.

    What `parse_spec` returns and what `accelerate` and `generate_batch` take without parsing again. `key` is its
    canonical form (equal for equal specs however they were written), used to batch requests together.

    `target`: an unresolved fidelity target (the spec has no configs yet); `target_info`: how a resolved target
    chose these configs (for the report); `guard_psnr`: the PSNR the fidelity guard holds the call to."""

    target: Any = None
    target_info: dict[str, Any] | None = None
    guard_psnr: float | None = None

    @property
    def key(self) -> str:
        if self.target is not None:
            return self.target.shorthand()
        key = ";".join(config.shorthand() for config in self) or "off"
        return key + (f";guard={self.guard_psnr:g}" if self.guard_psnr is not None else "")

    def to_json(self) -> list[dict[str, Any]]:
        return [config.model_dump(mode="json") for config in self]

    @property
    def batch_invariant(self) -> bool:
        """Whether every output is the same alone as inside a batch (see `Method.batch_invariant`)."""
        return all(METHODS[config.method].batch_invariant for config in self)

    def method(self, name: str) -> MethodConfig | None:
        return next((config for config in self if config.method == name), None)


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
            raise SpecError(f"{method.strip()}: expected key=value, got {item!r}", field=method.strip())
        spec[key.strip()] = _parse_value(value.strip())
    return spec


def validate_one(item: Any, context: dict[str, Any] | None = None) -> MethodConfig:
    """One spec item (config, dict or shorthand without presets) -> validated config. `context` reaches the
    configs' validators (e.g. the plan names `prune` accepts), also for a config passed in as an object."""
    if isinstance(item, MethodConfig):
        if context is None:
            return item
        item = item.model_dump()
    if isinstance(item, str):
        item = parse_shorthand(item)
    if not isinstance(item, dict):
        raise SpecError(f"accelerator spec must be an object, a string or a list, got {type(item).__name__}")
    method = item.get("method")
    if not isinstance(method, str) or method not in METHODS:
        raise SpecError(f"unknown accelerator method {method!r}; known methods: {method_names()}", field="method")
    try:
        return _spec_adapter().validate_python(item, context=context)
    except ValidationError as exc:
        message, field = validation_errors(exc.errors(), prefix=method)
        raise SpecError(message, field=field) from None


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


def _target_of(item: Any) -> Any:
    """The `Target` of a target item (`{"target": {...}}`, `{"method": "target", ...}`, `target:psnr=35`), else None."""
    if isinstance(item, str) and item.strip().startswith("target:"):
        item = parse_shorthand(item.strip())
    if isinstance(item, dict) and "method" not in item and "target" in item:
        if len(item) != 1:
            raise SpecError('target: give the target alone, e.g. {"target": {"psnr": 35}}', field="target")
        values = item["target"]
    elif isinstance(item, dict) and item.get("method") == "target":
        values = {k: v for k, v in item.items() if k != "method"}
    else:
        return None
    if not isinstance(values, dict):
        raise SpecError('target: must be an object, e.g. {"psnr": 35} or {"speedup": 2.5}', field="target")
    try:
        return Target.model_validate(values)
    except ValidationError as exc:
        message, field = validation_errors(exc.errors(), prefix="target")
        raise SpecError(message, field=field) from None


def parse_spec(spec: Any, *, plans: Collection[str] | None = None) -> AccelSpec:
    """Validate a spec (any accepted form) into configs in application order; errors name the field.

    `plans`: when given, the only prune plan names the spec may use (the server passes the model's configured
    plans, so a request can never name a file); None (the library) also accepts plan file paths.

    Conflicts are checked here, once, from what each `Method` declares: at most one method of an `exclusive`
    group, and none of the methods a method `conflicts` with."""
    if isinstance(spec, AccelSpec) and (plans is None or spec.target is not None):
        return spec
    context = {"plans": frozenset(plans)} if plans is not None else None
    items = _expand(spec)
    targets = [target for target in map(_target_of, items) if target is not None]
    if targets:
        if len(items) > 1:
            raise SpecError("target: cannot be combined with methods or another target (the target chooses the "
                            "methods from the model's calibrated profile)", field="target")
        result = AccelSpec()
        result.target = targets[0]
        return result
    configs = [validate_one(item, context) for item in items]
    names = [config.method for config in configs]
    groups: dict[str, str] = {}
    for name in names:
        method = METHODS[name]
        if names.count(name) > 1:
            raise SpecError(f"{name}: given twice in one spec", field=name)
        for other in method.conflicts:
            if other in names:
                raise SpecError(f"{name}: cannot be combined with {other}", field=name)
        if method.exclusive is not None:
            if method.exclusive in groups:
                raise SpecError(
                    f"{name}: cannot be combined with {groups[method.exclusive]} "
                    f"(both are '{method.exclusive}' methods; pick one)", field=name,
                )
            groups[method.exclusive] = name
    return AccelSpec(sorted(configs, key=lambda c: APPLICATION_ORDER.index(c.method)))


def method_schemas() -> dict[str, dict[str, Any]]:
    """Every method's JSON schema, one-line summary, families and batching behaviour (for `GET /v1/accelerators`
    and `--help`)."""
    return {
        name: {"summary": method.summary, "schema": method.config_cls.model_json_schema(),
               "families": list(method.families) if method.families else None,
               "batch_invariant": method.batch_invariant}
        for name, method in METHODS.items()
    }


def support_matrix() -> str:
    """Family x method as a markdown table, from the adapters and `Method.families` (README's table is this text;
    `accel methods --matrix` prints it). "yes": the conformance matrix runs the method on the family; "no": refused
    with the families it supports named."""
    header = "| family | pipelines (checked) | " + " | ".join(f"`{name}`" for name in METHODS) + " |"
    rows = [header, "|" + "---|" * (len(METHODS) + 2)]
    for family, adapter in ADAPTERS.items():
        pipelines = ", ".join(
            f"{cls} ({'/'.join(PIPELINE_TASKS.get(cls, (adapter.task,)))})" for cls in adapter.pipeline_classes)
        cells = ["yes" if m.families is None or family in m.families else "no" for m in METHODS.values()]
        rows.append(f"| {family} | {pipelines} | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"
