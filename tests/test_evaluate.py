"""`upop evaluate`: dense Hugging Face and upop folders, results next to the model (never in the
config's run folder), a readable table, and a model that does not fit the task refused first."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

import upop
from upop import cli
from upop.runconfig import load_run_config

COLORS = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    for split, n in (("train", 4), ("test", 3)):
        for color in COLORS:
            for i in range(n):
                path = root / split / color / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (32, 32), color).save(path)
    return root


def _config(tmp_path: Path, root: Path, **model) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "task": "classification", "output_dir": str(tmp_path / "some_run"),
        "model": {"preset": "tiny-vit", **model},
        "data": {"format": "imagefolder", "train": str(root / "train"), "test": str(root / "test"),
                 "image_size": 32},
        "eval": {"latency_batches": [1], "latency_repeats": 1},
    }))
    return path


def _classifier(config: Path, num_labels: int | None = None) -> torch.nn.Module:
    from upop.tasks import make_task

    cfg = load_run_config(config, [f"model.num_labels={num_labels}"] if num_labels else [])
    model = make_task(cfg).model
    if num_labels:  # the task takes the classes from the data; build one that predicts others
        import transformers

        model.config.num_labels = num_labels
        model = transformers.ViTForImageClassification(model.config)
    return model.eval()


@pytest.mark.parametrize("kind", ["dense", "upop"])
def test_evaluate_a_dense_or_upop_folder(imagefolder, tmp_path, capsys, kind):
    config = _config(tmp_path, imagefolder)
    model = _classifier(config)
    folder = tmp_path / "model"
    if kind == "dense":
        model.save_pretrained(folder)  # config.json + model.safetensors, no upop files
        assert not (folder / "upop_model.json").exists()
    else:
        upop.save_pretrained(model, folder)
    assert cli.main(["evaluate", "--model", str(folder), "--config", str(config)]) == 0
    captured = capsys.readouterr()
    result = json.loads((folder / "evaluate.json").read_text())
    assert result["kind"] == kind and result["task"] == "classification" and result["metric_name"] == "top1"
    assert 0 <= result["metric"] <= 100 and result["params"] == upop.count_params(model)
    lines = captured.out.splitlines()
    assert lines[0].startswith("model") and any(line.split()[:2] == ["metrics", "top1"] for line in lines)
    assert "{" not in captured.out  # a table, not a raw dict
    assert "loading" in captured.err and "evaluating" in captured.err  # progress on stderr
    assert not (tmp_path / "some_run").exists()  # nothing written into the config's run folder


def test_evaluate_writes_where_asked_and_refuses_what_does_not_fit(imagefolder, tmp_path, capsys):
    config = _config(tmp_path, imagefolder)
    folder = tmp_path / "model"
    upop.save_pretrained(_classifier(config), folder)
    out = tmp_path / "results" / "eval.json"
    assert cli.main(["evaluate", "--model", str(folder), "--config", str(config), "--output", str(out)]) == 0
    assert json.loads(out.read_text())["model"] == str(folder) and not (folder / "evaluate.json").exists()
    capsys.readouterr()

    wrong = tmp_path / "five_classes"
    upop.save_pretrained(_classifier(config, num_labels=5), wrong)
    assert cli.main(["evaluate", "--model", str(wrong), "--config", str(config)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("upop: error:") and "5 classes" in err[-1] and "3" in err[-1]
    assert not (wrong / "evaluate.json").exists()

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    assert cli.main(["evaluate", "--model", str(pickled), "--config", str(config)]) == 2
    assert "no safetensors weights" in capsys.readouterr().err

    assert cli.main(["evaluate", "--model", str(tmp_path / "missing"), "--config", str(config)]) == 2
    assert "model folder not found" in capsys.readouterr().err


def test_evaluate_refuses_a_model_of_another_task(imagefolder, tmp_path, capsys):
    config = _config(tmp_path, imagefolder)
    folder = tmp_path / "dual"
    fam_model = __import__("families").FAMILY_BY_NAME["clip"].build()
    upop.save_pretrained(fam_model, folder)
    assert cli.main(["evaluate", "--model", str(folder), "--config", str(config)]) == 2
    assert "needs an image classifier, got CLIPModel" in capsys.readouterr().err
