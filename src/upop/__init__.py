"""upop: unified and progressive structured pruning of vision-language transformers."""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# The public names are imported on first use (PEP 562), so that `upop --help` and
# `upop --version` answer without importing torch and transformers.
_EXPORTS = {
    "SUPPORTED_FAMILIES": "adapters", "UnsupportedModelError": "adapters", "discover": "adapters",
    "CheckpointError": "checkpoint", "create_model": "checkpoint", "from_pretrained": "checkpoint",
    "save_pretrained": "checkpoint",
    "apply_plan": "compress",
    "UPopConfig": "config",
    "count_flops": "costs", "count_params": "costs",
    "PlanError": "plan", "PruningPlan": "plan", "StructurePlan": "plan",
    "UPopSearch": "search", "ratio_at": "search", "select_units": "search",
    "Structure": "structures",
}

if TYPE_CHECKING:
    from .adapters import SUPPORTED_FAMILIES, UnsupportedModelError, discover  # noqa: F401
    from .checkpoint import CheckpointError, create_model, from_pretrained, save_pretrained
    from .compress import apply_plan
    from .config import UPopConfig
    from .costs import count_flops, count_params
    from .plan import PlanError, PruningPlan, StructurePlan
    from .search import UPopSearch, ratio_at, select_units
    from .structures import Structure


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    try:  # a submodule: `upop.search` works after a bare `import upop`, as before
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


def structures(model, granularity: str = "head_dim") -> list[dict]:
    """What upop finds in `model`: module path, kind, modality, layer, units and unit cost."""
    from .adapters import discover

    return [s.describe(granularity) for s in discover(model)]


class _Package(types.ModuleType):
    # Importing the submodule upop.structures would rebind `upop.structures`; the function keeps the name.
    def __setattr__(self, name: str, value: Any) -> None:
        if name == "structures" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = [
    "SUPPORTED_FAMILIES",
    "CheckpointError",
    "PlanError",
    "PruningPlan",
    "Structure",
    "StructurePlan",
    "UPopConfig",
    "UPopSearch",
    "UnsupportedModelError",
    "apply_plan",
    "count_flops",
    "count_params",
    "create_model",
    "from_pretrained",
    "ratio_at",
    "save_pretrained",
    "select_units",
    "structures",
]
