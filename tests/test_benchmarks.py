"""The benchmark harness (benchmarks/) end to end on tiny settings: `python -m benchmarks.run --tiny`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TARGETS = (0.5, 0.75)

pytest.importorskip("torch_pruning")
pytest.importorskip("onnxruntime")


def _has_fashion_mnist() -> bool:
    sys.path.insert(0, str(ROOT / "src"))
    try:
        from upop.data import find_fashion_mnist

        return find_fashion_mnist() is not None
    except Exception:
        return False


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    tasks = "retrieval,classification" if _has_fashion_mnist() else "retrieval"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "benchmarks.run", "--tiny", "--threads", "1", "--tasks", tasks,
           "--out", str(tmp / "results"), "--cache", str(tmp / "cache"), "--docs", str(tmp / "docs" / "BENCHMARKS.md")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, tasks.split(",")


def test_results_schema(tiny_run):
    tmp, tasks = tiny_run
    run = json.loads((tmp / "results" / "run.json").read_text())
    assert run["mode"] == "tiny" and run["tasks"] == tasks
    assert run["wall_s"]["total"] > 0
    assert {"torch", "transformers", "onnxruntime", "torch_pruning", "upop"} <= set(run["versions"])
    assert run["machine"]["cores"] >= 1
    for task in tasks:
        data = json.loads((tmp / "results" / f"{task}.json").read_text())
        assert data["complete"] is True and data["seeds"] == [0]
        dense = data["dense"]
        for key in ("metric", "params", "flops", "latency_ms", "prunable_params"):
            assert dense[key] is not None
        methods = list(data["methods"])
        assert {"upop", "torch_pruning"} <= set(methods)
        rows = {(r["method"], r["target"], r["seed"]): r for r in data["rows"]}
        assert set(rows) == {(m, t, 0) for m in methods for t in TARGETS}
        # the dense model was trained to its best validation value, recorded with its curve
        train = dense["train"]
        assert train["curve"] and train["stopped"] in ("patience", "cap")
        assert train["best_val"] == max(c["val"] for c in train["curve"])
        for (method, target, _), row in rows.items():
            assert isinstance(row["metric"], float)
            assert row["flops"] > 0 and row["flops"] < dense["flops"]
            assert set(row["latency_ms"]) == {"batch1", "batch32"}
            assert all(v > 0 for v in row["latency_ms"].values())
            if method != "upop_latency":  # that one cuts measured latency, not params
                # every method lands near the same parameter count: dense - target * prunable
                goal = dense["params"] - target * dense["prunable_params"]
                assert abs(row["params"] - goal) <= 0.03 * dense["prunable_params"], (method, target)
                assert abs(row["achieved"] - target) <= 0.03, (method, target)
            assert row["train_flops"] > 0 and row["steps"] > 0
        for target in TARGETS:  # an equal-compute row spends UPop's training compute, within one chunk
            ec = rows.get(("torch_pruning_ec", target, 0))
            if ec is not None:
                goal = rows[("upop", target, 0)]["train_flops"]
                assert ec["info"]["compute_goal"] == goal
                chunk = data["settings"]["chunk"]
                per_step = ec["info"]["retrain"]["train_flops"] / ec["info"]["retrain"]["steps"]
                assert abs(ec["train_flops"] - goal) <= chunk * per_step / 2 + ec["info"]["prune_flops"]
            kd = rows.get(("upop_kd", target, 0))
            if kd is not None:  # a distilled step also runs the teacher's forward
                assert kd["info"]["distill"] is True and kd["train_flops"] > rows[("upop", target, 0)]["train_flops"]
            lat = rows.get(("upop_latency", target, 0))
            if lat is not None:
                b = lat["info"]["latency_budget"]
                assert b["measured_ms"] > 0 and b["goal_ms"] > 0 and b["target"] == target
        summary = {(s["method"], s["target"]) for s in data["summary"]}
        assert summary == {(m, t) for m in methods for t in TARGETS}
        cost = data["search_cost"]
        assert cost["plain_ms_median"] > 0 and cost["ratio_median"] > 0
        assert data["speed"]["dense"]["torch_ms"]["batch1"] > 0
    retrieval = json.loads((tmp / "results" / "retrieval.json").read_text())
    memory = retrieval["memory"]  # fresh processes, plain and search
    assert memory["plain"]["peak_rss"] > 0 and memory["search"]["peak_rss"] > 0 and memory["peak_ratio"] > 0
    parts = retrieval["breakdown"]["upop@0.5"]["batch1"]
    assert parts["whole"]["speedup"] > 0 and set(parts["parts"]) >= {"attention", "mlp", "other"}
    ort = retrieval["speed"]["dense"]["ort_ms"]["batch1"]
    assert ort is not None and ort > 0, retrieval["speed"]["dense"].get("export")
    assert retrieval["speed"]["dense"]["ort_max_abs_diff"]["batch1"] < 1e-3


def test_report_rendered_from_json_only(tiny_run, tmp_path):
    tmp, tasks = tiny_run
    text = (tmp / "docs" / "BENCHMARKS.md").read_text()
    assert "tiny" in text
    for task in tasks:
        data = json.loads((tmp / "results" / f"{task}.json").read_text())
        for label in data["methods"].values():
            assert text.count(f"| {label} |") >= len(TARGETS), label
        assert (tmp / "results" / "plots" / f"{task}_quality.png").is_file()
    sys.path.insert(0, str(ROOT))
    from benchmarks import render

    again = render.render(tmp / "results", tmp / "docs" / "again.md")
    assert again == text  # the report is a function of the JSON files


def test_step_budget_follow_up_rendered_from_its_json(tiny_run, tmp_path):
    """The follow-up table (benchmarks/step_budget.py) is built from its JSON file, one line per row."""
    tmp, _ = tiny_run
    sys.path.insert(0, str(ROOT))
    from benchmarks import render

    row = {"label": "UPop (unified + progressive)", "metric": 12.345, "params": 1_500_000, "flops": 2.5e8,
           "wall_s": 61.2, "info": {"metric_before_retrain": 3.21, "search": {"steps": 20}}}
    data = {"machine": {"cores": 2, "torch_threads": 2}, "dense": {"metric": 20.5},
            "runs": [{"steps": 40, "search_steps": 20, "target": 0.5, "seed": s,
                      "rows": [{**row, "method": "upop"},
                               {**row, "method": "torch_pruning", "label": "Torch-Pruning", "metric": 9.87,
                                "info": {}}]}
                     for s in (1, 0)]}
    follow = tmp_path / "step_budget.json"
    follow.write_text(json.dumps(data))
    text = render.render(tmp / "results", tmp_path / "docs" / "B.md", follow_up=follow)
    table = [line for line in text.splitlines() if line.startswith("| 40 (")]
    assert len(table) == 4
    assert table[0].startswith("| 40 (0 + 40) | 0.5 | 0 | Torch-Pruning | 9.87 | n/a |")  # seed order; no search
    assert "| 40 (20 + 20) | 0.5 | 1 | UPop (unified + progressive) | 12.35 | 3.21 | 1.50 | 0.250 | 61 |" in table
    assert "r_mean 20.50" in text
    assert text == render.render(tmp / "results", tmp_path / "docs" / "B.md", follow_up=follow)
