"""PruningPlan: which units every structure keeps. Plain JSON, validated on load."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .files import write_text
from .structures import KINDS, Structure

PLAN_VERSION = 1
UNITS = ("head_dim", "head", "neuron")


class PlanError(ValueError):
    """A plan that is malformed or does not fit the model it is applied to."""


@dataclass
class StructurePlan:
    """kept: sorted indices of kept units; total: units before pruning.

    unit "head_dim": kept dimensions j, the same in every head and in q, k, v;
    unit "head": kept heads; unit "neuron": kept MLP hidden neurons.
    num_heads / head_dim / hidden: the structure's original shape, checked on apply.
    """

    kind: str
    unit: str
    total: int
    kept: list[int]
    num_heads: int = 0
    head_dim: int = 0
    hidden: int = 0

    @property
    def pruned(self) -> int:
        return self.total - len(self.kept)


@dataclass
class PruningPlan:
    structures: dict[str, StructurePlan]
    model_class: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    version: int = PLAN_VERSION

    # ---- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "upop-plan",
            "version": self.version,
            "model_class": self.model_class,
            "stats": self.stats,
            "structures": {name: asdict(sp) for name, sp in self.structures.items()},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def save(self, path: str | os.PathLike) -> None:
        write_text(path, self.to_json())  # never leaves a half-written plan under the real name

    @classmethod
    def load(cls, path: str | os.PathLike) -> PruningPlan:
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"plan file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except (ValueError, RecursionError) as exc:  # bad UTF-8, bad JSON, absurd nesting or numbers
            raise PlanError(f"plan file {path} is not valid JSON: {str(exc)[:200]}") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "plan") -> PruningPlan:
        def bad(msg: str) -> PlanError:
            return PlanError(f"{source}: {msg}")

        if not isinstance(data, dict) or data.get("format") != "upop-plan":
            raise bad("not a upop plan (missing 'format': 'upop-plan')")
        if data.get("version") != PLAN_VERSION:
            raise bad(f"plan version {data.get('version')!r} is not supported (expected {PLAN_VERSION})")
        raw = data.get("structures")
        if not isinstance(raw, dict) or not raw:
            raise bad("'structures' must be a non-empty object")
        structures = {}
        for name, entry in raw.items():
            structures[name] = _structure_plan(entry, lambda m, n=name: bad(f"structure {n!r}: {m}"))
        stats = data.get("stats", {})
        model_class = data.get("model_class", "")
        if not isinstance(stats, dict) or not isinstance(model_class, str):
            raise bad("'stats' must be an object and 'model_class' a string")
        return cls(structures=structures, model_class=model_class, stats=stats)

    # ---- checks and summaries -------------------------------------------------------------
    def check_fits(self, structures: list[Structure]) -> None:
        """Raise PlanError naming the first mismatch between this plan and a model's structures."""
        found = {s.name: s for s in structures}
        for name, sp in self.structures.items():
            s = found.get(name)
            if s is None:
                raise PlanError(f"plan names structure {name!r}, which the model does not have")
            if s.kind != sp.kind:
                raise PlanError(f"{name}: plan says {sp.kind}, the model has {s.kind}")
            if (s.num_heads, s.head_dim, s.hidden) != (sp.num_heads, sp.head_dim, sp.hidden):
                raise PlanError(
                    f"{name}: plan was made for (heads={sp.num_heads}, head_dim={sp.head_dim}, "
                    f"hidden={sp.hidden}); the model has (heads={s.num_heads}, "
                    f"head_dim={s.head_dim}, hidden={s.hidden}) - already pruned, or another model?"
                )
            granularity = sp.unit if sp.unit != "neuron" else "head_dim"
            if s.unit(granularity) != sp.unit or s.num_units(granularity) != sp.total:
                raise PlanError(f"{name}: plan unit {sp.unit} x {sp.total} does not fit the model")
            # a plan built in code skipped from_dict's checks: an index out of range would fail
            # halfway through slicing, with earlier structures already cut
            _check_kept(sp, lambda m, n=name: PlanError(f"{n}: {m}"))

    def kept_widths(self) -> dict[str, tuple[int, int]]:
        """name -> (kept, total) units."""
        return {n: (len(sp.kept), sp.total) for n, sp in self.structures.items()}


def _prunes(sp: StructurePlan) -> bool:
    return len(sp.kept) < sp.total


def check_composable(base: PruningPlan, granularity: str) -> None:
    """Refuse a second search whose attention unit differs from the one that already pruned
    a structure: one plan entry holds one unit, so head_dim after head (or the reverse) has
    no plan that rebuilds it from the base model."""
    for name, sp in base.structures.items():
        if sp.unit in ("head_dim", "head") and sp.unit != granularity and _prunes(sp):
            raise PlanError(f"{name} was already pruned by {sp.unit}; search this compressed model again "
                            f"with granularity={sp.unit!r}, not {granularity!r}")


def compose(base: PruningPlan, plan: PruningPlan) -> PruningPlan:
    """`plan` (made on the model `base` produced) expressed on `base`'s own base model: kept
    indices map through base's kept indices, shapes are base's original ones."""
    entries = {}
    for name, sp in plan.structures.items():
        b = base.structures.get(name)
        if b is None or not _prunes(b):  # nothing pruned before: `plan` is already absolute
            entries[name] = sp
        elif not _prunes(sp):
            entries[name] = b
        elif b.unit != sp.unit or len(b.kept) != sp.total:
            raise PlanError(f"{name}: a {sp.unit} plan over {sp.total} units cannot follow the earlier "
                            f"{b.unit} plan that kept {len(b.kept)}")
        else:
            entries[name] = StructurePlan(kind=b.kind, unit=b.unit, total=b.total,
                                          kept=[b.kept[i] for i in sp.kept], num_heads=b.num_heads,
                                          head_dim=b.head_dim, hidden=b.hidden)
    for name, b in base.structures.items():
        entries.setdefault(name, b)
    stats = {**plan.stats, "composed_with": base.stats}
    return PruningPlan(structures=entries, model_class=plan.model_class or base.model_class, stats=stats)


def _structure_plan(entry: Any, bad) -> StructurePlan:
    if not isinstance(entry, dict):
        raise bad("must be an object")
    try:
        sp = StructurePlan(**entry)
    except TypeError as exc:
        raise bad(f"unexpected fields ({exc})") from None
    if sp.kind not in KINDS:
        raise bad(f"kind must be one of {KINDS}, got {sp.kind!r}")
    if sp.unit not in UNITS:
        raise bad(f"unit must be one of {UNITS}, got {sp.unit!r}")
    for attr in ("total", "num_heads", "head_dim", "hidden"):
        value = getattr(sp, attr)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise bad(f"{attr} must be a non-negative integer, got {value!r}")
    _check_kept(sp, bad)
    return sp


def _check_kept(sp: StructurePlan, bad) -> None:
    if not isinstance(sp.kept, list) or not sp.kept:
        raise bad("kept must be a non-empty list of unit indices")
    if any(isinstance(i, bool) or not isinstance(i, int) for i in sp.kept):
        raise bad("kept must hold integers")
    if sorted(set(sp.kept)) != sp.kept:
        raise bad("kept must be sorted and without repeats")
    if sp.kept[0] < 0 or sp.kept[-1] >= sp.total:
        raise bad(f"kept indices must lie in [0, {sp.total})")
