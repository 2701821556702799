"""End-of-run report: before/after table, kept widths per structure, and the kept-width picture.

Everything here works on plain data (the metrics dict of the compress pipeline, a plan as
``PruningPlan.to_dict()`` and the structures as ``Structure.describe()``), so a finished run can
be re-reported from its JSON files alone. Every file is written through upop.files (a temporary file
in the same folder, then a rename), so a half-written file never carries the real name.
"""

from __future__ import annotations

import json
import logging
import math
import platform
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from .files import atomic_write, write_text

log = logging.getLogger(__name__)

NA = "n/a"
MODALITY_ORDER = ("vision", "text", "decoder")
KIND_ORDER = ("attention", "cross_attention", "mlp")
KIND_LABEL = {"attention": "attention", "cross_attention": "cross-attention", "mlp": "MLP"}
KIND_COLOR = {"attention": "#3b75af", "cross_attention": "#8e5fb0", "mlp": "#e07b39"}
DEFAULT_LATENCY_BATCHES = (1, 32)
MAX_GRID_WIDTH = 20.0  # inches; a wider grid of panels is stacked into one column instead


# ---- kept widths ------------------------------------------------------------------------------
def _order(value: str, order: tuple[str, ...]) -> tuple[int, str]:
    return (order.index(value), "") if value in order else (len(order), str(value))


def _sort_key(row: dict[str, Any]) -> tuple:
    return (_order(row["modality"], MODALITY_ORDER), _order(row["kind"], KIND_ORDER), row["layer"], row["name"])


def kept_width_table(plan: dict[str, Any], structures: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per planned structure: name, modality, kind, layer, kept, total, fraction (kept / total).

    Sorted by modality (vision, text, decoder), kind (attention, cross-attention, MLP) and layer.
    A structure the plan names but `structures` lacks gets modality "unknown" and layer -1.
    """
    info = {s["name"]: s for s in structures}
    rows = []
    for name, entry in plan.get("structures", {}).items():
        s = info.get(name, {})
        kept, total = len(entry.get("kept", [])), int(entry.get("total", 0))
        layer = s.get("layer", -1)
        rows.append({
            "name": name,
            "modality": s.get("modality", "unknown"),
            "kind": entry.get("kind", s.get("kind", "unknown")),
            "layer": layer if isinstance(layer, int) else -1,
            "kept": kept,
            "total": total,
            "fraction": kept / total if total else 0.0,
        })
    return sorted(rows, key=_sort_key)


def modality_summary(plan: dict[str, Any], structures: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per modality (plus a final "all" row): structures, kept/total units and the kept params fraction.

    params_fraction = sum(kept * unit_params) / sum(total * unit_params) over the modality's
    structures (prunable parameters only; embeddings, norms and heads are not counted).
    """
    unit_params = {s["name"]: float(s.get("unit_params") or 0.0) for s in structures}
    groups: dict[str, dict[str, Any]] = {}
    for row in kept_width_table(plan, structures):
        for key in (row["modality"], "all"):
            g = groups.setdefault(key, {"modality": key, "structures": 0, "kept_units": 0, "total_units": 0,
                                        "kept_params": 0.0, "total_params": 0.0})
            g["structures"] += 1
            g["kept_units"] += row["kept"]
            g["total_units"] += row["total"]
            g["kept_params"] += row["kept"] * unit_params.get(row["name"], 0.0)
            g["total_params"] += row["total"] * unit_params.get(row["name"], 0.0)
    out = []
    for key in sorted(groups, key=lambda m: (m == "all", _order(m, MODALITY_ORDER))):
        g = groups[key]
        g["params_fraction"] = g["kept_params"] / g["total_params"] if g["total_params"] else None
        out.append(g)
    return out


# ---- the picture --------------------------------------------------------------------------------
def plot_kept_widths(plan: dict[str, Any], structures: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Write one PNG of the kept fraction per layer: a panel per (modality, kind), rows = modalities.

    Each bar is one structure (x: its layer, y: kept / total units) labelled "kept/total"; the
    dashed line is the group's overall kept fraction. Needs matplotlib (Agg, no display).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    rows = kept_width_table(plan, structures)
    if not rows:
        raise ValueError("plan has no structures to plot")
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["modality"], row["kind"]), []).append(row)
    modalities = list(dict.fromkeys(m for m, _ in groups))
    kinds = sorted({k for _, k in groups}, key=lambda k: _order(k, KIND_ORDER))
    bars_per_col = {k: max(len(v) for (_, kk), v in groups.items() if kk == k) for k in kinds}
    col_widths = [max(3.6, 0.42 * bars_per_col[k] + 1.4) for k in kinds]
    if sum(col_widths) <= MAX_GRID_WIDTH:
        # rows = towers, columns = kinds: the same kind lines up across towers
        cells = {(m, k): (r, kinds.index(k)) for r, m in enumerate(modalities) for k in kinds if (m, k) in groups}
        nrows, width = len(modalities), sum(col_widths)
    else:  # too wide side by side (many layers): one panel per row
        cells = {key: (r, 0) for r, key in enumerate(groups)}
        nrows, width, col_widths = len(groups), max(col_widths), [1.0]
    width = max(width, 6.5)
    fig = Figure(figsize=(width, 2.9 * nrows + 1.1), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(nrows, len(col_widths), width_ratios=col_widths)
    for (modality, kind), (r, c) in cells.items():
        ylabel = c == min(cc for rr, cc in cells.values() if rr == r)  # the leftmost panel of its row
        _draw_panel(fig.add_subplot(grid[r, c]), modality, kind, groups[(modality, kind)], ylabel=ylabel)

    stats = plan.get("stats") or {}
    heading = title or "Kept width per layer"
    achieved, budget = _num(stats.get("achieved")), stats.get("budget")
    if achieved is not None:
        heading += f"\n(removed {100 * achieved:.1f}% of the prunable {budget or 'budget'})"
    fig.suptitle(heading, fontsize=12, fontweight="bold")
    kept_params = [f"{s['modality']} {s['params_fraction']:.0%}" for s in modality_summary(plan, structures)
                   if s["params_fraction"] is not None and not (s["modality"] == "all" and len(modalities) == 1)]
    handles = [
        Patch(facecolor="#bbbbbb", edgecolor="black", linewidth=0.4, label="kept fraction (label: kept/total units)"),
        Patch(fill=False, edgecolor="#9a9a9a", linestyle=":", label="full width"),
        Line2D([], [], color="#c0392b", linestyle="--", label="overall kept fraction of the panel"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=3 if width >= 9 else 1, fontsize=9, frameon=False,
               title=("kept prunable params: " + ", ".join(kept_params)) if kept_params else None,
               title_fontsize=10)

    def save(f: IO[bytes]) -> None:
        fig.savefig(f, format="png", dpi=120)

    return atomic_write(Path(path), save)


def _draw_panel(ax: Any, modality: str, kind: str, group: list[dict[str, Any]], ylabel: bool) -> None:
    n = len(group)
    xs = list(range(n))
    fractions = [row["fraction"] for row in group]
    color = KIND_COLOR.get(kind, "#6b6b6b")
    ax.bar(xs, fractions, width=0.72, color=color, edgecolor="black", linewidth=0.4, zorder=2)
    ax.bar(xs, [1.0] * n, width=0.72, fill=False, edgecolor="#9a9a9a", linewidth=0.6, linestyle=":", zorder=1)

    labels = [f"{row['kept']}/{row['total']}" for row in group]
    vertical = n > 5 or max(len(s) for s in labels) * n > 40
    size = 7.5 if vertical else 8.5
    # a label goes inside the bar where the bar is tall enough to hold it, above it otherwise
    inside_from = 0.45 if vertical else 0.2
    for x, frac, label in zip(xs, fractions, labels, strict=True):
        inside = frac >= inside_from
        ax.text(x, frac - 0.03 if inside else frac + 0.03, label, rotation=90 if vertical else 0,
                ha="center", va="top" if inside else "bottom", fontsize=size, zorder=3,
                color="white" if inside else "black", fontweight="bold" if inside else "normal")

    # the panel's overall kept fraction, drawn over the bars but under their labels
    kept, total = sum(r["kept"] for r in group), sum(r["total"] for r in group)
    overall = kept / total if total else 0.0
    ax.axhline(overall, color="#c0392b", linestyle="--", linewidth=1.0, zorder=2.5)
    ax.set_title(f"{modality} {KIND_LABEL.get(kind, kind)}: {overall:.0%} of units kept", fontsize=10)
    ax.set_xticks(xs)
    ax.set_xticklabels([str(row["layer"]) if row["layer"] >= 0 else "-" for row in group], fontsize=8)
    pad = max(0.0, (4 - n) / 2)  # a lone bar or two do not fill the whole panel
    ax.set_xlim(-0.6 - pad, n - 0.4 + pad)
    ax.set_ylim(0, 1.0 if vertical else 1.12)
    ax.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(axis="y", color="#dddddd", linewidth=0.6, zorder=0)
    ax.set_axisbelow(True)
    ax.set_xlabel("layer", fontsize=9)
    if ylabel:
        ax.set_ylabel("kept fraction", fontsize=9)


# ---- tables -----------------------------------------------------------------------------------
def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def _fmt(value: Any, digits: int = 2, scale: float = 1.0) -> str:
    v = _num(value)
    return NA if v is None else f"{v / scale:.{digits}f}"


def _rel_change(dense: Any, new: Any) -> str:
    d, c = _num(dense), _num(new)
    if d is None or c is None or d == 0:
        return NA
    return f"{100 * (c - d) / d:+.1f}%"


def _metric_change(dense: Any, new: Any) -> str:
    d, c = _num(dense), _num(new)
    if d is None or c is None:
        return NA
    rel = f" ({100 * (c - d) / abs(d):+.1f}%)" if d else ""
    return f"{c - d:+.2f}{rel}"


def _ratio(dense: Any, new: Any) -> float | None:
    d, c = _num(dense), _num(new)
    return d / c if d is not None and c is not None and d > 0 and c > 0 else None


def _speedup(dense: Any, new: Any) -> str:
    r = _ratio(dense, new)
    if r is None:
        return NA
    return f"{r:.2f}x faster" if r >= 1 else f"{1 / r:.2f}x slower"


def speedups(dense: dict[str, Any], compressed: dict[str, Any]) -> dict[str, float | None] | None:
    """Dense / compressed median latency per batch key (metrics.json's "speedup"); None when not timed.
    Both come from one side-by-side measurement (measure.cpu_latency)."""
    if not isinstance(dense.get("latency_ms"), dict) or not isinstance(compressed.get("latency_ms"), dict):
        return None
    return {k: _ratio(v, compressed["latency_ms"].get(k)) for k, v in dense["latency_ms"].items()}


def _section(metrics: dict[str, Any], key: str) -> dict[str, Any]:
    value = metrics.get(key)
    return value if isinstance(value, dict) else {}


def _latency(section: dict[str, Any], key: str, field: str = "latency_ms") -> Any:
    latency = section.get(field)
    return latency.get(key) if isinstance(latency, dict) else None


def _latency_cell(section: dict[str, Any], key: str) -> str:
    """The median, and its interquartile range where measured: "12.3±0.4" (one word: tables split on spaces)."""
    iqr = _num(_latency(section, key, "latency_iqr_ms"))
    median = _fmt(_latency(section, key), 1)
    return median if iqr is None or median == NA else f"{median}±{iqr:.1f}"


def _batch_keys(metrics: dict[str, Any]) -> list[str]:
    keys = {f"batch{b}" for b in DEFAULT_LATENCY_BATCHES}
    for name in ("dense", "searched", "compressed"):
        latency = _section(metrics, name).get("latency_ms")
        if isinstance(latency, dict):
            keys.update(str(k) for k in latency)

    def batch_size(key: str) -> tuple[int, str]:
        digits = key.removeprefix("batch")
        return (int(digits), key) if digits.isdigit() else (1 << 30, key)

    return sorted(keys, key=batch_size)


def comparison_rows(metrics: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows (strings) of the before/after table shared by the console and Markdown."""
    sections = ["dense"] + (["searched"] if isinstance(metrics.get("searched"), dict) else []) + ["compressed"]
    data = {name: _section(metrics, name) for name in sections}
    dense, comp = data["dense"], data["compressed"]
    header = ["", *sections, "change"]
    rows = [
        [str(metrics.get("metric") or "metric"), *(_fmt(data[s].get("metric")) for s in sections),
         _metric_change(dense.get("metric"), comp.get("metric"))],
        ["params (M)", *(_fmt(data[s].get("params"), 2, 1e6) for s in sections),
         _rel_change(dense.get("params"), comp.get("params"))],
        ["FLOPs (G)", *(_fmt(data[s].get("flops"), 3, 1e9) for s in sections),
         _rel_change(dense.get("flops"), comp.get("flops"))],
    ]
    for key in _batch_keys(metrics):
        label = f"latency batch {key.removeprefix('batch')} (ms)"
        rows.append([label, *(_latency_cell(data[s], key) for s in sections),
                     _speedup(_latency(dense, key), _latency(comp, key))])
    return header, rows


def format_table(metrics: dict[str, Any]) -> str:
    """Plain-text before/after table: task metric, params, FLOPs and latency; "n/a" where not measured."""
    header, rows = comparison_rows(metrics)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        cells = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(cells).rstrip()

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: Iterable[list[Any]], align: str = "") -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    marks = {"l": ":---", "r": "---:", "c": ":---:"}
    out = ["| " + " | ".join(_md_cell(h) for h in header) + " |",
           "| " + " | ".join(marks[a] for a in align) + " |"]
    out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return out


def _hms(seconds: Any) -> str:
    s = _num(seconds)
    if s is None:
        return NA
    s = round(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _count(value: Any) -> str:
    v = _num(value)
    if v is None:
        return NA
    if abs(v) >= 1e6:
        return f"{v / 1e6:.2f}M"
    return f"{v / 1e3:.1f}k" if abs(v) >= 1e3 else f"{v:.0f}"


def _jsonable(value: Any) -> Any:
    """NaN and infinities become None, so metrics.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _percent(value: Any, digits: int = 1) -> str:
    v = _num(value)
    return NA if v is None else f"{100 * v:.{digits}f}%"


def _latency_budget_lines(entry: Any) -> list[str]:
    """report.md's section on a latency budget: the plan's predicted latency and the compressed model's measured one."""
    if not isinstance(entry, dict):
        return []
    where = f"{entry.get('runtime') or NA} on {entry.get('device') or NA}, batch {entry.get('batch') or NA}"
    return ["", "## Latency budget", "", f"Measured tables ({where}, {entry.get('threads') or NA} threads):", "",
            f"- target: remove {_percent(entry.get('target'))} of the prunable structures' measured time; the plan "
            f"removes {_percent(entry.get('removed_measured'))} of it ({_percent(entry.get('removed_linear'))} of the "
            f"width-dependent part, which is {_percent(entry.get('width_dependent'))} of it: the rest is per-call "
            "overhead)",
            f"- dense model: {_fmt(entry.get('model_ms'), 2)} ms measured",
            f"- compressed model: {_fmt(entry.get('predicted_ms'), 2)} ms predicted, "
            f"{_fmt(entry.get('measured_ms'), 2)} ms measured (±{_fmt(entry.get('measured_iqr_ms'), 2)}; "
            f"prediction error {_percent(entry.get('prediction_error'))})",
            f"- speed-up: {_fmt(entry.get('predicted_speedup'))}x predicted, {_fmt(entry.get('measured_speedup'))}x "
            "measured"]


# ---- the report -------------------------------------------------------------------------------
def render_markdown(metrics: dict[str, Any], plan: dict[str, Any], structures: list[dict[str, Any]],
                    picture: str | None = "kept_widths.png") -> str:
    """The text of report.md; `picture` is the PNG's path relative to the report (None: no picture)."""
    model = metrics.get("model") or plan.get("model_class") or "model"
    budget = metrics.get("budget") or "params"
    prunable = metrics.get("prunable_params")
    md = [f"# UPop compression report: {model}", "", "## Run", ""]
    md += [
        f"- task: {metrics.get('task') or NA} (metric: `{metrics.get('metric') or NA}`)",
        f"- model: `{model}`" + (f" ({plan['model_class']})" if plan.get("model_class") else ""),
        f"- budget: {budget}; target: remove {_percent(metrics.get('target'))} of the prunable {budget}",
        f"- achieved: {_percent(metrics.get('achieved'), 2)} of the prunable {budget} removed",
        f"- prunable params: {_count(prunable)}",
    ]
    if metrics.get("world_size"):
        md.append(f"- processes: {metrics['world_size']}")

    header, rows = comparison_rows(metrics)
    md += ["", "## Before / after", "", *_md_table(["", *header[1:]], rows)]
    md += ["", "Change: compressed vs dense (the metric in points, relative %; latency as a speed-up). Latency: CPU, "
           "milliseconds per forward, the median of timed blocks ± their interquartile range, the dense and the "
           "compressed model timed in one process, interleaved."]
    md += _latency_budget_lines(metrics.get("latency_budget"))

    dense_m, comp_m = _section(metrics, "dense").get("metrics"), _section(metrics, "compressed").get("metrics")
    searched_m = _section(metrics, "searched").get("metrics")
    dense_m, comp_m = dense_m if isinstance(dense_m, dict) else {}, comp_m if isinstance(comp_m, dict) else {}
    searched_m = searched_m if isinstance(searched_m, dict) else None
    names = list(dict.fromkeys([*dense_m, *(searched_m or {}), *comp_m]))
    if names:
        cols = ["metric", "dense", *(["searched"] if searched_m is not None else []), "compressed", "change"]
        table = []
        for name in names:
            values = [dense_m.get(name), *([searched_m.get(name)] if searched_m is not None else []), comp_m.get(name)]
            cells = [_fmt(v) if _num(v) is not None or v is None else str(v) for v in values]
            table.append([f"`{name}`", *cells, _metric_change(dense_m.get(name), comp_m.get(name))])
        md += ["", "## All metrics", "", *_md_table(cols, table)]

    md += ["", "## Where the budget went", ""]
    md += ["Kept share of the prunable parameters per tower (sum of kept units x params per unit over the "
           "sum of all units x params per unit).", ""]
    summary = [[s["modality"] if s["modality"] != "all" else "**all**", s["structures"],
                f"{s['kept_units']}/{s['total_units']}",
                _percent(s["params_fraction"]),
                NA if s["params_fraction"] is None else _count(s["total_params"] - s["kept_params"])]
               for s in modality_summary(plan, structures)]
    md += _md_table(["modality", "structures", "kept units", "kept params", "removed params"], summary)
    if picture:
        md += ["", f"![kept widths]({picture})"]

    table = kept_width_table(plan, structures)
    md += ["", "## Kept width per structure", ""]
    md += _md_table(["structure", "modality", "kind", "layer", "kept", "total", "fraction"],
                    [[f"`{r['name']}`", r["modality"], KIND_LABEL.get(r["kind"], r["kind"]), r["layer"], r["kept"],
                      r["total"], f"{r['fraction']:.3f}"] for r in table], align="lllrrrr")

    wall = metrics.get("wall_time_s")
    if isinstance(wall, dict) and wall:
        md += ["", "## Wall time", ""]
        md += _md_table(["phase", "seconds", "h:mm:ss"], [[k, _fmt(v, 1), _hms(v)] for k, v in wall.items()])
    versions = metrics.get("versions")
    if isinstance(versions, dict) and versions:
        md += ["", "## Versions", "", *(f"- {k}: {v if v is not None else NA}" for k, v in versions.items())]
    config = metrics.get("config")
    if config:
        md += ["", "## Config", "", "<details><summary>run config</summary>", "", "```json",
               json.dumps(config, indent=1, default=str), "```", "", "</details>"]
    return "\n".join(md) + "\n"


def write_report(out_dir: Path, metrics: dict[str, Any], plan: dict[str, Any],
                 structures: list[dict[str, Any]]) -> dict[str, Path]:
    """Write kept_widths.png, report.md and metrics.json (metrics + "kept_widths"; NaN stored as null),
    metrics.json last: it marks a finished run.

    Returns {"metrics": ..., "plot": ..., "report": ...}. Without matplotlib the picture is
    skipped (with a warning) and report.md does not reference it.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    try:
        paths["plot"] = plot_kept_widths(plan, structures, out_dir / "kept_widths.png",
                                         title=f"Kept width per layer: {metrics.get('model') or 'model'}")
    except ImportError as exc:
        log.warning("kept_widths.png not written (%s); install matplotlib for the picture", exc)
    record = _jsonable({**metrics, "kept_widths": kept_width_table(plan, structures)})
    text = json.dumps(record, indent=1, default=str, allow_nan=False)
    picture = paths["plot"].name if "plot" in paths else None
    paths["report"] = write_text(out_dir / "report.md", render_markdown(metrics, plan, structures, picture))
    paths["metrics"] = write_text(out_dir / "metrics.json", text + "\n")
    return paths


def versions() -> dict[str, str]:
    """The software and machine a run used (the report's "Versions" section)."""
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "machine": platform.machine(),
            "cpu_threads": str(torch.get_num_threads())}
