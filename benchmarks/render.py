"""docs/BENCHMARKS.md and its plots, from the JSON files of a results folder only.

    python -m benchmarks.render [--results DIR ...] [--docs docs/BENCHMARKS.md]

Every number in the report is read from `<results>/<task>.json` / `<results>/run.json`; the
comparisons in "What the numbers say" are computed from them too. The hand-written
discussion in benchmarks/discussion.md (if present) is appended verbatim.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from upop.files import atomic_write, write_text

HERE = Path(__file__).resolve().parent
TASK_TITLES = {"retrieval": "OpenMoji image-text retrieval (dual encoder: MiniLM text + ViT)",
               "classification": "Fashion-MNIST classification (small DeiT-style ViT)",
               "text": "Emoji names: sentence retrieval with the pretrained all-MiniLM-L6-v2"}
METRIC_NAMES = {"r_mean": "mean recall r_mean", "top1": "top-1 (%)"}


def load(results: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    run_path = results / "run.json"
    run = json.loads(run_path.read_text()) if run_path.is_file() else {}
    tasks = []
    for path in sorted(results.glob("*.json")):
        if path.name == "run.json":
            continue
        data = json.loads(path.read_text())
        if isinstance(data, dict) and "rows" in data:
            data["_file"] = path.name
            tasks.append(data)
    order = {"retrieval": 0, "classification": 1, "text": 2}
    tasks.sort(key=lambda d: order.get(d["task"], 9))
    return run, tasks


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ms(profile: dict[str, Any], kind: str, batch: str) -> float | None:
    return (profile.get(kind) or {}).get(batch)


def _speedup(dense: float | None, value: float | None) -> str:
    if dense is None or value is None:
        return "n/a"
    return f"{value:.1f} ({dense / value:.2f}x)"


def quality_table(task: dict[str, Any]) -> list[str]:
    metric = task["metric"]
    dense = task.get("dense")
    batches = list((dense or {}).get("latency_ms", {}) or {"batch1": 0, "batch32": 0})
    head = (f"| method | target | {metric} mean ± std (n) | % of dense | min..max | before retrain | steps | "
            "train compute (TFLOP) | params (M) | pruned / prunable | FLOPs (G) | "
            + " | ".join(f"PyTorch {b} (ms)" for b in batches) + " |")
    lines = [head, "|" + "---|" * (11 + len(batches))]
    if dense:
        lines.append(f"| dense | - | {dense['metric']:.2f} (1) | 100 | - | - | {dense_steps(task)} | - | "
                     f"{dense['params'] / 1e6:.2f} | 0 | {dense['flops'] / 1e9:.3f} | "
                     + " | ".join(_fmt(dense["latency_ms"][b], 1) for b in batches) + " |")
    for s in task.get("summary", []):
        rows = [r for r in task["rows"] if r["method"] == s["method"] and r["target"] == s["target"]]
        before = [r["info"].get("metric_before_retrain") for r in rows]
        before = [b for b in before if b is not None]
        before_txt = f"{sum(before) / len(before):.2f}" if before else "n/a"
        kept = f"{100 * s['metric_mean'] / dense['metric']:.1f}" if dense and dense["metric"] else "n/a"
        compute = f"{s['train_flops'] / 1e12:.2f}" if s.get("train_flops") else "n/a"
        lines.append(
            f"| {s['label']} | {s['target']} | {s['metric_mean']:.2f} ± {s['metric_std']:.2f} ({len(s['seeds'])}) | "
            f"{kept} | {s['metric_min']:.2f}..{s['metric_max']:.2f} | {before_txt} | {s.get('steps', 0):.0f} | "
            f"{compute} | {s['params'] / 1e6:.2f} | {s['achieved']:.3f} | {s['flops'] / 1e9:.3f} | "
            + " | ".join(_fmt(s["latency_ms"].get(b), 1) for b in batches) + " |")
    return lines


def dense_steps(task: dict[str, Any]) -> str:
    train = (task.get("dense") or {}).get("train", {})
    return str(train.get("steps", task["settings"].get("dense_steps", "?")))


def dense_description(task: dict[str, Any]) -> str:
    """How the dense model was trained: to convergence on the validation split (this harness), or a
    fixed step count (results of earlier harness versions)."""
    s, train = task["settings"], (task.get("dense") or {}).get("train", {})
    cached = "loaded from the cache" if train.get("cached") else "trained in this run"
    if "dense_steps" in s:
        return f"Dense model: {s['dense_steps']} steps, seed 0, trained once and cached ({cached})."
    curve = train.get("curve") or []
    why = {"patience": f"stopped after {s['dense_patience']} evaluations without improvement",
           "cap": "stopped at the cap, still improving"}.get(train.get("stopped"), "?")
    return (f"Dense model: trained until the validation {task['metric']} stopped improving (evaluated every "
            f"{s['dense_eval_every']} steps, patience {s['dense_patience']}, cap {s['dense_max_steps']} steps; "
            f"cosine schedule over the cap): {train.get('steps_run', '?')} steps run, {why}; the best weights "
            f"(step {train.get('steps', '?')}, validation {task['metric']} {_fmt(train.get('best_val'))}) are kept. "
            f"Seed 0, trained once and cached ({cached}). Validation curve (step: value): "
            + ", ".join(f"{c['step']}: {c['val']:.2f}" for c in curve) + ".")


def speed_table(task: dict[str, Any]) -> list[str]:
    speed = task.get("speed", {})
    dense = speed.get("dense")
    if not dense:
        return ["(no speed measurements)"]
    batches = list(dense["torch_ms"])
    head = ("| model | params (M) | FLOPs (G) | FLOPs ratio (ideal) | "
            + " | ".join(f"PyTorch {b} ms (speedup)" for b in batches) + " | "
            + " | ".join(f"ORT {b} ms (speedup)" for b in batches) + " | "
            + " | ".join(f"PyTorch {b} speedup / FLOPs ratio" for b in batches) + " |")
    lines = [head, "|" + "---|" * (4 + 3 * len(batches))]
    labels = task.get("methods", {})
    for name, profile in speed.items():
        if name == "dense":
            label = "dense"
        else:
            method, target = name.split("@")
            label = f"{labels.get(method, method)} @ {target}"
        ratio = dense["flops"] / profile["flops"]
        cells = [_speedup(dense["torch_ms"].get(b), profile["torch_ms"].get(b)) for b in batches]
        cells += [_speedup(_ms(dense, "ort_ms", b), _ms(profile, "ort_ms", b)) for b in batches]
        cells += [_fmt(dense["torch_ms"][b] / profile["torch_ms"][b] / ratio)
                  if dense["torch_ms"].get(b) and profile["torch_ms"].get(b) else "n/a" for b in batches]
        lines.append(f"| {label} | {profile['params'] / 1e6:.2f} | {profile['flops'] / 1e9:.3f} | {ratio:.2f}x | "
                     + " | ".join(cells) + " |")
    errors = [(n, b, e["error"]) for n, p in speed.items() for b, e in (p.get("export") or {}).items()
              if isinstance(e, dict) and "error" in e]
    for name, batch, err in errors:
        lines.append(f"\nONNX export/run failed for {name} at {batch}: `{err}`")
    diffs = [d for p in speed.values() for d in (p.get("ort_max_abs_diff") or {}).values() if d is not None]
    if diffs:
        lines.append(f"\nEvery exported model was checked against PyTorch before timing: max |ORT - PyTorch| "
                     f"of the logits = {max(diffs):.2e}.")
    return lines


def search_cost_lines(task: dict[str, Any]) -> list[str]:
    c = task.get("search_cost")
    if not c:
        return []
    verdict = "within" if c["ratio_median"] <= 1.10 else "above"
    return [f"Search cost: a training step with the search attached (mask hooks, sparsity loss, `search.step()` "
            f"with its re-ranking every {c['interval']} steps) takes {c['search_ms_median']:.0f} ms against "
            f"{c['plain_ms_median']:.0f} ms for a plain step on the same batch of {c['batch_size']} "
            f"(median of {c['steps']} alternating steps): **{c['ratio_median']:.3f}x** (mean {c['ratio_mean']:.3f}x), "
            f"{verdict} the 1.10x target."]


def findings(task: dict[str, Any]) -> list[str]:
    """Plain comparisons computed from the summary: who is best per target, by how much."""
    out = []
    summary = task.get("summary", [])
    labels = task.get("methods", {})
    for target in task.get("targets", []):
        sel = [s for s in summary if s["target"] == target]
        if not sel:
            continue
        best = max(sel, key=lambda s: s["metric_mean"])
        mine = next((s for s in sel if s["method"] == "upop"), None)
        others = [s for s in sel if s["method"] != "upop"]
        if mine is None or not others:
            continue
        rival = max(others, key=lambda s: s["metric_mean"])
        gap = mine["metric_mean"] - rival["metric_mean"]
        spread = max(mine["metric_std"], rival["metric_std"])
        n = len(mine["seeds"])
        if best["method"] == "upop":
            verdict = (f"UPop is best at target {target}, {gap:+.2f} over the next ({labels.get(rival['method'])})")
        else:
            verdict = (f"UPop does **not** win at target {target}: {labels.get(best['method'])} is best, "
                       f"UPop is {gap:+.2f} against it")
        if n < 2:
            verdict += " (one seed: no spread measured, differences of this size can be noise)"
        elif abs(gap) <= 2 * spread:
            verdict += f" - within twice the seed spread ({spread:.2f}), so not a clear difference"
        out.append(f"- {verdict}.")
        tp = next((s for s in sel if s["method"] == "torch_pruning"), None)
        if tp is not None:
            out.append(f"  Torch-Pruning reached {tp['params'] / 1e6:.3f}M params against UPop's "
                       f"{mine['params'] / 1e6:.3f}M (pruned fraction {tp['achieved']:.3f} vs {mine['achieved']:.3f}).")
    return out


def _pick(summary: list[dict[str, Any]], method: str, target: float) -> dict[str, Any] | None:
    return next((s for s in summary if s["method"] == method and s["target"] == target), None)


def _versus(a: dict[str, Any], b: dict[str, Any]) -> str:
    """a against b: the gap and whether it exceeds twice the larger seed spread."""
    gap = a["metric_mean"] - b["metric_mean"]
    n = min(len(a["seeds"]), len(b["seeds"]))
    spread = max(a["metric_std"], b["metric_std"])
    if n < 2:
        return f"{gap:+.2f} (one seed: no spread measured)"
    clear = "beyond" if abs(gap) > 2 * spread else "within"
    return f"{gap:+.2f} ({clear} twice the seed spread {spread:.2f})"


def comparisons(task: dict[str, Any]) -> list[str]:
    """The issue's questions, answered from the summary: how much of the dense metric is kept, what
    distillation adds, UPop against each rival at equal steps and at equal training compute."""
    out = []
    summary, dense = task.get("summary", []), task.get("dense") or {}
    labels = task.get("methods", {})
    for target in task.get("targets", []):
        mine = _pick(summary, "upop", target)
        if mine is None:
            continue
        kd = _pick(summary, "upop_kd", target)
        if dense.get("metric"):
            kept = [f"UPop keeps {100 * mine['metric_mean'] / dense['metric']:.1f}% of the dense {task['metric']}"]
            if kd:
                kept.append(f"UPop + distillation {100 * kd['metric_mean'] / dense['metric']:.1f}%")
            out.append(f"- Target {target}: " + ", ".join(kept) + f" (dense {dense['metric']:.2f}).")
        if kd:
            out.append(f"  Distillation: UPop + KD vs UPop {_versus(kd, mine)}.")
        tp, tp_kd = _pick(summary, "torch_pruning", target), _pick(summary, "torch_pruning_kd", target)
        if tp and tp_kd:
            out.append(f"  Distillation: Torch-Pruning + KD vs Torch-Pruning {_versus(tp_kd, tp)}.")
        best = max((s for s in (mine, kd) if s), key=lambda s: s["metric_mean"])
        for other in summary:
            if other["target"] != target or other["method"] in ("upop", "upop_kd", "upop_latency"):
                continue
            equal = "equal training compute" if other["method"].endswith("_ec") else "equal steps"
            out.append(f"  {labels.get(best['method'], best['method'])} vs {labels.get(other['method'])} "
                       f"({equal}; {other['steps']:.0f} steps, {other['train_flops'] / 1e12:.2f} TFLOP against "
                       f"{best['train_flops'] / 1e12:.2f}): {_versus(best, other)}.")
    return out


def latency_budget_lines(task: dict[str, Any]) -> list[str]:
    """budget latency rows: the measured latency of the compressed model against the goal (the
    fixed part + (1 - target) x the prunable part, both measured on the tables' machine)."""
    rows = [r for r in task.get("rows", []) if r["info"].get("latency_budget")]
    if not rows:
        return []
    dense = task.get("dense") or {}
    lines = ["#### Latency budget (`budget: latency`, `round_to: auto`)", "",
             "The latency tables are measured on this machine (PyTorch CPU, the threads above) at the batch "
             "given; goal = fixed part + (1 - target) x prunable part of the dense model's measured latency.", "",
             "| target | seed | batch | dense ms | goal ms | predicted ms | measured ms | measured / goal | "
             "speedup | FLOPs ratio | speedup / FLOPs ratio | tables built in (s) |", "|" + "---|" * 12]
    for r in sorted(rows, key=lambda r: (r["target"], r["seed"])):
        b = r["info"]["latency_budget"]
        ratio = dense["flops"] / r["flops"] if dense.get("flops") else None
        speedup = b.get("measured_speedup")
        eff = speedup / ratio if speedup and ratio else None
        lines.append(f"| {r['target']} | {r['seed']} | {b.get('batch')} | {_fmt(b.get('model_ms'))} | "
                     f"{_fmt(b.get('goal_ms'))} | {_fmt(b.get('predicted_ms'))} | {_fmt(b.get('measured_ms'))} | "
                     f"{_fmt(b.get('measured_over_goal'), 3)} | {_fmt(speedup)}x | {_fmt(ratio)}x | {_fmt(eff)} | "
                     f"{_fmt(b.get('build_s'), 1)} |")
    return lines + [""]


BREAKDOWN_PARTS = ("attention", "mlp", "embeddings", "norms", "head", "other")


def breakdown_lines(task: dict[str, Any]) -> list[str]:
    """Where the time goes, part by part (benchmarks/breakdown.py): dense against compressed."""
    entries = task.get("breakdown") or {}
    if not entries:
        return []
    labels = task.get("methods", {})
    lines = ["#### Where the speedup goes, part by part", "",
             "One forward pass timed module by module through thin forward wrappers (median of the runs; "
             "`other` = the whole "
             "hooked forward minus the timed parts: residual adds, reshapes, per-call overhead), FLOPs counted "
             "per part with eager attention.", ""]
    for name, batches in entries.items():
        method, target = name.split("@")
        for batch, r in batches.items():
            w, f = r["whole"], r["fixed"]
            lines += [f"{labels.get(method, method)} @ {target}, {batch}: whole model {w['dense_ms']:.2f} -> "
                      f"{w['compressed_ms']:.2f} ms, **{_fmt(w['speedup'])}x for a FLOPs ratio of "
                      f"{_fmt(w['flops_ratio'])}x**; the never-pruned parts took {100 * f['dense_share']:.0f}% of the "
                      f"dense time and {100 * f['compressed_share']:.0f}% of the compressed time "
                      f"(wrapper overhead {100 * (w['dense_hook_overhead'] or 0):.0f}% / "
                      f"{100 * (w['compressed_hook_overhead'] or 0):.0f}%).", "",
                      "| part | dense ms | compressed ms | speedup | FLOPs ratio | share of dense time | "
                      "share of compressed time |", "|" + "---|" * 7]
            for part in BREAKDOWN_PARTS:
                x = r["parts"].get(part)
                if x is None:
                    continue
                lines.append(f"| {part} | {x['dense_ms']:.2f} | {x['compressed_ms']:.2f} | {_fmt(x['speedup'])} | "
                             f"{_fmt(x['flops_ratio'])} | {100 * x['dense_share']:.0f}% | "
                             f"{100 * x['compressed_share']:.0f}% |")
            lines.append("")
    return lines


def memory_lines(task: dict[str, Any]) -> list[str]:
    m = task.get("memory")
    if not m:
        return []
    plain, search = m["plain"], m["search"]
    mib = 2 ** 20
    verdict = "within" if m["peak_ratio"] <= 1.05 else "above"
    growth = f"{m['growth_ratio']:.3f}x" if m.get("growth_ratio") else "n/a"
    text = (f"Search memory: peak RSS of {m['steps']} training steps on one batch, each mode in a fresh process "
            f"(the smaller of {m['runs']} runs): plain {plain['peak_rss'] / mib:.0f} MiB, with the search attached "
            f"{search['peak_rss'] / mib:.0f} MiB: **{m['peak_ratio']:.3f}x**, {verdict} the 1.05x target; growth "
            f"over the RSS before the first step (model, batch, optimizer built): {growth}.")
    if m.get("cuda_peak_ratio"):
        text += f" CUDA max allocated: {m['cuda_peak_ratio']:.3f}x."
    return [text, ""]


def plots(task: dict[str, Any], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    made = []
    summary = task.get("summary", [])
    if summary:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        labels = task.get("methods", {})
        for i, method in enumerate(labels):
            sel = sorted((s for s in summary if s["method"] == method), key=lambda s: s["target"])
            if not sel:
                continue
            ax.errorbar([s["params"] / 1e6 for s in sel], [s["metric_mean"] for s in sel],
                        yerr=[s["metric_std"] for s in sel], marker="os^vD"[i % 5], capsize=3, label=method)
        dense = task.get("dense")
        if dense:
            ax.axhline(dense["metric"], color="grey", linestyle="--", label="dense")
        ax.set_xlabel("params (M)")
        ax.set_ylabel(task["metric"])
        ax.set_title(f"{task['task']}: {task['metric']} vs params (2x and 4x)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = folder / f"{task['task']}_quality.png"
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
        plt.close(fig)
        made.append(path)
    speed = task.get("speed", {})
    dense = speed.get("dense")
    if dense and len(speed) > 1:
        names = [n for n in speed if n != "dense"]
        series = [("FLOPs ratio (ideal)", lambda p: dense["flops"] / p["flops"])]
        for kind, label in (("torch_ms", "PyTorch"), ("ort_ms", "ORT")):
            for b in dense["torch_ms"]:
                def value(p, kind=kind, b=b):
                    d, v = _ms(dense, kind, b), _ms(p, kind, b)
                    return d / v if d and v else 0.0
                series.append((f"{label} {b}", value))
        fig, ax = plt.subplots(figsize=(7.2, 4.2))
        width = 0.8 / len(series)
        for j, (label, fn) in enumerate(series):
            ax.bar([i + j * width for i in range(len(names))], [fn(speed[n]) for n in names], width, label=label)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, fontsize=8)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_ylabel("speedup over dense")
        ax.set_title(f"{task['task']}: measured CPU speedup vs FLOPs ratio")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = folder / f"{task['task']}_speed.png"
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
        plt.close(fig)
        made.append(path)
    return made


def _duration(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds / 60:.1f} min"


def run_section(results: Path, docs: Path) -> list[str]:
    """The section of one results folder (one run of benchmarks/run.py)."""
    run, tasks = load(results)
    if not tasks:
        return []
    mode = run.get("mode") or tasks[0]["mode"]
    title = {"full": "Full run", "quick": "Quick run (`--quick`)", "tiny": "Tiny smoke run (`--tiny`)"}.get(mode, mode)
    note = {"full": "",
            "quick": " One seed and a few dozen training steps: these numbers show the harness works, not how "
                     "the methods compare; the full run is what to read.",
            "tiny": " Test settings: the numbers mean nothing."}.get(mode, "")
    where = os.path.relpath(results, docs.parent)
    lines = [f"## {title}", ""]
    total = _duration((run.get("wall_s") or {}).get("total"))
    commands = " ; ".join(f"`{c}`" for c in run.get("command", "?").split(" ; "))
    lines += [f"Command(s) {commands}, started {run.get('started', '?')}, finished "
              f"{run.get('finished', 'not finished')}, total process time {total} (processes run side by side add up)."
              f"{note} Source files: " + ", ".join(f"`{where}/{t['_file']}`" for t in tasks)
              + (f", `{where}/run.json`." if run else ".")
              + (f" How it ran: {run['note']}" if run.get("note") else ""), ""]
    env = run or tasks[0]
    machine, versions = env.get("machine", {}), env.get("versions", {})
    if machine:
        lines += [f"Machine: {machine.get('cpu')}, {machine.get('cores')} cores, torch threads "
                  f"{machine.get('torch_threads')}, {machine.get('platform')}, Python {machine.get('python')}. "
                  "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".", ""]
    for task in tasks:
        s = task["settings"]
        rc = task.get("run_config", {})
        made = plots(task, results / "plots")
        lines += [f"### {TASK_TITLES.get(task['task'], task['task'])} ({mode})", ""]
        metric_name = METRIC_NAMES.get(task["metric"], task["metric"])
        model = rc.get("model", {}).get("preset")
        if s.get("deit"):
            d = s["deit"]
            model = f"DeiT {d['depth']} layers, {d['width']} wide, {d['heads']} heads, patch {d['patch']}"
        lines += [f"Model {model}, data `{rc.get('data', {}).get('format')}` "
                  f"(training images {rc.get('data', {}).get('limit_train') or 'all'}, test images "
                  f"{rc.get('data', {}).get('limit_eval') or 'all'}), batch {rc.get('train', {}).get('batch_size')}. "
                  f"{dense_description(task)} "
                  f"Each method: {s['steps']} steps (UPop variants: {s['search_steps']} search + "
                  f"{s['steps'] - s['search_steps']} retrain; magnitude and Torch-Pruning: {s['steps']} retrain; "
                  "the `_ec` rows: as many retraining steps as spend UPop's training compute at the same target "
                  "and seed). "
                  f"Seeds {task['seeds']}. Metric: {metric_name} on the test split. "
                  f"Latency: median of {s['repeats']} runs after 2 warm-up runs.", ""]
        lines += ["#### Quality", ""] + quality_table(task) + [""]
        lines += ["#### Speed", ""] + speed_table(task) + [""]
        lines += search_cost_lines(task) + [""]
        lines += memory_lines(task)
        lines += breakdown_lines(task)
        lines += latency_budget_lines(task)
        facts = findings(task) + comparisons(task)
        if facts:
            lines += ["#### What the numbers say", ""] + facts + [""]
        for path in made:
            lines += [f"![{path.stem}]({os.path.relpath(path, docs.parent)})", ""]
        wall = task.get("wall_s", {})
        if wall:
            phases = ", ".join(f"{k} {v:.0f}" for k, v in wall.items())
            lines += [f"Wall time per phase (s, rows summed over seeds): {phases}", ""]
        if not task.get("complete"):
            lines += ["**This task's run did not complete; the tables hold the rows it finished.**", ""]
    return lines


STEP_BUDGET = HERE / "results" / "step_budget" / "retrieval.json"


def step_budget_section(path: Path, docs: Path) -> list[str]:
    """The follow-up of benchmarks/step_budget.py: the same comparison at larger step budgets."""
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    machine = data.get("machine", {})
    lines = ["## Follow-up: retrieval at larger step budgets", "",
             f"`python -m benchmarks.step_budget` (source file `{os.path.relpath(path, docs.parent)}`), recorded "
             "with the previous harness: a dense model trained for a fixed 180 steps (test r_mean "
             f"{data['dense']['metric']:.2f}, not converged), more training steps per method (UPop: half search, "
             "half retraining; Torch-Pruning: all retraining). Kept for the step-budget trend it shows; the "
             f"full run above replaces its dense model. {machine.get('cores')} cores, torch threads "
             f"{machine.get('torch_threads')}.", "",
             "| steps per method (search + retrain) | target | seed | method | r_mean | before retrain | "
             "params (M) | FLOPs (G) | wall (s) |", "|" + "---|" * 9]
    runs = sorted(data.get("runs", []), key=lambda r: (r["steps"], r["target"], r["seed"]))
    for run in runs:
        for row in sorted(run["rows"], key=lambda r: r["method"]):
            search = (row["info"].get("search") or {}).get("steps", 0)  # one-shot methods: none
            lines.append(f"| {run['steps']} ({search} + {run['steps'] - search}) | {run['target']} | {run['seed']} | "
                         f"{row['label']} | {row['metric']:.2f} | {_fmt(row['info'].get('metric_before_retrain'))} | "
                         f"{row['params'] / 1e6:.2f} | {row['flops'] / 1e9:.3f} | {row['wall_s']:.0f} |")
    return lines + [""]


def render(results: Path | list[Path], docs: Path, discussion: Path | None = HERE / "discussion.md",
           follow_up: Path | None = None) -> str:
    """Write `docs` from one or more results folders (one section each, in the order given), then the
    step-budget follow-up (when given) and the discussion."""
    folders = [Path(r) for r in (results if isinstance(results, (list, tuple)) else [results])]
    docs = Path(docs)
    lines = ["# Benchmarks", "",
             "<!-- generated by `python -m benchmarks.render` from the results JSON files; do not edit -->", "",
             "`python -m benchmarks.run` (full run, results in `benchmarks/results/`) or "
             "`python -m benchmarks.run --quick` (results in `benchmarks/results/quick/`) regenerates this page; "
             "`python -m benchmarks.render` rebuilds it from the JSON files alone.", ""]
    methods = {}
    for folder in folders:
        for task in load(folder)[1]:
            methods.update(task.get("methods", {}))
    if methods:
        lines += ["Methods (every one gets the same training steps after the dense model, except the `_ec` rows: "
                  "the same training compute as UPop):", ""]
        lines += [f"- `{key}`: {label}" for key, label in methods.items()] + [""]
    sections = [run_section(folder, docs) for folder in folders]
    if not any(sections):
        lines += ["No results yet.", ""]
    for section in sections:
        lines += section
    if follow_up is not None:
        lines += step_budget_section(Path(follow_up), docs)
    if discussion is not None and Path(discussion).is_file():
        lines += [Path(discussion).read_text().rstrip(), ""]
    text = "\n".join(lines)
    write_text(docs, text)
    return text


def default_folders(root: Path) -> list[Path]:
    """The full run first, then the quick run, where they have results."""
    base = root / "benchmarks" / "results"
    return [f for f in (base, base / "quick") if any(p.name != "run.json" for p in f.glob("*.json"))]


def main(argv: list[str] | None = None) -> int:
    root = HERE.parent
    parser = argparse.ArgumentParser(prog="python -m benchmarks.render")
    parser.add_argument("--results", type=Path, nargs="*", default=None,
                        help="results folders (default: benchmarks/results and benchmarks/results/quick)")
    parser.add_argument("--docs", type=Path, default=root / "docs" / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    render(args.results or default_folders(root), args.docs, follow_up=None if args.results else STEP_BUDGET)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
