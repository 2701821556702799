"""Deployment and trust: ONNX export of every family, kill-and-resume, non-finite steps."""

import json

import pytest
import torch

import upop
from families import FAMILIES
from helpers import run_search
from upop import cli
from upop.export import check_onnx, export_onnx, sample_inputs
from upop.search import NonFiniteError

pytest.importorskip("onnxruntime")

# Families whose forward is a plain function of the sample inputs (generation heads need labels).
EXPORTABLE = [f for f in FAMILIES if f.name not in ("blip_vqa", "blip_caption", "bert_cross", "blip_text")]


@pytest.mark.parametrize("fam", EXPORTABLE, ids=lambda f: f.name)
def test_compressed_model_exports_to_onnx(fam, tmp_path):
    model, *_, search = run_search(fam, upop.UPopConfig(target=0.5, total_steps=6, interval=2))
    search.compress()
    inputs = sample_inputs(model, batch=2)
    path = export_onnx(model, tmp_path / "m.onnx", inputs)
    result = check_onnx(model, path, inputs, repeats=1)
    assert result["max_abs_diff"] <= 1e-4
    assert result["onnxruntime_ms"] > 0 and result["torch_ms"] > 0


def test_export_cli_with_dynamic_batch(tmp_path, capsys):
    fam = next(f for f in FAMILIES if f.name == "clip")
    model, *_, search = run_search(fam, upop.UPopConfig(target=0.5, total_steps=4, interval=2))
    search.compress()
    upop.save_pretrained(model, tmp_path / "m")
    assert cli.main(["export", "--model", str(tmp_path / "m"), "--dynamic-batch"]) == 0
    out = capsys.readouterr().out
    # written next to the model folder, never inside it
    assert "max |onnx - torch|" in out and (tmp_path / "m.onnx").is_file()
    assert not (tmp_path / "m" / "model.onnx").exists()
    assert cli.main(["export", "--model", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err


def test_nan_steps_are_skipped_then_abort():
    fam = next(f for f in FAMILIES if f.name == "vit")
    torch.manual_seed(0)
    model = fam.build().eval()
    inputs = fam.inputs(torch.Generator().manual_seed(0))
    search = upop.UPopSearch(model, upop.UPopConfig(total_steps=20, interval=5, max_skipped_fraction=0.1))
    for step in range(20):
        loss = fam.probe(model(**inputs)).pow(2).mean()
        if step in (3, 7):
            loss = loss * float("nan")  # injected
        loss.backward()
        with pytest.warns(UserWarning, match="non-finite") if step in (3, 7) else _nothing():
            search.step()
    assert search.skipped_steps == 2 and search.finished
    assert all(torch.isfinite(s).all() for s in search.scores.values())
    search = upop.UPopSearch(fam.build(), upop.UPopConfig(total_steps=20, interval=5, max_skipped_fraction=0.1))
    with pytest.raises(NonFiniteError, match="non-finite"), pytest.warns(UserWarning):
        for _ in range(4):
            search.step(skip=True)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_corrupted_progress_is_a_clear_error(tmp_path):
    from upop.pipeline import RunState
    from upop.runconfig import ConfigError

    state = RunState(tmp_path / "state", "abc")
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "progress.json").write_text("{half")
    with pytest.raises(ConfigError, match="corrupted"):
        state.progress()
    (tmp_path / "state" / "progress.json").write_text(json.dumps({"config_hash": "abc", "checkpoint": "x"}))
    with pytest.raises(ConfigError, match="missing"):
        state.progress()
    (tmp_path / "state" / "progress.json").write_text(json.dumps({"config_hash": "other"}))
    with pytest.raises(ConfigError, match="another configuration"):
        state.progress()
