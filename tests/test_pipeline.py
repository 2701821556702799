"""compress -> evaluate end to end on tiny presets, from Karpathy-JSON and ImageFolder fixtures;
resume after an interruption; two processes (gloo) agreeing on the plan."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image, ImageDraw

from upop import cli, pipeline, state
from upop.runconfig import load_run_config

COLORS = ["red", "green", "blue", "orange", "purple", "black"]
SHAPES = ["circle", "square"]


def _draw(path: Path, color: str, shape: str) -> None:
    image = Image.new("RGB", (40, 40), "white")
    draw = ImageDraw.Draw(image)
    box = (8, 8, 32, 32)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=color)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


@pytest.fixture(scope="module")
def karpathy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("karpathy")
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    train, evals = [], {"val": [], "test": []}
    for i, (color, shape) in enumerate(pairs * 2):
        rel = f"images/{i:03d}.png"
        _draw(root / rel, color, shape)
        captions = [f"a {color} {shape}", f"{shape} in {color}"]
        if i < len(pairs):
            train += [{"image": rel, "caption": c, "image_id": str(i)} for c in captions]
        else:
            evals["val" if i % 2 else "test"].append({"image": rel, "caption": captions})
    (root / "train.json").write_text(json.dumps(train))
    for split, entries in evals.items():
        (root / f"{split}.json").write_text(json.dumps(entries))
    return root


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    for split, n in (("train", 12), ("test", 4)):
        for color in COLORS[:3]:
            for i in range(n):
                _draw(root / split / color / f"{i}.png", color, SHAPES[i % 2])
    return root


def _write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _retrieval_config(root: Path, out: Path, **train) -> dict:
    return {
        "task": "retrieval", "output_dir": str(out), "model": {"preset": "tiny-dual"},
        "data": {"format": "karpathy", "root": str(root), "train": str(root / "train.json"),
                 "val": str(root / "val.json"), "test": str(root / "test.json"), "image_size": 32,
                 "max_tokens": 8},
        "upop": {"target": 0.5, "interval": 2},
        "train": {"batch_size": 6, "eval_batch_size": 16, "dense_epochs": 1, "search_epochs": 2,
                  "retrain_epochs": 1, "max_steps_per_epoch": 2, **train},
        "eval": {"latency_batches": [1, 2], "latency_repeats": 1},
    }


def test_retrieval_compress_then_evaluate(karpathy, tmp_path, capsys):
    out = tmp_path / "run"
    config = _write(tmp_path, _retrieval_config(karpathy, out))
    assert cli.main(["compress", "--config", str(config)]) == 0
    for name in ("metrics.json", "report.md", "kept_widths.png", "plan.json", "model/model.safetensors"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["compressed"]["params"] < metrics["dense"]["params"]
    assert metrics["compressed"]["flops"] < metrics["dense"]["flops"]
    assert abs(metrics["achieved"] - 0.5) <= 0.02
    for key in ("txt_r1", "img_r10", "r_mean"):
        assert 0 <= metrics["compressed"]["metrics"][key] <= 100
    assert set(metrics["compressed"]["latency_ms"]) == {"batch1", "batch2"}
    assert cli.main(["evaluate", "--model", str(out / "model"), "--config", str(config)]) == 0
    assert "r_mean" in capsys.readouterr().out


def test_classification_from_imagefolder(imagefolder, tmp_path):
    out = tmp_path / "run"
    config = _write(tmp_path, {
        "task": "classification", "output_dir": str(out), "model": {"preset": "tiny-vit"},
        "data": {"format": "imagefolder", "train": str(imagefolder / "train"), "test": str(imagefolder / "test"),
                 "image_size": 32},
        "upop": {"target": 0.5, "interval": 2, "granularity": "head"},
        "train": {"batch_size": 8, "dense_epochs": 1, "search_epochs": 1, "retrain_epochs": 1},
        "eval": {"skip_latency": True},
    })
    assert cli.main(["compress", "--config", str(config)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "classification" and 0 <= metrics["compressed"]["metrics"]["top1"] <= 100
    assert metrics["compressed"]["params"] < metrics["dense"]["params"]


def run_killed_in_epoch(config: Path, n: int) -> None:
    """run_compress of `config`, killed (KeyboardInterrupt) inside its n-th training epoch (1 = the first)."""
    real_epoch, calls = pipeline.Trainer.epoch, {"n": 0}

    def crashing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real_epoch(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline.Trainer, "epoch", crashing)
        with pytest.raises(KeyboardInterrupt):
            pipeline.run_compress(load_run_config(config))


@pytest.fixture(scope="module")
def reference_plan(karpathy, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    pipeline.run_compress(load_run_config(_write(tmp, _retrieval_config(karpathy, tmp / "run"))))
    return json.loads((tmp / "run" / "plan.json").read_text())["structures"]


# Trainer.epoch calls: 1 = dense epoch 1, 2-3 = search epochs 1-2, 4 = retrain epoch 1.
@pytest.mark.parametrize("crash_at, phase, epoch", [(1, "dense", 0), (3, "search", 1), (4, "retrain", 0)])
def test_kill_and_resume_gives_the_same_plan(karpathy, tmp_path, reference_plan, crash_at, phase, epoch):
    out = tmp_path / "interrupted"
    config = _write(tmp_path, _retrieval_config(karpathy, out))
    run_killed_in_epoch(config, crash_at)
    assert not (out / "metrics.json").exists()
    if crash_at > 1:
        progress = json.loads((out / "state" / "progress.json").read_text())
        assert (progress["phase"], progress["epoch"]) == (phase, epoch)
    pipeline.run_compress(load_run_config(config))  # the same command again
    assert json.loads((out / "plan.json").read_text())["structures"] == reference_plan
    assert (out / "metrics.json").is_file()


def test_killed_while_saving_resumes_from_the_previous_checkpoint(karpathy, tmp_path, monkeypatch, reference_plan):
    out = tmp_path / "run"
    config = _write(tmp_path, _retrieval_config(karpathy, out))
    real_save = state.save_model
    calls = {"n": 0}

    def dying_save(model, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # dense 1, the dense model, end of dense, search 1, then die writing search 2
            with open(path, "wb") as f:
                f.write(b"half a file")
            raise KeyboardInterrupt
        return real_save(model, path, *args, **kwargs)

    monkeypatch.setattr(state, "save_model", dying_save)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_compress(load_run_config(config))
    progress = json.loads((out / "state" / "progress.json").read_text())
    assert (progress["phase"], progress["epoch"]) == ("search", 1)  # the half-written one is not taken
    monkeypatch.setattr(state, "save_model", real_save)
    pipeline.run_compress(load_run_config(config))
    assert json.loads((out / "plan.json").read_text())["structures"] == reference_plan


def test_nan_losses_are_skipped_and_counted(karpathy, tmp_path, monkeypatch):
    from upop.tasks.retrieval import RetrievalTask

    real_loss = RetrievalTask.loss
    calls = {"n": 0}

    def sometimes_nan(self, model, batch):
        calls["n"] += 1
        loss = real_loss(self, model, batch)
        return loss * float("nan") if calls["n"] in (2, 4) else loss

    monkeypatch.setattr(RetrievalTask, "loss", sometimes_nan)
    out = tmp_path / "run"
    config = _retrieval_config(karpathy, out, search_epochs=4)
    config["upop"]["max_skipped_fraction"] = 0.5
    pipeline.run_compress(load_run_config(_write(tmp_path, config)))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["compressed"]["params"] < metrics["dense"]["params"]
    text = (out / "log.txt").read_text()
    assert "non-finite loss or gradient, step skipped" in text


def test_two_processes_agree(karpathy, tmp_path):
    out = tmp_path / "ddp"
    config = _write(tmp_path, _retrieval_config(karpathy, out, batch_size=3, dense_epochs=0))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    with socket.socket() as sock:  # torchrun's port 0 does not pick a free port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "upop.cli", "compress", "--config", str(config), "eval.skip_latency=true"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    plans = [json.loads((out / f"plan.rank{r}.json").read_text())["structures"] for r in (0, 1)]
    assert plans[0] == plans[1]
    assert (out / "metrics.json").is_file()


def test_bad_inputs_stop_with_one_line(karpathy, tmp_path, capsys):
    base = _retrieval_config(karpathy, tmp_path / "x")
    cases = [
        ({**base, "data": {**base["data"], "train": str(tmp_path / "missing.json")}}, "missing.json"),
        ({**base, "upop": {"target": 1.5}}, "target must be in (0, 1)"),
        ({**base, "train": {**base["train"], "epochs": 3}}, "config key 'train.epochs' does not exist"),
        ({**base, "model": {"name": str(tmp_path / "no-model")}}, "no such local folder"),
    ]
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[{"image": "images/000.png"}]')
    cases.append(({**base, "data": {**base["data"], "train": str(bad_json)}}, "bad.json"))
    for config, message in cases:
        path = _write(tmp_path, config)
        assert cli.main(["compress", "--config", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x" / "metrics.json").exists()
    assert cli.main(["compress", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_shipped_configs_are_valid():
    from importlib import resources

    root = Path(__file__).parents[1]
    paths = sorted((root / "examples").glob("*.yaml"))
    paper = sorted((root / "examples" / "paper").glob("*.yaml"))  # the paper's settings, for real data
    assert {p.stem for p in paper} >= {"coco_blip_retrieval", "coco_caption", "vqav2", "nlvr2", "ade20k_segmenter"}
    with resources.as_file(resources.files("upop.configs") / "demo.yaml") as demo:
        paths.append(Path(demo))
        for path in paths:
            cfg = load_run_config(path)
            assert cfg.upop.get("target", 0.5) == 0.5, path  # the runnable demos are all 2x
        for path in paper:
            cfg = load_run_config(path)
            assert cfg.model.name and cfg.data.format != "openmoji", path


def test_gradient_accumulation_and_bf16(karpathy, tmp_path):
    out = tmp_path / "run"
    config = _retrieval_config(karpathy, out, batch_size=3, grad_accum=2, mixed_precision="bf16", dense_epochs=0)
    config["eval"] = {"skip_latency": True}
    pipeline.run_compress(load_run_config(_write(tmp_path, config)))
    metrics = json.loads((out / "metrics.json").read_text())
    assert abs(metrics["achieved"] - 0.5) <= 0.02
    assert metrics["compressed"]["params"] < metrics["dense"]["params"]


def test_broken_training_image_skip_or_stop(karpathy, tmp_path, capsys):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(karpathy, root)
    broken = root / "images" / "001.png"
    broken.write_bytes(b"not a png at all")
    config = _retrieval_config(root, tmp_path / "stop", dense_epochs=0, max_steps_per_epoch=None)
    for split in ("train", "val", "test"):
        config["data"][split] = str(root / f"{split}.json")
    config["data"]["root"] = str(root)
    config["eval"] = {"skip_latency": True}
    assert cli.main(["compress", "--config", str(_write(tmp_path, config))]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "upop: error" in line]
    assert len(errors) == 1 and str(broken) in errors[0] and "cannot decode" in errors[0]
    config["output_dir"] = str(tmp_path / "skip")
    config["data"]["on_bad_input"] = "skip"
    assert cli.main(["compress", "--config", str(_write(tmp_path, config))]) == 0
    assert (tmp_path / "skip" / "metrics.json").is_file()
