"""Block pruning plans: the plan file and physical removal at load (the per-call method is `accel/pruning/prune.py`).

A plan (written by `accel prune calibrate`, see `accel/pruning/importance.py`) is JSON:

    {"format": "accel-prune-plan/1",
     "fingerprint": {"transformer_class": "FluxTransformer2DModel", "config_hash": "<sha256 of the config>",
                     "blocks": {"transformer_blocks": 4, "single_transformer_blocks": 8}},
     "calibration": {"prompts": [...], "steps": 8, "seeds": 1, "height": 256, "width": 256},
     "protected": ["transformer_blocks.0", "single_transformer_blocks.0"],
     "scores": {"influence": {"transformer_blocks.1": 0.12, ...}, "drop_one": {...}},
     "angular": {"transformer_blocks": {"1": [d(x_0, x_1), d(x_1, x_2), ...], "2": [...], ...}, ...},
     "orders": {"influence": [...], "drop_one": [...]},
     "recommended": "drop_one",
     "order": [...]}                      # = orders[recommended]: least important block first

Blocks are named "stack.index" (e.g. "single_transformer_blocks.3"), indices of the unpruned model. The config hash
covers every public config key (not `_name_or_path`, `_diffusers_version`), so a plan only fits the architecture it
was calibrated on, and not a model that is already pruned.

Which blocks a ratio r removes (`Plan.select`):
- "influence" / "drop_one": the first round(r * total blocks) of that score's global order (all stacks together:
  the scores say which stack can lose more);
- "angular" (Gromov et al.): per stack, n = round(r * n_blocks) contiguous blocks l..l+n-1 whose run has the
  smallest angular distance d(x_l, x_{l+n}); runs never contain a protected block.
Protected (never pruned): the first block of each stack, and any block built differently from its neighbours
(`context_pre_only`: SD3's last block, which a fresh model builds from `num_layers`, so removing it would not
load back).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from accel.adapters import ModelAdapter, adapter_for, parse_block_name
from accel.errors import AccelError

PLAN_FORMAT = "accel-prune-plan/1"
SCORES = ("influence", "angular", "drop_one")
# the transformer config key that records each stack's block count, per family
CONFIG_KEYS: dict[tuple[str, str], str] = {
    ("flux", "transformer_blocks"): "num_layers",
    ("flux", "single_transformer_blocks"): "num_single_layers",
    ("wan", "blocks"): "num_layers",
    ("sd3", "transformer_blocks"): "num_layers",
}


# -- names, fingerprint, protection ---------------------------------------------------------------------------
def block_sizes(transformer: torch.nn.Module, adapter: ModelAdapter | None = None) -> dict[str, int]:
    return (adapter or adapter_for(transformer)).block_sizes(transformer)


def protected_blocks(transformer: torch.nn.Module, adapter: ModelAdapter | None = None) -> list[str]:
    """First block of each stack, plus blocks built differently from the rest (context_pre_only)."""
    adapter = adapter or adapter_for(transformer)
    names = []
    for stack, blocks in adapter.block_stacks(transformer).items():
        for index, block in enumerate(blocks):
            if index == 0 or getattr(block, "context_pre_only", False):
                names.append(f"{stack}.{index}")
    return names


def config_hash(transformer: torch.nn.Module) -> str:
    public = {k: v for k, v in dict(transformer.config).items() if not k.startswith("_")}
    return hashlib.sha256(json.dumps(public, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(transformer: torch.nn.Module) -> dict[str, Any]:
    return {"transformer_class": type(transformer).__name__, "config_hash": config_hash(transformer),
            "blocks": block_sizes(transformer)}


# -- the plan -------------------------------------------------------------------------------------------------
@dataclass
class Plan:
    fingerprint: dict[str, Any]
    protected: list[str]
    scores: dict[str, dict[str, float]]  # score name -> block -> value (higher = more important)
    angular: dict[str, dict[str, list[float]]]  # stack -> run length n -> d(x_l, x_{l+n}) for l = 0..N-n
    recommended: str = "drop_one"
    calibration: dict[str, Any] = field(default_factory=dict)

    def order(self, score: str) -> list[str]:
        """Blocks by increasing importance (the first is removed first), protected blocks left out."""
        values = self.scores[score]
        return sorted((b for b in values if b not in self.protected), key=lambda b: (values[b], b))

    def to_dict(self) -> dict[str, Any]:
        orders = {name: self.order(name) for name in self.scores}
        return {"format": PLAN_FORMAT, "fingerprint": self.fingerprint, "calibration": self.calibration,
                "protected": self.protected, "scores": self.scores, "angular": self.angular, "orders": orders,
                "recommended": self.recommended, "order": orders.get(self.recommended, [])}

    @classmethod
    def from_dict(cls, data: Any) -> "Plan":
        """A plan from its JSON; anything that is not a plan of this format is an AccelError (whose message does
        not echo the file's content)."""
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise AccelError(f"prune plan: not a plan file (expected format {PLAN_FORMAT!r})")
        try:
            plan = cls(fingerprint=dict(data["fingerprint"]), protected=[str(n) for n in data["protected"]],
                       scores={str(k): {str(b): float(v) for b, v in d.items()} for k, d in data["scores"].items()},
                       angular=dict(data.get("angular", {})), recommended=str(data.get("recommended", "drop_one")),
                       calibration=dict(data.get("calibration", {})))
            if not isinstance(plan.fingerprint.get("blocks"), dict):
                raise TypeError("fingerprint.blocks")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise AccelError(f"prune plan: malformed {PLAN_FORMAT} file ({type(exc).__name__}: {exc})") from None
        return plan

    def save(self, path: str | Path) -> Path:
        """Write atomically: a partial plan never appears under `path`."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)
        return path

    def check(self, transformer: torch.nn.Module) -> None:
        """Refuse a plan calibrated on another model, naming what differs."""
        mine = fingerprint(transformer)
        diffs = [f"{key}: plan {self.fingerprint.get(key)!r}, model {mine[key]!r}"
                 for key in ("transformer_class", "blocks", "config_hash") if self.fingerprint.get(key) != mine[key]]
        if diffs:
            raise AccelError("prune plan does not match this model (was it calibrated on another model, or is the "
                             "model already pruned?): " + "; ".join(diffs))

    def select(self, ratio: float, score: str = "recommended") -> list[str]:
        """Blocks to remove for `ratio` of all blocks, by `score` (see the module docstring)."""
        score = self.recommended if score == "recommended" else score
        if not 0.0 <= ratio < 1.0:
            raise AccelError(f"prune ratio must be in [0, 1), got {ratio}")
        if score not in SCORES or (score != "angular" and score not in self.scores):
            raise AccelError(f"prune score {score!r} not in this plan; available: {', '.join(self.available())}")
        if ratio == 0.0:
            return []
        sizes = self.fingerprint["blocks"]
        if score != "angular":
            return self.order(score)[: round(ratio * sum(sizes.values()))]
        chosen = []
        for stack, n_blocks in sizes.items():
            n = min(round(ratio * n_blocks), n_blocks - 1)
            if n <= 0:
                continue
            runs = self.angular[stack][str(n)]
            best = None
            for start in range(1, n_blocks - n + 1):
                run = [f"{stack}.{i}" for i in range(start, start + n)]
                if any(b in self.protected for b in run):
                    continue
                if best is None or runs[start] < runs[best[0]]:
                    best = (start, run)
            if best is not None:
                chosen.extend(best[1])
        return chosen

    def available(self) -> list[str]:
        return [*self.scores, *(["angular"] if self.angular else [])]


MAX_PLAN_BYTES = 16 * 2**20  # plans are kilobytes; a larger file is not one


@lru_cache(maxsize=16)
def _read(path: str, mtime: float) -> Plan:
    try:
        if Path(path).stat().st_size > MAX_PLAN_BYTES:
            raise AccelError(f"prune plan {path!r}: larger than {MAX_PLAN_BYTES} bytes, not a plan file")
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise AccelError(f"prune plan {path!r}: cannot read: {type(exc).__name__}") from None
    return Plan.from_dict(data)


def load_plan(path: str | Path) -> Plan:
    """The plan in a file (a path from the library's own caller or the server's settings, never a request)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise AccelError(f"prune plan {str(path)!r}: no such file")
    return _read(str(path.resolve()), path.stat().st_mtime)


def load_plans(pipe: Any, plans: dict[str, str | Path]) -> dict[str, Plan]:
    """Named plans for per-call pruning (`prune:plan=<name>`), each checked against the pipeline's transformer;
    kept as `pipe.accel_prune_plans`. The server configures them per model so that requests name plans, never
    paths."""
    loaded = {}
    for name, path in plans.items():
        try:
            plan = load_plan(path)
            plan.check(pipe.transformer)
        except AccelError as exc:
            raise AccelError(f"prune plan {name!r}: {exc}", field=f"prune_plans.{name}") from None
        loaded[name] = plan
    pipe.accel_prune_plans = loaded
    return loaded


# -- physical removal (at load) ---------------------------------------------------------------------------------
def remove_blocks(transformer: torch.nn.Module, names: list[str]) -> list[str]:
    """Remove blocks from the transformer for good: rebuild each stack's ModuleList and update the config, so
    `save_pretrained` -> `from_pretrained` gives back the pruned model. Returns the removed names."""
    adapter = adapter_for(transformer)
    sizes = block_sizes(transformer, adapter)
    protected = set(protected_blocks(transformer, adapter))
    drop: dict[str, set[int]] = {stack: set() for stack in sizes}
    for name in names:
        if name in protected:
            raise AccelError(f"prune: {name} is protected (first block of its stack, or built differently)")
        stack, index = parse_block_name(name, sizes, "prune")
        drop[stack].add(index)
    config = dict(transformer.config)
    for stack, indices in drop.items():
        if not indices:
            continue
        blocks = getattr(transformer, stack)
        kept = [i for i in range(len(blocks)) if i not in indices]
        setattr(transformer, stack, torch.nn.ModuleList([blocks[i] for i in kept]))
        updates = {CONFIG_KEYS[(adapter.family, stack)]: len(kept)}
        dual = config.get("dual_attention_layers")  # SD3.5: indices of blocks with a second attention
        if adapter.family == "sd3" and dual:
            updates["dual_attention_layers"] = tuple(new for new, old in enumerate(kept) if old in set(dual))
        transformer.register_to_config(**updates)
    return sorted(names)


def prune_pipeline(pipe: Any, plan: str | Path | Plan, ratio: float, score: str = "recommended") -> list[str]:
    """Check `plan` against the pipeline's transformer and remove `ratio` of its blocks; record what was done."""
    plan = plan if isinstance(plan, Plan) else load_plan(plan)
    plan.check(pipe.transformer)
    removed = remove_blocks(pipe.transformer, plan.select(ratio, score))
    pipe.accel_pruned = {"ratio": ratio, "score": score, "removed": removed}
    return removed
