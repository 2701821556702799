"""Experiment tracking (upop.tracking): what each backend writes, read back with its own reader;
offline only. A backend whose package is not installed is tested for its one-line install error."""

import importlib.util
import logging
import math

import pytest

from upop import tracking
from upop.tracking import LogConfig, Tracker, TrackingError, make_tracker, read_jsonl, tracker_from_config

CONFIG = {"task": "caption", "train": {"lr": 1e-4, "batch_size": 8}, "eval": {"latency_batches": [1, 32]}}
SUMMARY = {"compressed": {"metric": 41.5, "params": 1.2e7, "latency_ms": {1: 3.5, 32: 40.0}, "name": "x"},
           "achieved": 0.5}


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.fixture
def warnings_seen():
    """The records of the "upop" logger (attached directly: the run's setup_logging turns propagation off)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("upop")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def log_a_run(tracker: Tracker) -> None:
    tracker.log_scalars({"loss": 0.75, "lr": 1e-4, "ratio": 1.0}, 0, prefix="search")
    tracker.log_scalars({"loss": float("nan"), "lr": 1e-4, "ratio": 0.8, "phase": "search"}, 10, prefix="search")
    tracker.log_scalars({"test": {"CIDEr": 12.5}}, 12, prefix="searched")
    tracker.log_summary(SUMMARY)


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_jsonl_writes_every_event_and_reads_back(tmp_path):
    with make_tracker(["jsonl"], tmp_path, "run", CONFIG) as tracker:
        log_a_run(tracker)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["event"] for r in records] == ["config", "scalars", "scalars", "scalars", "summary", "end"]
    assert records[0]["config"] == CONFIG
    assert records[1]["step"] == 0 and records[1]["values"] == {"search/loss": 0.75, "search/lr": 1e-4,
                                                                "search/ratio": 1.0}
    # NaN is logged as it is; a string value is no scalar and is left out
    assert records[2]["step"] == 10 and math.isnan(records[2]["values"]["search/loss"])
    assert "search/phase" not in records[2]["values"]
    assert records[3]["values"] == {"searched/test/CIDEr": 12.5}
    summary = records[4]
    assert summary["step"] == 12  # the last step logged
    assert summary["values"] == {"compressed/metric": 41.5, "compressed/params": 1.2e7,
                                 "compressed/latency_ms/1": 3.5, "compressed/latency_ms/32": 40.0, "achieved": 0.5}
    assert records[5]["failed"] is False


def test_jsonl_appends_after_a_torn_line_and_marks_a_failed_run(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "scalars", "step": 0, "values": {"loss": 1.0}}\n{"event": "scal')  # a killed run
    with pytest.raises(RuntimeError), make_tracker(["jsonl"], tmp_path, "run") as tracker:
        tracker.log_scalars({"loss": 0.5}, 20)
        raise RuntimeError("the run broke")
    records = read_jsonl(path)
    assert [(r["event"], r.get("step")) for r in records] == [("scalars", 0), ("scalars", 20), ("end", None)]
    assert records[-1]["failed"] is True


def test_tensorboard_scalars_read_back(tmp_path):
    if not installed("tensorboard"):
        with pytest.raises(TrackingError) as exc:
            make_tracker(["tensorboard"], tmp_path, "run")
        assert "pip install tensorboard" in one_line(exc)
        return
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with make_tracker(["tensorboard"], tmp_path, "run", CONFIG) as tracker:
        log_a_run(tracker)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == {"search/loss", "search/lr", "search/ratio", "searched/test/CIDEr",
                                             "compressed/metric", "compressed/params", "compressed/latency_ms/1",
                                             "compressed/latency_ms/32", "achieved"}
    loss = events.Scalars("search/loss")
    assert [e.step for e in loss] == [0, 10]
    assert loss[0].value == pytest.approx(0.75) and math.isnan(loss[1].value)
    assert [(e.step, e.value) for e in events.Scalars("compressed/metric")] == [(12, pytest.approx(41.5))]
    assert events.Scalars("compressed/latency_ms/32")[0].value == pytest.approx(40.0)
    assert "config/text_summary" in events.Tags()["tensors"]


def test_mlflow_file_store_reads_back(tmp_path, monkeypatch):
    if not installed("mlflow"):
        with pytest.raises(TrackingError) as exc:
            make_tracker(["mlflow"], tmp_path, "run")
        assert "pip install mlflow" in one_line(exc)
        return
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")  # the backend sets it; undone after the test
    from mlflow.tracking import MlflowClient

    with make_tracker(["mlflow"], tmp_path, "run", CONFIG, project="tests") as tracker:
        log_a_run(tracker)
    run_id = (tmp_path / "mlflow_run_id").read_text().strip()
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert client.get_experiment(run.info.experiment_id).name == "tests"
    assert run.data.params["train.lr"] == "0.0001" and run.data.params["eval.latency_batches"] == "[1, 32]"
    history = client.get_metric_history(run_id, "search/loss")
    assert [m.step for m in history] == [0, 10]
    assert history[0].value == pytest.approx(0.75) and math.isnan(history[1].value)
    assert run.data.metrics["compressed/latency_ms/1"] == pytest.approx(3.5)
    assert run.data.metrics["searched/test/CIDEr"] == pytest.approx(12.5)

    # a resumed run continues the same MLflow run; one that breaks is marked FAILED
    with pytest.raises(RuntimeError), make_tracker(["mlflow"], tmp_path, "run", CONFIG, project="tests") as tracker:
        tracker.log_scalars({"loss": 0.5}, 20, prefix="retrain")
        raise RuntimeError("the run broke")
    assert (tmp_path / "mlflow_run_id").read_text().strip() == run_id
    assert client.get_run(run_id).info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run_id, "retrain/loss")] == [20]


def test_wandb_offline_or_install_error(tmp_path, monkeypatch):
    if not installed("wandb"):
        with pytest.raises(TrackingError) as exc:
            tracking.check_log_config(LogConfig(report_to=["jsonl", "wandb"]))
        assert one_line(exc) == ("log.report_to: backend 'wandb' needs the 'wandb' package, which is not "
                                 "installed: pip install wandb")
        with pytest.raises(TrackingError, match="pip install wandb"):
            make_tracker(["wandb"], tmp_path, "run")
        assert not any(tmp_path.iterdir())
        return
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the backend's default: offline
    monkeypatch.setenv("WANDB_SILENT", "true")
    with make_tracker(["wandb"], tmp_path, "run", CONFIG, project="tests") as tracker:
        log_a_run(tracker)
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    runs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert runs and list(runs[0].glob("*.wandb"))


def test_missing_package_is_one_line_naming_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(tracking, "_installed", lambda module: module != "tensorboard")
    with pytest.raises(TrackingError) as exc:
        tracking.check_log_config(LogConfig(report_to=["tensorboard"]))
    assert one_line(exc) == ("log.report_to: backend 'tensorboard' needs the 'tensorboard' package, which is "
                             "not installed: pip install tensorboard")
    with pytest.raises(TrackingError, match="pip install tensorboard"):
        make_tracker(["jsonl", "tensorboard"], tmp_path, "run")
    assert not any(tmp_path.iterdir())  # refused before anything was started


def test_config_checks_are_one_line():
    with pytest.raises(TrackingError) as exc:
        tracking.check_log_config(LogConfig(report_to=["jsonl", "tensorbord"]))
    assert one_line(exc) == ("unknown log.report_to backend 'tensorbord'; known: jsonl, tensorboard, wandb, "
                             "mlflow")
    with pytest.raises(TrackingError, match="'log.every_n_steps' must be an integer of at least 1"):
        tracking.check_log_config(LogConfig(every_n_steps=0))
    with pytest.raises(TrackingError, match="'log.report_to' must be a list"):
        tracking.check_log_config(LogConfig(report_to="jsonl"))
    with pytest.raises(TrackingError, match="'log.run_name' must be a plain name"):
        tracking.check_log_config(LogConfig(run_name="../elsewhere"))
    tracking.check_log_config(LogConfig(report_to=[]))  # logging off
    assert tracking.check_backends(["jsonl", "jsonl"]) == ["jsonl"]


def test_only_the_main_process_logs(tmp_path):
    report_to = ["jsonl", "tensorboard"] if installed("tensorboard") else ["jsonl"]
    with make_tracker(report_to, tmp_path / "run", "run", CONFIG, main=False) as tracker:
        log_a_run(tracker)
        assert tracker.names == [] and not tracker.due(0)
    assert not (tmp_path / "run").exists()


def test_every_n_steps_and_shared_log_dir(tmp_path):
    out = tmp_path / "runs" / "caption-2x"
    cfg = LogConfig(report_to=["jsonl"], every_n_steps=5)
    with tracker_from_config(cfg, out, CONFIG) as tracker:
        assert [s for s in range(12) if tracker.due(s)] == [0, 5, 10]
    assert (out / "metrics.jsonl").is_file()
    # a folder shared by several runs: each logs to <dir>/<run_name>
    shared = LogConfig(report_to=["jsonl"], dir=str(tmp_path / "tb"), run_name="trial-3")
    with tracker_from_config(shared, out, CONFIG):
        pass
    assert (tmp_path / "tb" / "trial-3" / "metrics.jsonl").is_file()


def test_a_failing_backend_is_dropped_with_one_warning_and_the_others_go_on(tmp_path, monkeypatch, warnings_seen):
    calls = []

    def broken(self, values, step):
        calls.append(step)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tracking.JsonlBackend, "log_scalars", broken)
    other = "tensorboard" if installed("tensorboard") else None
    with make_tracker(["jsonl"] + ([other] if other else []), tmp_path, "run", CONFIG) as tracker:
        for step in range(3):
            tracker.log_scalars({"loss": 1.0 / (step + 1)}, step, prefix="retrain")
        assert tracker.names == ([other] if other else [])
    assert calls == [0]  # called once, then off
    assert len(warnings_seen) == 1
    message = warnings_seen[0].getMessage()
    assert "jsonl backend failed in log_scalars" in message and "No space left" in message
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert records[-1] == {**records[-1], "event": "end", "failed": True}  # closed as failed when dropped
    if other:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(tmp_path / "tensorboard"))
        events.Reload()
        assert [e.step for e in events.Scalars("retrain/loss")] == [0, 1, 2]


def test_a_backend_that_cannot_start_stops_the_run_in_one_line(tmp_path, monkeypatch):
    def cannot(self, run_dir, run_name, project):
        raise PermissionError(13, "Permission denied", str(run_dir))

    monkeypatch.setattr(tracking.JsonlBackend, "__init__", cannot)
    with pytest.raises(TrackingError) as exc:
        make_tracker(["jsonl"], tmp_path, "run")
    assert one_line(exc).startswith("log.report_to: backend 'jsonl' could not start in ")
    assert "PermissionError" in str(exc.value)
