"""Latency budget: what one unit of every structure costs in milliseconds on the user's machine.

A structure (attention or MLP) is timed standalone at a grid of kept widths, for the model's own
shapes (batch, tokens entering it, dtype, device), on the target runtime ("torch" or
"onnxruntime"): a replica built from fresh Linear layers of the kept width. Layers of identical
shape share one measurement, so a 12-layer tower is timed as two structures. The table is cached
as JSON, keyed by everything the numbers depend on (runtime, device, library versions, threads,
batch, dtype, shapes and tokens), so it is measured once per machine and model shape.

From the table:
- `LatencyModel.unit_costs()`: ms per unit = slope of the least-squares line through (width, ms),
  a linear cost the global ranking (`search.select_units`) cuts on unchanged. `target: 0.5`
  removes half of the prunable part's measured latency: the per-call overhead of a structure
  (the line's intercept) is not removable by any width, so the search cuts target /
  width_dependent of the linear cost (`linear_target`; at most all of it, `reachable`).
- `predict(widths)`: fixed part + every structure's interpolated table: the latency of a plan.
  The fixed part (embeddings, norms, heads: never pruned) is the measured whole model minus the
  sum of its structures at full width, clamped at 0 (the clamp is recorded).
- `faster_width`, `widen_to_faster`, `auto_round_to`: kept widths the hardware likes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from .costs import run_model
from .files import write_json
from .structures import Structure

RUNTIMES = ("torch", "onnxruntime")
STATISTICS = ("median", "min")
ATTENTION_IMPLS = ("sdpa", "eager")
CACHE_FORMAT = "upop-latency"
CACHE_VERSION = 1
ROUND_CANDIDATES = (1, 2, 4, 8, 16, 32, 64)


class LatencyError(ValueError):
    """A latency measurement that cannot be made as asked, or a table that cannot answer."""


# ---- settings -------------------------------------------------------------------------------------
@dataclass
class LatencySettings:
    """Where and how the table is measured.

    runtime: "torch" (CPU or CUDA) or "onnxruntime" (CPU execution provider).
    device, dtype: None = those of the model's weights.
    batch: samples per forward; tokens per sample come from the model (`measure_tokens`).
    threads: intra-op threads (None = torch.get_num_threads(), i.e. OMP_NUM_THREADS).
    attention: "sdpa" (fused, what Hugging Face and timm run by default) or "eager" (explicit
        QK^T, softmax, AV matmuls).
    min_run_time: seconds of timing per measured point and round (blocks of about 1 ms timed
        with torch.utils.benchmark.Timer); warmup: untimed calls first; rounds: every point of a
        table is timed once per round, the rounds interleaved over the widths, and the fastest
        round is kept (on a shared machine other work only ever adds time, and
        interleaving keeps a burst of it from bending one stretch of the table). None of these
        three changes the cache key: they set precision only.
    statistic: "median" of the timed blocks (the default), or "min" on a machine shared with
        other work, where a long forward (the whole model) is interrupted far more often than a
        short one (one structure) and medians make the fixed part look larger than it is.
    """

    runtime: str = "torch"
    device: str | None = None
    dtype: str | None = None
    batch: int = 1
    threads: int | None = None
    attention: str = "sdpa"
    min_run_time: float = 0.05
    warmup: int = 2
    rounds: int = 3
    statistic: str = "median"

    def check(self) -> None:
        if self.runtime not in RUNTIMES:
            raise LatencyError(f"latency runtime must be one of {RUNTIMES}, got {self.runtime!r}")
        if self.statistic not in STATISTICS:
            raise LatencyError(f"latency statistic must be one of {STATISTICS}, got {self.statistic!r}")
        if self.attention not in ATTENTION_IMPLS:
            raise LatencyError(f"latency attention must be one of {ATTENTION_IMPLS}, got {self.attention!r}")
        if isinstance(self.batch, bool) or not isinstance(self.batch, int) or self.batch < 1:
            raise LatencyError(f"latency batch must be an integer >= 1, got {self.batch!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise LatencyError(f"latency threads must be an integer >= 1, got {self.threads!r}")
        if not (self.min_run_time > 0 and math.isfinite(self.min_run_time)):
            raise LatencyError(f"latency min_run_time must be > 0 seconds, got {self.min_run_time!r}")
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise LatencyError(f"latency rounds must be an integer >= 1, got {self.rounds!r}")

    def resolved(self, structures: Sequence[Structure]) -> LatencySettings:
        """Fill device, dtype and threads from the model and this process."""
        self.check()
        weight = _first_linear(structures[0]).weight if structures else None
        device = self.device or (str(weight.device) if weight is not None else "cpu")
        dtype = self.dtype or (_dtype_name(weight.dtype) if weight is not None else "float32")
        _torch_dtype(dtype)  # one line naming a bad dtype, before any work
        if self.runtime == "onnxruntime" and torch.device(device).type != "cpu":
            raise LatencyError(f"latency runtime 'onnxruntime' is timed on CPU here, got device {device!r}")
        threads = self.threads or torch.get_num_threads()
        return dataclasses.replace(self, device=device, dtype=dtype, threads=threads)

    def key_fields(self) -> dict[str, Any]:
        """Everything a measured number depends on, besides the shapes."""
        fields_ = {"runtime": self.runtime, "device": device_name(self.device or "cpu"),
                   "torch": torch.__version__, "threads": self.threads, "batch": self.batch,
                   "dtype": self.dtype, "attention": self.attention, "statistic": self.statistic}
        if self.runtime == "onnxruntime":
            fields_["onnxruntime"] = _onnxruntime().__version__
        return fields_


def device_name(device: str) -> str:
    """The hardware behind `device`: the GPU's name, or the CPU model."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{dev.type}:{line.split(':', 1)[1].strip()}"
    return f"{dev.type}:{platform.processor() or platform.machine()}"


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise LatencyError("latency runtime 'onnxruntime' needs the onnxruntime package: "
                           "pip install onnxruntime") from None
    return onnxruntime


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise LatencyError(f"latency dtype must name a floating torch dtype (float32, bfloat16, ...), got {name!r}")
    return dtype


def _first_linear(s: Structure) -> nn.Linear:
    return s.input_linears()[0]


# ---- shape signatures -------------------------------------------------------------------------------
def signature(s: Structure, granularity: str, tokens_q: float, tokens_kv: float | None = None) -> dict[str, Any]:
    """Everything the latency of `s` depends on: two structures with equal signatures share a
    measurement. Tokens are per sample, rounded to whole tokens (what one forward really sees)."""
    tq = max(1, round(tokens_q))
    if not s.is_attention:
        return {"kind": "mlp", "units": s.hidden, "in": s.fc1.in_features, "out": s.fc2.out_features,
                "bias": [s.fc1.bias is not None, s.fc2.bias is not None], "tokens_q": tq}
    tkv = max(1, round(tokens_kv if tokens_kv is not None else tokens_q))
    if s.qkv is not None:
        ins, bias = [s.qkv.in_features] * 3, [s.qkv.bias is not None] * 3
    else:
        ins = [s.q.in_features, s.k.in_features, s.v.in_features]
        bias = [lin.bias is not None for lin in (s.q, s.k, s.v)]
    return {"kind": "attention", "cross": s.kind != "attention", "fused": s.qkv is not None,
            "granularity": granularity, "units": s.num_units(granularity), "heads": s.num_heads,
            "head_dim": s.head_dim, "in": ins, "out": s.out.out_features, "bias": [*bias, s.out.bias is not None],
            "tokens_q": tq, "tokens_kv": tkv}


def _digest(data: Any, length: int = 16) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:length]


# ---- the timed replica --------------------------------------------------------------------------------
class _MLPReplica(nn.Module):
    """fc1 (in -> w), GELU, fc2 (w -> out). The activation is GELU whatever the model uses: its
    cost is elementwise over w and small beside the matmuls."""

    def __init__(self, sig: dict[str, Any], width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(sig["in"], width, bias=sig["bias"][0])
        self.fc2 = nn.Linear(width, sig["out"], bias=sig["bias"][1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class _AttentionReplica(nn.Module):
    """q/k/v projections (or one fused qkv) to heads x width, the two attention matmuls over
    tokens_q x tokens_kv per head with the softmax (fused SDPA or eager), the out-projection.
    Granularity head_dim: all heads, each `width` wide; head: `width` heads of head_dim."""

    def __init__(self, sig: dict[str, Any], width: int, attention: str) -> None:
        super().__init__()
        if sig["granularity"] == "head_dim":
            self.heads, self.dim = sig["heads"], width
        else:
            self.heads, self.dim = width, sig["head_dim"]
        inner = self.heads * self.dim
        self.fused = sig["fused"]
        if self.fused:
            self.qkv = nn.Linear(sig["in"][0], 3 * inner, bias=sig["bias"][0])
        else:
            self.q = nn.Linear(sig["in"][0], inner, bias=sig["bias"][0])
            self.k = nn.Linear(sig["in"][1], inner, bias=sig["bias"][1])
            self.v = nn.Linear(sig["in"][2], inner, bias=sig["bias"][2])
        self.out = nn.Linear(inner, sig["out"], bias=sig["bias"][3])
        self.scale = 1.0 / math.sqrt(sig["head_dim"])  # the original temperature, as UPop keeps it
        self.eager = attention == "eager"

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None) -> torch.Tensor:
        if self.fused:
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        else:
            kv = x if kv is None else kv
            q, k, v = self.q(x), self.k(kv), self.v(kv)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        if self.eager:
            ctx = torch.softmax((q @ k.transpose(-1, -2)) * self.scale, dim=-1) @ v
        else:
            ctx = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        b, _, n, _ = ctx.shape
        return self.out(ctx.transpose(1, 2).reshape(b, n, self.heads * self.dim))


def replica(sig: dict[str, Any], width: int, settings: LatencySettings) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The module and inputs timed for one structure signature at kept `width` (in units)."""
    if not 1 <= width <= sig["units"]:
        raise LatencyError(f"kept width must be in [1, {sig['units']}], got {width}")
    dtype, device = _torch_dtype(settings.dtype or "float32"), torch.device(settings.device or "cpu")
    b = settings.batch
    if sig["kind"] == "mlp":
        module: nn.Module = _MLPReplica(sig, width)
        inputs: tuple[torch.Tensor, ...] = (torch.randn(b, sig["tokens_q"], sig["in"]),)
    else:
        module = _AttentionReplica(sig, width, settings.attention)
        inputs = (torch.randn(b, sig["tokens_q"], sig["in"][0]),)
        if sig["cross"] and not sig["fused"]:
            inputs += (torch.randn(b, sig["tokens_kv"], sig["in"][1]),)
    module = module.to(device=device, dtype=dtype).eval()
    return module, tuple(t.to(device=device, dtype=dtype) for t in inputs)


class Timing(NamedTuple):
    ms: float  # the median of the timed blocks (or their minimum: LatencySettings.statistic)
    iqr_ms: float  # interquartile range of the timed blocks: the spread to trust the median by
    runs: int


def _time_callable(fn: Any, settings: LatencySettings, block_s: float = 1e-3, min_blocks: int = 3) -> Timing:
    """Warm up, then time blocks of ~`block_s` with torch.utils.benchmark.Timer (it synchronises
    CUDA and sets the thread count) until `min_run_time` has passed: the median (or minimum)
    and IQR of the blocks. Short blocks, not blocked_autorange's single long one, so the IQR is a real spread
    and a moment of interference spoils one block, not the whole point."""
    from torch.utils import benchmark

    for _ in range(max(0, settings.warmup)):
        fn()
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=settings.threads or torch.get_num_threads())
    first = timer.timeit(1).median
    number = max(1, int(block_s / max(first, 1e-7)))
    times: list[float] = []
    deadline = time.perf_counter() + settings.min_run_time
    while len(times) < min_blocks or (time.perf_counter() < deadline and len(times) < 10_000):
        times.append(timer.timeit(number).median)
    q1, median, q3 = statistics.quantiles(times, n=4)
    value = min(times) if settings.statistic == "min" else median
    return Timing(value * 1e3, (q3 - q1) * 1e3, len(times) * number)


def _fastest(timings: Sequence[Timing]) -> Timing:
    """The fastest round; its spread is the larger of that round's IQR and the range of the
    rounds' values (how far to trust it on this machine)."""
    best = min(timings, key=lambda t: t.ms)
    spread = max(t.ms for t in timings) - best.ms
    return Timing(best.ms, max(best.iqr_ms, spread), sum(t.runs for t in timings))


def _ort_session(path_or_bytes: str | bytes, settings: LatencySettings) -> Any:
    ort = _onnxruntime()
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings.threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path_or_bytes, options, providers=["CPUExecutionProvider"])


def _onnx_bytes(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> bytes:
    """The TorchScript exporter (dynamo=False): a plain replica exports in well under a second
    where the dynamo exporter takes seconds; the dynamo one is the fallback if it is gone."""
    names = [f"x{i}" for i in range(len(inputs))]
    try:
        import io

        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its deprecation notice, once per point
            torch.onnx.export(module, inputs, buffer, input_names=names, output_names=["y"],
                              opset_version=17, dynamo=False)
        return buffer.getvalue()
    except Exception:  # the legacy exporter removed or failing: the supported path
        program = torch.onnx.export(module, inputs, input_names=names, output_names=["y"], dynamo=True,
                                    external_data=False, verbose=False)
        return program.model_proto.SerializeToString()


def time_replica(sig: dict[str, Any], width: int, settings: LatencySettings) -> Timing:
    """Time one structure signature at kept `width` on `settings.runtime` (the one place timing
    happens: tests count calls to it)."""
    module, inputs = replica(sig, width, settings)
    if settings.runtime == "onnxruntime":
        session = _ort_session(_onnx_bytes(module, inputs), settings)
        feed = {f"x{i}": t.cpu().numpy() for i, t in enumerate(inputs)}
        return _time_callable(lambda: session.run(None, feed), settings)

    def run() -> None:
        with torch.inference_mode():
            module(*inputs)

    return _time_callable(run, settings)


def time_structure(s: Structure, granularity: str, width: int, tokens_q: float, tokens_kv: float | None = None,
                   settings: LatencySettings | None = None) -> Timing:
    """Latency of structure `s` alone at kept `width` units, for its own shapes."""
    settings = (settings or LatencySettings()).resolved([s])
    return time_replica(signature(s, granularity, tokens_q, tokens_kv), width, settings)


# ---- the grid of widths -------------------------------------------------------------------------------
def width_grid(units: int, anchors: int = 4, small: int = 16) -> list[int]:
    """Kept widths to measure for a structure of `units` units.

    Up to `small` units: every width. Otherwise 1, the full width, and around `anchors` multiples
    a of the largest power of two p <= units / 2 (capped at 64) spread over the range, the widths
    a - o for o in {0, 1, 4, 8, 16, 32} below p: pairs (w, next multiple of c) for every c in
    ROUND_CANDIDATES up to p, which is what `auto_round_to` and `faster_width` compare.
    """
    if units <= small:
        return list(range(1, units + 1))
    p = 64
    while p * 2 > units:
        p //= 2
    offsets = [o for o in (0, 1, 4, 8, 16, 32) if o < p]
    spread = {p * max(1, min(units // p, round(units * (i + 1) / anchors / p))) for i in range(anchors)}
    widths = {1, units}
    for a in spread:
        widths.update(a - o for o in offsets if 1 <= a - o <= units)
    return sorted(widths)


def _grid(name: str, widths: Sequence[int], units: int) -> list[int]:
    bad = [w for w in widths if isinstance(w, bool) or not isinstance(w, int) or not 1 <= w <= units]
    if bad:
        raise LatencyError(f"widths for {name}: {bad[:3]} are not integers in [1, {units}]")
    return sorted({*widths, units})


# ---- the measured table -------------------------------------------------------------------------------
@dataclass
class Table:
    """Measured latency (ms) of one structure signature at kept widths (units)."""

    widths: list[int]
    ms: list[float]
    iqr_ms: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.iqr_ms:
            self.iqr_ms = [0.0] * len(self.ms)
        if not (len(self.widths) == len(self.ms) == len(self.iqr_ms) >= 1) or self.widths != sorted(set(self.widths)):
            raise LatencyError("a latency table needs increasing distinct widths, one time each")
        if not all(math.isfinite(v) and v >= 0 for v in (*self.ms, *self.iqr_ms)):
            raise LatencyError("a latency table holds a negative or non-finite time")

    @property
    def units(self) -> int:
        return self.widths[-1]

    def at(self, width: float) -> float:
        """ms at `width`: the measurement, or linear interpolation between the nearest two
        (below the first width or above the last: the end segment's line, not below 0)."""
        w, m = self.widths, self.ms
        if len(w) == 1:
            return m[0]
        i = min(max(1, next((j for j, x in enumerate(w) if x >= width), len(w) - 1)), len(w) - 1)
        x0, x1, y0, y1 = w[i - 1], w[i], m[i - 1], m[i]
        return max(0.0, y0 + (y1 - y0) * (width - x0) / (x1 - x0))

    def line(self) -> tuple[float, float]:
        """(slope ms/unit, intercept ms) of the least-squares line through the table."""
        n = len(self.widths)
        if n < 2:
            return self.ms[0] / self.widths[0], 0.0
        mx, my = sum(self.widths) / n, sum(self.ms) / n
        sxx = sum((x - mx) ** 2 for x in self.widths)
        slope = sum((x - mx) * (y - my) for x, y in zip(self.widths, self.ms, strict=True)) / sxx
        return slope, my - slope * mx

    def unit_cost(self) -> float:
        """The slope, floored at 1% of the mean per-unit latency: a structure whose time does not
        grow with width (overhead-bound, or noise) still costs something, so the ranking never
        treats its units as free."""
        slope, _ = self.line()
        return max(slope, 0.01 * self.ms[-1] / self.units, 1e-12)

    def to_dict(self) -> dict[str, Any]:
        return {"widths": self.widths, "ms": self.ms, "iqr_ms": self.iqr_ms}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Table:
        return cls([int(w) for w in data["widths"]], [float(v) for v in data["ms"]],
                   [float(v) for v in data.get("iqr_ms", [])])


@dataclass
class LatencyModel:
    """Per-structure latency tables of one model on one runtime, plus its fixed part.

    tables: signature id -> Table; members: structure name -> signature id; channels: structure
    name -> channels per unit (head_dim for whole heads, else 1), for round_to in channels.
    model_ms / fixed_ms: the whole model measured at full width and what its structures leave
    (None when the model was not measured); fixed_clamped: the difference was negative and set to 0.
    """

    tables: dict[str, Table]
    members: dict[str, str]
    channels: dict[str, int] = field(default_factory=dict)
    granularity: str = "head_dim"
    settings: dict[str, Any] = field(default_factory=dict)
    model_ms: float | None = None
    fixed_ms: float | None = None
    fixed_clamped: bool = False
    cache_path: str | None = None
    measured_points: int = 0  # points timed while building (0: everything came from the cache)

    def __post_init__(self) -> None:
        missing = sorted(set(self.members.values()) - set(self.tables))
        if missing:
            raise LatencyError(f"latency model: structures refer to missing tables {missing[:3]}")

    @classmethod
    def synthetic(cls, tables: Mapping[str, Table], granularity: str = "head_dim",
                  fixed_ms: float | None = None, channels: Mapping[str, int] | None = None) -> LatencyModel:
        """One given table per structure name, no timing (tests, or a table measured elsewhere)."""
        return cls(tables=dict(tables), members={n: n for n in tables}, channels=dict(channels or {}),
                   granularity=granularity, fixed_ms=fixed_ms)

    # ---- per structure ----
    def table(self, name: str) -> Table:
        if name not in self.members:
            raise LatencyError(f"latency model has no structure {name!r}")
        return self.tables[self.members[name]]

    def units(self, name: str) -> int:
        return self.table(name).units

    def latency(self, name: str, width: float) -> float:
        return self.table(name).at(width)

    def unit_costs(self) -> dict[str, float]:
        """ms per unit of every structure (the slope of its table): the linear cost that
        `search.select_units` ranks and cuts on."""
        return {n: self.table(n).unit_cost() for n in self.members}

    def linear_target(self, target: float) -> float:
        """The fraction of the width-dependent (linear) cost to cut so that `target` of the prunable
        part's measured latency goes. Each structure's per-call overhead (its table's intercept)
        does not shrink with the width, so the cut is target / width_dependent, at most 1 (every
        unit the widths control; `reachable` says how far that goes)."""
        costs = self.unit_costs()
        linear = sum(costs[n] * self.units(n) for n in self.members)
        full = self.prunable_ms()
        if linear <= 0 or full <= 0:
            return target
        return min(1.0, target * full / linear)

    def reachable(self) -> float:
        """The largest fraction of the prunable part's measured latency that cutting widths removes."""
        costs = self.unit_costs()
        full = self.prunable_ms()
        return min(1.0, sum(costs[n] * self.units(n) for n in self.members) / full) if full > 0 else 0.0

    # ---- per model ----
    def full_widths(self) -> dict[str, int]:
        return {n: self.units(n) for n in self.members}

    def prunable_ms(self, widths: Mapping[str, float] | None = None) -> float:
        """Sum of the structures' latencies at `widths` (absent names: full width)."""
        widths = widths or {}
        return sum(self.latency(n, widths.get(n, self.units(n))) for n in self.members)

    def predict(self, widths: Mapping[str, float] | None = None) -> float:
        """Predicted latency of the whole model with these kept widths: fixed part + tables."""
        if self.fixed_ms is None:
            raise LatencyError("the latency model has no fixed part: build it with model= and example_inputs=")
        return self.fixed_ms + self.prunable_ms(widths)

    def report(self, widths: Mapping[str, float], target: float | None = None,
               measured_ms: float | None = None) -> dict[str, Any]:
        """The latency of a plan against the target: what metrics.json and the plan's stats show.

        removed_linear: fraction of the width-dependent latency removed under the linear unit
        costs (what the search cut at `target`); removed_measured: fraction of the prunable
        part's measured latency removed, read off the tables (the two agree where the tables are
        lines through 0; per-call overhead makes removed_measured smaller); measured_ms: the
        compressed model's own measurement, if the caller has it."""
        costs = self.unit_costs()
        total_linear = sum(costs[n] * self.units(n) for n in self.members)
        removed_linear = sum(costs[n] * (self.units(n) - widths.get(n, self.units(n))) for n in self.members)
        full, kept = self.prunable_ms(), self.prunable_ms(widths)
        out: dict[str, Any] = {
            "runtime": self.settings.get("runtime"), "device": self.settings.get("device"),
            "batch": self.settings.get("batch"), "threads": self.settings.get("threads"),
            "target": target,
            "removed_linear": removed_linear / total_linear if total_linear else 0.0,
            "removed_measured": 1.0 - kept / full if full else 0.0,
            "prunable_ms": full, "prunable_ms_kept": kept,
            "overhead_ms": sum(self.table(n).line()[1] for n in self.members),
            # the share of the prunable latency that widths control: removed_measured can reach
            # about this much at most (small structures are overhead-bound)
            "width_dependent": min(1.0, total_linear / full) if full else 0.0,
            "model_ms": self.model_ms, "fixed_ms": self.fixed_ms, "fixed_clamped": self.fixed_clamped,
        }
        if self.fixed_ms is not None:
            out["predicted_ms"] = self.predict(widths)
            out["predicted_speedup"] = self.predict() / out["predicted_ms"] if out["predicted_ms"] else None
        if measured_ms is not None:
            out["measured_ms"] = measured_ms
            if out.get("predicted_ms"):
                out["prediction_error"] = measured_ms / out["predicted_ms"] - 1.0
        return out

    # ---- serialisation ----
    def to_dict(self) -> dict[str, Any]:
        return {"format": CACHE_FORMAT, "version": CACHE_VERSION, "granularity": self.granularity,
                "settings": self.settings, "tables": {k: t.to_dict() for k, t in self.tables.items()},
                "members": self.members, "channels": self.channels, "model_ms": self.model_ms,
                "fixed_ms": self.fixed_ms, "fixed_clamped": self.fixed_clamped}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyModel:
        """The inverse of to_dict (e.g. rank 0's model broadcast to every rank as JSON)."""
        if data.get("format") != CACHE_FORMAT:
            raise LatencyError(f"not a upop latency model (format {data.get('format')!r})")
        return cls(tables={k: Table.from_dict(v) for k, v in data["tables"].items()}, members=dict(data["members"]),
                   channels=dict(data.get("channels", {})), granularity=data["granularity"],
                   settings=dict(data.get("settings", {})), model_ms=data.get("model_ms"),
                   fixed_ms=data.get("fixed_ms"), fixed_clamped=bool(data.get("fixed_clamped", False)))


def plan_widths(plan: Any) -> dict[str, int]:
    """Kept units per structure of a PruningPlan."""
    return {name: len(sp.kept) for name, sp in plan.structures.items()}


def selection_widths(selected: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Kept units per structure of a `select_units` result (True = pruned)."""
    return {name: int((~sel).sum()) for name, sel in selected.items()}


# ---- tokens each structure sees ---------------------------------------------------------------------
@torch.no_grad()
def measure_tokens(model: nn.Module, structures: Sequence[Structure],
                   example_inputs: Any) -> dict[str, tuple[float, float]]:
    """Tokens per sample entering every structure's query side and key/value side, from one
    forward (the same count the search's masks record)."""
    seen: dict[str, list[float]] = {s.name: [0.0, 0.0] for s in structures}
    handles = []

    def hook(name: str, side: int) -> Any:
        def record(module: nn.Module, inputs: tuple, output: Any) -> None:
            x = inputs[0]
            seen[name][side] = float(x.shape[-2]) if x.dim() >= 3 else 1.0
        return record

    for s in structures:
        for lin in s.input_linears():
            handles.append(lin.register_forward_hook(hook(s.name, 1 if lin is s.k else 0)))
    was_training = model.training
    model.eval()
    try:
        run_model(model, example_inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    missing = [n for n, (q, _) in seen.items() if q == 0]
    if missing:
        raise LatencyError(f"structures {missing[:3]} saw no tokens in the example forward (unused by these inputs?)")
    return {n: (q, kv or q) for n, (q, kv) in seen.items()}


# ---- cache ----------------------------------------------------------------------------------------------
def cache_dir(folder: str | os.PathLike | None = None) -> Path:
    """The argument, else $UPOP_CACHE_DIR/latency, else ~/.cache/upop/latency."""
    if folder is not None:
        return Path(folder).expanduser()
    root = os.environ.get("UPOP_CACHE_DIR")
    return (Path(root).expanduser() if root else Path("~/.cache/upop").expanduser()) / "latency"


def _read_cache(path: Path, key: str) -> dict[str, Any] | None:
    """The cached entry, or None; a corrupt file is reported and ignored (measured again)."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != CACHE_FORMAT or data.get("version") != CACHE_VERSION or data.get("key") != key:
            raise ValueError("not a latency table of this version and key")
        tables = {sig_id: Table.from_dict(entry) for sig_id, entry in data["tables"].items()}
        fixed = {k: {"model_ms": float(v["model_ms"]), "iqr_ms": float(v.get("iqr_ms", 0.0))}
                 for k, v in data.get("fixed", {}).items()}
        if any(not (math.isfinite(v["model_ms"]) and v["model_ms"] >= 0) for v in fixed.values()):
            raise ValueError("a non-finite whole-model time")
        return {"tables": tables, "fixed": fixed, "raw": data}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, LatencyError) as exc:
        warnings.warn(f"upop: latency cache {path} is unreadable ({exc}); measuring again", stacklevel=3)
        return None


def _model_fingerprint(model: nn.Module, example_inputs: Any) -> str:
    """What the whole-model time depends on beyond the structures: the class, parameter count
    and input shapes."""
    def shapes(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return [list(x.shape), _dtype_name(x.dtype)]
        if isinstance(x, Mapping):
            return {str(k): shapes(v) for k, v in x.items()}
        if isinstance(x, (tuple, list)):
            return [shapes(v) for v in x]
        return repr(x)

    return _digest([type(model).__name__, sum(p.numel() for p in model.parameters()), shapes(example_inputs)])


def _check_batch(example_inputs: Any, batch: int) -> None:
    tensors = [example_inputs] if isinstance(example_inputs, torch.Tensor) else (
        list(example_inputs.values()) if isinstance(example_inputs, Mapping) else list(example_inputs))
    sizes = {int(t.shape[0]) for t in tensors if isinstance(t, torch.Tensor) and t.dim() > 0}
    if sizes and sizes != {batch}:
        raise LatencyError(f"example_inputs have batch {sorted(sizes)}, the latency batch is {batch}: "
                           "time the model on inputs of the same batch")


def time_model(model: nn.Module, example_inputs: Any, settings: LatencySettings) -> Timing:
    """The whole model's forward on the runtime (onnxruntime: exported with upop.export)."""
    was_training = model.training
    model.eval()
    try:
        if settings.runtime == "onnxruntime":
            from .export import export_onnx

            if not isinstance(example_inputs, Mapping):
                raise LatencyError("runtime 'onnxruntime' times the whole model from a dict of named inputs")
            with tempfile.TemporaryDirectory() as tmp:
                path = export_onnx(model, Path(tmp) / "model.onnx", dict(example_inputs))
                session = _ort_session(str(path), settings)
            names = {i.name for i in session.get_inputs()}
            feed = {k: v.cpu().numpy() for k, v in example_inputs.items() if k in names}
            return _time_callable(lambda: session.run(None, feed), settings)

        def run() -> None:
            with torch.inference_mode():
                run_model(model, example_inputs)

        return _time_callable(run, settings)
    finally:
        model.train(was_training)


# ---- building -----------------------------------------------------------------------------------------
def build_latency_model(
    structures: Sequence[Structure],
    granularity: str,
    tokens: Mapping[str, tuple[float, float]],
    settings: LatencySettings | None = None,
    *,
    model: nn.Module | None = None,
    example_inputs: Any = None,
    cache: str | os.PathLike | None = None,
    use_cache: bool = True,
    widths: Mapping[str, Sequence[int]] | None = None,
) -> LatencyModel:
    """Measure (or read from the cache) the latency table of every structure.

    tokens: per structure name, (tokens_q, tokens_kv) per sample (`measure_tokens`, or the
    search's `masks.tokens`). model + example_inputs (batch = settings.batch): also measure the
    whole model, giving the fixed part. widths: the kept widths to time per structure name
    (the full width is always added; structures of one shape share one grid); default `width_grid`.
    """
    if not structures:
        raise LatencyError("no structures to time")
    missing = [s.name for s in structures if s.name not in tokens]
    if missing:
        raise LatencyError(f"no token counts for structures {missing[:3]}: run measure_tokens or one forward first")
    settings = (settings or LatencySettings()).resolved(structures)
    if (model is None) != (example_inputs is None):
        raise LatencyError("give both model= and example_inputs= to measure the fixed part, or neither")
    if example_inputs is not None:
        _check_batch(example_inputs, settings.batch)
    sigs = {s.name: signature(s, granularity, *tokens[s.name]) for s in structures}
    ids = {name: _digest(sig) for name, sig in sigs.items()}
    given = {ids[n]: (n, w) for n, w in reversed(list((widths or {}).items())) if n in ids}
    grids = {i: _grid(*given[i], sigs[n]["units"]) if i in given else width_grid(sigs[n]["units"])
             for n, i in ids.items()}
    unique = {ids[n]: sigs[n] for n in sigs}
    key_fields = {**settings.key_fields(), "granularity": granularity,
                  "signatures": sorted(([unique[i], grids[i]] for i in unique), key=json.dumps)}
    key = _digest(key_fields, 32)
    path = cache_dir(cache) / f"{key}.json"
    cached = _read_cache(path, key) if use_cache else None
    tables = dict(cached["tables"]) if cached else {}
    fixed_entries = dict(cached["fixed"]) if cached else {}
    measured = 0
    for sig_id, sig in unique.items():
        if sig_id in tables and tables[sig_id].widths == grids[sig_id]:
            continue
        rounds: dict[int, list[Timing]] = {w: [] for w in grids[sig_id]}
        for r in range(settings.rounds):
            for w in grids[sig_id] if r % 2 == 0 else grids[sig_id][::-1]:
                rounds[w].append(time_replica(sig, w, settings))
                measured += 1
        best = [_fastest(rounds[w]) for w in grids[sig_id]]
        tables[sig_id] = Table(grids[sig_id], [t.ms for t in best], [t.iqr_ms for t in best])
    fingerprint = _model_fingerprint(model, example_inputs) if model is not None else None
    if fingerprint is not None and fingerprint not in fixed_entries:
        t = _fastest([time_model(model, example_inputs, settings) for _ in range(settings.rounds)])
        fixed_entries[fingerprint] = {"model_ms": t.ms, "iqr_ms": t.iqr_ms}
        measured += 1
    if use_cache and measured:
        write_json(path, {"format": CACHE_FORMAT, "version": CACHE_VERSION, "key": key, "fields": key_fields,
                          "tables": {i: {**tables[i].to_dict(), "signature": unique[i]} for i in unique},
                          "fixed": fixed_entries})
    channels = {s.name: s.head_dim if s.is_attention and granularity == "head" else 1 for s in structures}
    lm = LatencyModel(tables={i: tables[i] for i in unique}, members=ids, channels=channels,
                      granularity=granularity, settings={**settings.key_fields(), "device_str": settings.device},
                      cache_path=str(path) if use_cache else None, measured_points=measured)
    if fingerprint is not None:
        lm.model_ms = fixed_entries[fingerprint]["model_ms"]
        difference = lm.model_ms - lm.prunable_ms()
        lm.fixed_ms, lm.fixed_clamped = max(0.0, difference), difference < 0
    return lm


# ---- widths the hardware likes ------------------------------------------------------------------------
def faster_width(lm: LatencyModel, name: str, width: int, tolerance: float = 0.02) -> int:
    """The width >= `width` to keep instead: `width` itself unless a measured wider width is
    faster by more than `tolerance` (and the IQRs); then the narrowest measured width within
    `tolerance` of the fastest one at or above `width`."""
    table = lm.table(name)
    here = table.at(width)
    wider = [(w, m, q) for w, m, q in zip(table.widths, table.ms, table.iqr_ms, strict=True) if w > width]
    if not wider:
        return width
    best = min(m for _, m, _ in wider)
    spread = max((q for _, m, q in wider if m == best), default=0.0)
    if here <= best * (1 + tolerance) + spread:
        return width
    return next(w for w, m, _ in wider if m <= best * (1 + tolerance))


def widen_to_faster(selected: Mapping[str, torch.Tensor], scores: Mapping[str, torch.Tensor], lm: LatencyModel,
                    tolerance: float = 0.02) -> dict[str, torch.Tensor]:
    """Un-select units (the lowest-scoring selected ones, i.e. the last candidates for pruning)
    wherever the kept width is measurably slower than a wider one: more capacity, less time."""
    out = {}
    for name, sel in selected.items():
        sel = sel.clone()
        kept = int((~sel).sum())
        target = faster_width(lm, name, kept, tolerance) if kept > 0 else kept
        if target > kept:
            idx = torch.nonzero(sel).flatten()
            revive = idx[torch.argsort(scores[name].flatten()[idx].double(), stable=True)[:target - kept]]
            sel[revive] = False
        out[name] = sel
    return out


def _unit_step(lm: LatencyModel, name: str, multiple: int) -> int:
    """round_to is in channels; a whole head is head_dim channels (as Structure.unit_step)."""
    channels = lm.channels.get(name, 1)
    return multiple // math.gcd(multiple, channels)


def _round_pairs(lm: LatencyModel, names: Sequence[str], multiple: int) -> list[tuple[float, ...]]:
    """(linear price of the extra units, ms and IQR at w, ms and IQR at w rounded up) for every
    measured width w that is not a multiple of the step and whose next multiple was measured too."""
    pairs = []
    for sig_id in dict.fromkeys(lm.members[n] for n in names):
        name = next(n for n in names if lm.members[n] == sig_id)
        table, step = lm.tables[sig_id], _unit_step(lm, name, multiple)
        if step <= 1:
            continue
        ms = dict(zip(table.widths, zip(table.ms, table.iqr_ms, strict=True), strict=True))
        slope = table.unit_cost()
        for w in table.widths:
            up = -(-w // step) * step
            if up != w and up in ms:
                pairs.append((slope * (up - w), *ms[w], *ms[up]))
    return pairs


def auto_round_to(lm: LatencyModel, candidates: Sequence[int] = ROUND_CANDIDATES, names: Sequence[str] | None = None,
                  tolerance: float = 0.02, min_choices: int = 4) -> int:
    """The multiple (in channels) kept widths should be rounded to, read off the measured tables.

    For a candidate c, every measured width w below a multiple of c is paired with that multiple
    u (w < u), and the extra units' linear price (slope x (u - w)) is compared with what they
    measurably cost, lat(u) - lat(w), with noise = `tolerance` x lat(u) + both IQRs:
    - safe: no pair costs more than half its linear price + noise (rounding up to c is never
      measurably dear: c does not cut a staircase of a smaller multiple in half);
    - useful: at least two pairs cost less than their linear price - noise (the table bends at
      multiples of c: steps, or widths below a multiple measurably slower than the multiple).
    The answer is the largest safe and useful candidate that leaves every structure at least
    `min_choices` widths, else 1. On a linear table no candidate is useful (1); on a staircase
    flat within multiples of 8, 8 is useful and 16 is not safe (8). `names`: only these
    structures (e.g. one structure, for a per-structure value); default all.
    """
    names = list(names if names is not None else lm.members)
    best = 1
    for c in sorted(candidates):
        if c <= 1 or any(lm.units(n) // max(1, _unit_step(lm, n, c)) < min_choices for n in names):
            continue
        pairs = _round_pairs(lm, names, c)
        safe, useful = True, 0
        for price, lo, lo_iqr, hi, hi_iqr in pairs:
            noise = tolerance * hi + lo_iqr + hi_iqr
            cost = hi - lo
            if cost > 0.5 * price + noise:
                safe = False
                break
            useful += cost < price - noise
        if safe and useful >= 2:
            best = c
    return best

