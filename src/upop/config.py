"""UPopConfig: the one object that says what the search should do."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

GRANULARITIES = ("head_dim", "head")
BUDGETS = ("params", "flops", "latency")
LATENCY_RUNTIMES = ("torch", "onnxruntime")
RANKINGS = ("global", "per_structure")
MAX_LATENCY_BATCH = 65536  # the batch of the latency tables; larger would only exhaust memory


@dataclass
class UPopConfig:
    """Settings of a UPop search.

    target: fraction of the prunable cost (params or FLOPs of every attention and MLP
        structure found) to remove, in (0, 1). 0.5 is "2x" on the prunable part.
    budget: "params" or "flops"; the exact per-unit cost that the ranking cuts on.
    total_steps: number of `search.step()` calls the search lasts (T in the paper).
    interval: masks are re-ranked every `interval` steps and at the last step.
    granularity: "head_dim" (the paper: one mask over the head dimension shared by all heads
        and by q, k, v) or "head" (whole heads).
    min_units: units (head dims, heads, neurons) always kept in every structure.
    round_to: kept widths are multiples of this (1 = no constraint).
    progressive: False gives the paper's "mask-based" baseline: masks stay 1 during the
        search and are cut to binary at the last step.
    ranking: "global" (unified, the paper) or "per_structure" (same ratio in every layer).
    sparsity_weight_attn / sparsity_weight_mlp: weights of the L1 term on the masks returned
        by `sparsity_loss()` (the paper's DeiT defaults). Under the per-type standardisation
        of the scores this term shifts every score of a type equally, so it does not change
        the ranking; it is kept for parity with the paper's logged loss.
    max_skipped_fraction: steps with non-finite mask gradients add nothing to the scores; the
        search stops with an error once more than this fraction of total_steps was skipped.
    """

    target: float = 0.5
    budget: str = "params"
    total_steps: int = 1000
    interval: int = 50
    granularity: str = "head_dim"
    min_units: int = 1
    round_to: int | str = 1
    latency_runtime: str = "torch"
    latency_batch: int = 1
    progressive: bool = True
    ranking: str = "global"
    sparsity_weight_attn: float = 4.8e-3
    sparsity_weight_mlp: float = 2e-4
    max_skipped_fraction: float = 0.2

    def __post_init__(self) -> None:
        self.validate()

    def __setattr__(self, name: str, value: Any) -> None:
        # A running search ranks with these settings: changing them mid-search would silently
        # mix two configurations, so a config is frozen once a search starts.
        if self.__dict__.get("_frozen", False):
            raise AttributeError(f"UPopConfig is frozen: a search already uses it (cannot set {name!r}); "
                                 f"make a new one with dataclasses.replace(config, {name}=...)")
        super().__setattr__(name, value)

    def freeze(self) -> None:
        """Refuse every later change (called when a search starts with this config)."""
        object.__setattr__(self, "_frozen", True)

    def validate(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"UPopConfig: {msg}")

        if isinstance(self.target, bool) or not isinstance(self.target, (int, float)):
            bad(f"target must be a number in (0, 1), got {self.target!r}")
        if not 0.0 < float(self.target) < 1.0:
            bad(f"target must be in (0, 1) (the fraction of prunable cost removed), got {self.target}")
        if self.budget not in BUDGETS:
            bad(f"budget must be one of {BUDGETS}, got {self.budget!r}")
        if self.granularity not in GRANULARITIES:
            bad(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.ranking not in RANKINGS:
            bad(f"ranking must be one of {RANKINGS}, got {self.ranking!r}")
        if self.round_to == "auto" and self.budget != "latency":
            bad('round_to "auto" reads the measured latency tables: it needs budget "latency"')
        if self.latency_runtime not in LATENCY_RUNTIMES:
            bad(f"latency_runtime must be one of {LATENCY_RUNTIMES}, got {self.latency_runtime!r}")
        for name in ("total_steps", "interval", "min_units", "latency_batch",
                     *(("round_to",) if self.round_to != "auto" else ())):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                bad(f"{name} must be an integer >= 1, got {value!r}")
        if self.latency_batch > MAX_LATENCY_BATCH:
            bad(f"latency_batch must be <= {MAX_LATENCY_BATCH}, got {self.latency_batch!r}")
        for name in ("sparsity_weight_attn", "sparsity_weight_mlp", "max_skipped_fraction"):
            value = getattr(self, name)
            # NaN compares False with everything: it would pass `< 0` and make every later check vacuous
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                bad(f"{name} must be a finite number >= 0, got {value!r}")
        if self.max_skipped_fraction > 1:
            bad(f"max_skipped_fraction is a fraction of total_steps, in [0, 1], got {self.max_skipped_fraction!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UPopConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"UPopConfig: unknown key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**data)
