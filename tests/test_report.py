"""upop.report: kept-width table, picture, console table and the written report."""

from __future__ import annotations

import json
import os

import pytest

from upop import files, report

# name -> (modality, kind, layer, unit, total, kept count, unit_params)
LAYOUT = {
    "vision.blocks.0.attn": ("vision", "attention", 0, "head_dim", 16, 8, 1000.0),
    "vision.blocks.0.mlp": ("vision", "mlp", 0, "neuron", 64, 48, 100.0),
    "vision.blocks.1.attn": ("vision", "attention", 1, "head_dim", 16, 4, 1000.0),
    "vision.blocks.1.mlp": ("vision", "mlp", 1, "neuron", 64, 16, 100.0),
    "text.layer.0.attention": ("text", "attention", 0, "head_dim", 16, 12, 1000.0),
    "text.layer.0.crossattention": ("text", "cross_attention", 0, "head_dim", 16, 2, 1500.0),
    "text.layer.0.mlp": ("text", "mlp", 0, "neuron", 64, 32, 100.0),
    "text.layer.1.attention": ("text", "attention", 1, "head_dim", 16, 16, 1000.0),
    "text.layer.1.mlp": ("text", "mlp", 1, "neuron", 64, 60, 100.0),
}


@pytest.fixture
def plan_and_structures() -> tuple[dict, list[dict]]:
    structures, entries = [], {}
    # reversed, so the table has to sort
    for name, (modality, kind, layer, unit, total, kept, unit_params) in reversed(LAYOUT.items()):
        attention = kind != "mlp"
        structures.append({
            "name": name, "kind": kind, "modality": modality, "layer": layer, "family": "fake", "unit": unit,
            "units": total, "unit_params": unit_params, "num_heads": 4 if attention else 0,
            "head_dim": 16 if attention else 0,
        })
        entries[name] = {
            "kind": kind, "unit": unit, "total": total, "kept": list(range(total - kept, total)),
            "num_heads": 4 if attention else 0, "head_dim": 16 if attention else 0,
            "hidden": 0 if attention else 64,
        }
    plan = {"format": "upop-plan", "version": 1, "model_class": "FakeDual",
            "stats": {"achieved": 0.4, "budget": "params", "target": 0.4}, "structures": entries}
    return plan, structures


def _metrics() -> dict:
    return {
        "task": "retrieval", "metric": "r_mean", "model": "demo-dual",
        "dense": {"metric": 41.2, "metrics": {"txt_r1": 30.5, "img_r1": 28.25, "r_mean": 41.2},
                  "params": 25_500_000, "flops": 1.2e9, "latency_ms": {"batch1": 12.3, "batch32": 150.1}},
        "compressed": {"metric": 39.87, "metrics": {"txt_r1": 29.0, "img_r1": 27.5, "r_mean": 39.87},
                       "params": 15_300_000, "flops": 0.66e9, "latency_ms": {"batch1": 8.2, "batch32": 90.05}},
        "searched": {"metric": 12.5},
        "prunable_params": 12_000_000, "target": 0.4, "achieved": 0.399, "budget": "params",
        "wall_time_s": {"dense": 3.5, "search": 100.0, "retrain": 3725.0, "total": 3828.5},
        "config": {"model": {"preset": "demo-dual"}, "upop": {"target": 0.4}},
        "versions": {"torch": "2.5.0", "upop": "0.1.0"},
    }


def test_kept_width_table_fractions_and_order(plan_and_structures):
    plan, structures = plan_and_structures
    rows = report.kept_width_table(plan, structures)
    assert [r["name"] for r in rows] == [
        "vision.blocks.0.attn", "vision.blocks.1.attn", "vision.blocks.0.mlp", "vision.blocks.1.mlp",
        "text.layer.0.attention", "text.layer.1.attention", "text.layer.0.crossattention",
        "text.layer.0.mlp", "text.layer.1.mlp",
    ]
    for row in rows:
        modality, kind, layer, _, total, kept, _ = LAYOUT[row["name"]]
        assert set(row) == {"name", "modality", "kind", "layer", "kept", "total", "fraction"}
        assert (row["modality"], row["kind"], row["layer"], row["kept"], row["total"]) == (
            modality, kind, layer, kept, total)
        assert row["fraction"] == pytest.approx(kept / total)


def test_modality_summary_weights_by_unit_params(plan_and_structures):
    plan, structures = plan_and_structures
    summary = {s["modality"]: s for s in report.modality_summary(plan, structures)}
    assert list(summary) == ["vision", "text", "all"]
    vision = (8 * 1000 + 48 * 100 + 4 * 1000 + 16 * 100) / (2 * 16 * 1000 + 2 * 64 * 100)
    text = (12 * 1000 + 2 * 1500 + 32 * 100 + 16 * 1000 + 60 * 100) / (2 * 16 * 1000 + 16 * 1500 + 2 * 64 * 100)
    assert summary["vision"]["params_fraction"] == pytest.approx(vision)
    assert summary["text"]["params_fraction"] == pytest.approx(text)
    assert summary["all"]["structures"] == len(LAYOUT)


def test_format_table_values_and_changes():
    text = report.format_table(_metrics())
    lines = text.splitlines()
    assert lines[0].split() == ["dense", "searched", "compressed", "change"]
    row = {line.split("  ")[0].strip(): line for line in lines[2:]}
    assert list(row) == ["r_mean", "params (M)", "FLOPs (G)", "latency batch 1 (ms)", "latency batch 32 (ms)"]
    assert row["r_mean"].split()[1:] == ["41.20", "12.50", "39.87", "-1.33", "(-3.2%)"]
    assert row["params (M)"].split()[2:] == ["25.50", "n/a", "15.30", "-40.0%"]
    assert row["FLOPs (G)"].split()[2:] == ["1.200", "n/a", "0.660", "-45.0%"]
    assert "1.50x faster" in row["latency batch 1 (ms)"]
    assert "1.67x faster" in row["latency batch 32 (ms)"]


def test_format_table_handles_missing_values():
    metrics = _metrics()
    del metrics["searched"]
    metrics["dense"]["latency_ms"] = None
    metrics["compressed"].update(flops=None, latency_ms={"batch1": None, "batch32": 90.0})
    metrics["compressed"]["metric"] = float("nan")
    text = report.format_table(metrics)
    assert "searched" not in text
    row = {line.split("  ")[0].strip(): line.split() for line in text.splitlines()[2:]}
    assert row["r_mean"][1:] == ["41.20", "n/a", "n/a"]
    assert row["FLOPs (G)"][2:] == ["1.200", "n/a", "n/a"]
    assert row["latency batch 1 (ms)"][4:] == ["n/a", "n/a", "n/a"]
    assert row["latency batch 32 (ms)"][4:] == ["n/a", "90.0", "n/a"]
    # a bare record (nothing measured at all) still formats
    bare = report.format_table({"metric": "acc", "dense": None, "compressed": None})
    assert bare.count("n/a") == 5 * 3


def test_write_report(tmp_path, plan_and_structures):
    from PIL import Image

    plan, structures = plan_and_structures
    metrics = _metrics()
    out = tmp_path / "run"
    paths = report.write_report(out, metrics, plan, structures)
    assert set(paths) == {"metrics", "plot", "report"}
    assert paths == {"metrics": out / "metrics.json", "plot": out / "kept_widths.png", "report": out / "report.md"}
    assert all(p.is_file() for p in paths.values())
    assert sorted(os.listdir(out)) == ["kept_widths.png", "metrics.json", "report.md"]  # no temp files left
    assert "kept_widths" not in metrics  # the caller's dict is not modified

    saved = json.loads(paths["metrics"].read_text())
    assert {k: v for k, v in saved.items() if k != "kept_widths"} == metrics
    widths = {r["name"]: r for r in saved["kept_widths"]}
    assert set(widths) == set(LAYOUT)
    for name, (_, _, _, _, total, kept, _) in LAYOUT.items():
        assert widths[name]["fraction"] == pytest.approx(kept / total)
        assert (widths[name]["kept"], widths[name]["total"]) == (kept, total)

    md = paths["report"].read_text()
    for expected in (
        "| r_mean | 41.20 | 12.50 | 39.87 | -1.33 (-3.2%) |",
        "| params (M) | 25.50 | n/a | 15.30 | -40.0% |",
        "| FLOPs (G) | 1.200 | n/a | 0.660 | -45.0% |",
        "| latency batch 32 (ms) | 150.1 | n/a | 90.0 | 1.67x faster |",
        "| latency batch 1 (ms) | 12.3 | n/a | 8.2 | 1.50x faster |",
        "| `txt_r1` | 30.50 | 29.00 | -1.50 (-4.9%) |",
        "![kept widths](kept_widths.png)", "demo-dual", "remove 40.0%", "39.90%",
        "| `text.layer.0.crossattention` | text | cross-attention | 0 | 2 | 16 | 0.125 |",
        "| retrain | 3725.0 | 1:02:05 |", "- torch: 2.5.0",
    ):
        assert expected in md, expected
    vision = (8 * 1000 + 48 * 100 + 4 * 1000 + 16 * 100) / (2 * 16 * 1000 + 2 * 64 * 100)
    assert f"| vision | 4 | 76/160 | {100 * vision:.1f}% | 26.4k |" in md  # 44800 prunable, 18400 kept

    raw = paths["plot"].read_bytes()
    assert raw.startswith(b"\x89PNG\r\n\x1a\n") and len(raw) > 10_000
    with Image.open(paths["plot"]) as img:
        img.verify()
    with Image.open(paths["plot"]) as img:
        assert img.format == "PNG"
        assert img.width > 300 and img.height > 300


def test_write_report_with_unmeasured_values(tmp_path, plan_and_structures):
    """None / NaN / missing sections: strict JSON (NaN -> null) and "n/a" in the report."""
    plan, structures = plan_and_structures
    metrics = {"task": "classification", "metric": "acc", "model": None, "target": 0.5, "achieved": None,
               "dense": {"metric": 80.0, "metrics": {"acc": 80.0}, "params": 1000, "flops": None, "latency_ms": None},
               "compressed": {"metric": float("nan"), "metrics": {"acc": None}, "params": None, "flops": None,
                              "latency_ms": None},
               "searched": None, "wall_time_s": {"total": None}}
    paths = report.write_report(tmp_path, metrics, plan, structures)
    saved = json.loads(paths["metrics"].read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    assert saved["compressed"]["metric"] is None and saved["dense"]["metric"] == 80.0
    md = paths["report"].read_text()
    assert "| acc | 80.00 | n/a | n/a |" in md
    assert "| params (M) | 0.00 | n/a | n/a |" in md
    assert "achieved: n/a" in md and "| total | n/a | n/a |" in md


def test_rewrite_is_atomic_and_leaves_no_temp_files(tmp_path, plan_and_structures, monkeypatch):
    plan, structures = plan_and_structures
    paths = report.write_report(tmp_path, _metrics(), plan, structures)
    before = paths["report"].read_text()

    def broken(*args, **kwargs):
        raise RuntimeError("render failed")

    monkeypatch.setattr(report, "render_markdown", broken)
    with pytest.raises(RuntimeError):
        report.write_report(tmp_path, _metrics(), plan, structures)
    assert paths["report"].read_text() == before
    monkeypatch.undo()

    # a failure while writing the temporary file removes it and keeps the old file
    def failing_write(f):
        f.write(b"half a file")
        raise OSError("disk full")

    with pytest.raises(OSError):
        files.atomic_write(paths["report"], failing_write)
    assert paths["report"].read_text() == before
    assert sorted(os.listdir(tmp_path)) == ["kept_widths.png", "metrics.json", "report.md"]


def test_plot_many_layers(tmp_path):
    """A 12-layer decoder-only plan (labels turn vertical) plots; layer -1 gets a '-' tick."""
    from PIL import Image

    plan = {"structures": {}, "stats": {}}
    structures = []
    for layer in range(12):
        for kind, total in (("attention", 12), ("mlp", 3072)):
            name = f"decoder.h.{layer}.{kind}"
            plan["structures"][name] = {"kind": kind, "unit": "head", "total": total,
                                        "kept": list(range(max(1, total * (layer + 1) // 12)))}
            structures.append({"name": name, "kind": kind, "modality": "decoder", "layer": layer, "unit_params": 1.0})
    plan["structures"]["decoder.pooler"] = {"kind": "mlp", "unit": "neuron", "total": 10, "kept": [0, 1]}
    structures.append({"name": "decoder.pooler", "kind": "mlp", "modality": "decoder", "layer": -1})
    path = report.plot_kept_widths(plan, structures, tmp_path / "widths.png", title="decoder")
    with Image.open(path) as img:
        assert img.width > 300 and img.height > 300
