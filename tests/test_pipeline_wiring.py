"""The run pipeline wired to its building blocks: experiment tracking (the `log:` section) sees
every training step and every evaluation, on a step axis that a resumed run continues; a latency
budget is cut on tables measured before the masks exist and reported against the compressed
model's measured latency."""

from __future__ import annotations

import json

import pytest

from test_pipeline import _retrieval_config, _write, karpathy, run_killed_in_epoch  # noqa: F401  (karpathy: a fixture)
from upop import cli, pipeline, tracking
from upop.runconfig import load_run_config
from upop.tracking import read_jsonl

STEPS = 2  # max_steps_per_epoch of _retrieval_config: dense 1 epoch, search 2, retrain 1 -> 8 steps


def _config(karpathy, out, **log) -> dict:  # noqa: F811
    config = _retrieval_config(karpathy, out)
    config["eval"] = {"skip_latency": True}
    config["log"] = {"every_n_steps": 1, **log}
    return config


def test_tensorboard_sees_steps_and_evaluations(karpathy, tmp_path):  # noqa: F811
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    metrics = pipeline.run_compress(load_run_config(_write(tmp_path, _config(karpathy, out,
                                                                             report_to=["tensorboard"]))))
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()

    def steps(tag: str) -> list[int]:
        return [e.step for e in events.Scalars(tag)]

    def values(tag: str) -> list[float]:
        return [e.value for e in events.Scalars(tag)]

    # one run-wide step axis: dense 0-1, search 2-5, retrain 6-7
    assert steps("dense/loss") == [0, 1] and steps("search/loss") == [2, 3, 4, 5] and steps("retrain/loss") == [6, 7]
    assert steps("search/ratio") == [2, 3, 4, 5] and "dense/ratio" not in events.Tags()["scalars"]
    ratios = values("search/ratio")
    assert ratios == sorted(ratios) and ratios[-1] == pytest.approx(0.5)  # the progressive schedule reaches p
    assert values("search/lr") == pytest.approx([1e-4] * 4)  # constant while searching (the paper)
    assert values("retrain/epoch") == pytest.approx([0.5, 1.0])
    # evaluations: the dense and searched measurements, each retraining epoch's validation, the summary
    assert steps("val/r_mean") == [8] and {"val/txt_r1", "val/img_r10"} <= set(events.Tags()["scalars"])
    # the dense measurement where the search starts, the searched one where the retraining starts; both again
    # in the summary, at the last step
    assert steps("dense/metric") == [2, 8] and values("dense/metric") == pytest.approx([metrics["dense"]["metric"]] * 2)
    assert steps("searched/metric") == [6, 8]
    assert values("searched/metric") == pytest.approx([metrics["searched"]["metric"]] * 2)
    assert values("compressed/metric") == pytest.approx([metrics["compressed"]["metric"]])
    assert values("achieved") == pytest.approx([metrics["achieved"]])
    assert not (out / "metrics.jsonl").exists()  # only the backends asked for


def test_a_resumed_run_continues_the_same_step_axis(karpathy, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    config = _write(tmp_path, _config(karpathy, out, report_to=["jsonl"]))
    run_killed_in_epoch(config, 3)  # in the second search epoch
    pipeline.run_compress(load_run_config(config))
    records = read_jsonl(out / "metrics.jsonl")
    assert [r["event"] for r in records if r["event"] in ("config", "end")] == ["config", "end", "config", "end"]
    assert [r.get("failed") for r in records if r["event"] == "end"] == [True, False]
    logged = [r["step"] for r in records if r["event"] == "scalars" and any(k.endswith("/loss") for k in r["values"])]
    assert logged == list(range(4 * STEPS))  # each step once, in order, across the two processes


def test_a_backend_that_cannot_start_stops_before_the_data_is_read(karpathy, tmp_path, monkeypatch, capsys):  # noqa: F811
    def broken(run_dir, run_name, project):
        raise RuntimeError("no server")

    monkeypatch.setitem(tracking.BACKENDS._entries, "jsonl", tracking.BackendEntry(broken))
    monkeypatch.setattr(pipeline, "make_task", lambda cfg: pytest.fail("the data must not be read"))
    config = _write(tmp_path, _config(karpathy, tmp_path / "run", report_to=["jsonl"]))
    assert cli.main(["compress", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "backend 'jsonl' could not start" in err[0] and "no server" in err[0], err


def test_latency_budget_end_to_end(karpathy, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("UPOP_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    config = _config(karpathy, out)
    config["upop"] = {"target": 0.3, "interval": 2, "budget": "latency"}
    metrics = pipeline.run_compress(load_run_config(_write(tmp_path, config)))
    entry = json.loads((out / "metrics.json").read_text())["latency_budget"]
    assert entry == pytest.approx(metrics["latency_budget"])
    assert entry["target"] == 0.3 and entry["runtime"] == "torch" and entry["batch"] == 1
    assert entry["predicted_ms"] > 0 and entry["measured_ms"] > 0 and entry["model_ms"] > 0
    assert entry["prediction_error"] == pytest.approx(entry["measured_ms"] / entry["predicted_ms"] - 1)
    assert entry["measured_speedup"] == pytest.approx(entry["model_ms"] / entry["measured_ms"])
    # the target is of the measured latency, per-call overhead included, so the search cut more than
    # 0.3 of the width-dependent cost (exactness on synthetic tables: tests/test_latency.py)
    assert entry["removed_linear"] > 0.3 and entry["width_dependent"] < 1
    assert entry["predicted_speedup"] > 0 and entry["measured_iqr_ms"] >= 0
    # the tables the search cut on are kept with the run (a resumed search cuts on the same numbers)
    kept = json.loads((out / "state" / "latency.json").read_text())
    assert kept["format"] == "upop-latency" and kept["model_ms"] == pytest.approx(entry["model_ms"])
    assert json.loads((out / "plan.json").read_text())["stats"]["budget"] == "latency"
    assert "## Latency budget" in (out / "report.md").read_text()
