"""upop: unified and progressive structured pruning of vision-language transformers."""

from .adapters import SUPPORTED_FAMILIES, UnsupportedModelError, discover
from .checkpoint import CheckpointError, create_model, from_pretrained, save_pretrained
from .compress import apply_plan
from .config import UPopConfig
from .costs import count_flops, count_params
from .plan import PlanError, PruningPlan, StructurePlan
from .search import UPopSearch, ratio_at, select_units
from .structures import Structure

__version__ = "0.1.0"


def structures(model, granularity: str = "head_dim") -> list[dict]:
    """What upop finds in `model`: module path, kind, modality, layer, units and unit cost."""
    return [s.describe(granularity) for s in discover(model)]


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
