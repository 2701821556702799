"""`upop export`: never inside the model folder nor onto a directory, numbers checked before any
work, the model's own input/output names, and a torch.export program that loads without upop."""

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import upop
from families import FAMILY_BY_NAME
from upop import cli
from upop.export import sample_inputs

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("export") / "m"
    upop.save_pretrained(FAMILY_BY_NAME["clip"].build().eval(), folder)
    return folder


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]


def test_export_refuses_the_model_folder_and_directories(clip_folder, tmp_path, capsys):
    before = _digest(clip_folder)
    for output in (clip_folder / "model.safetensors", clip_folder / "sub" / "x.onnx"):
        assert cli.main(["export", "--model", str(clip_folder), "--output", str(output)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "inside the model folder" in err
    assert cli.main(["export", "--model", str(clip_folder), "--output", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert _digest(clip_folder) == before and not _leftovers(clip_folder.parent) and not _leftovers(tmp_path)


@pytest.mark.parametrize("args, message", [
    (["--batch", "0"], "--batch must be >= 1"),
    (["--batch", "5000"], "--batch must be <="),
    (["--tolerance", "nan"], "--tolerance must be a finite number > 0"),
    (["--tolerance", "inf"], "--tolerance must be a finite number > 0"),
    (["--tolerance", "-1"], "--tolerance must be a finite number > 0"),
    (["--opset", "7"], "--opset must be in [18,"),
    (["--opset", "18", "--format", "torch"], "--opset applies to --format onnx only"),
])
def test_export_checks_its_numbers_before_loading_the_model(tmp_path, capsys, args, message):
    # the model folder does not exist: the argument is refused before anything is read
    assert cli.main(["export", "--model", str(tmp_path / "missing"), *args]) == 2
    assert capsys.readouterr().err.startswith(f"upop: error: {message}")


def test_onnx_carries_the_model_names_next_to_the_folder(clip_folder, capsys):
    import onnxruntime

    assert cli.main(["export", "--model", str(clip_folder)]) == 0
    path = clip_folder.with_name("m.onnx")  # the default: next to the folder, not inside it
    assert path.is_file() and not (clip_folder / "model.onnx").exists()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixel_values", "input_ids", "attention_mask"]
    outputs = [o.name for o in session.get_outputs()]
    assert outputs[:4] == ["logits_per_image", "logits_per_text", "text_embeds", "image_embeds"]
    assert "vision_model_output.pooler_output" in outputs
    assert "logits_per_image" in capsys.readouterr().out
    assert not _leftovers(clip_folder.parent)


def test_torch_export_loads_without_upop(clip_folder, tmp_path, capsys):
    output = tmp_path / "clip.pt2"
    assert cli.main(["export", "--model", str(clip_folder), "--format", "torch", "--dynamic-batch",
                     "--output", str(output)]) == 0
    assert "max |exported - torch|" in capsys.readouterr().out and not _leftovers(tmp_path)
    model = upop.from_pretrained(clip_folder)
    inputs = sample_inputs(model, batch=3, seed=5)  # another batch size than the export's
    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    site = str(Path(torch.__file__).resolve().parents[1])
    # -I -S: no PYTHONPATH, no user site, no .pth files (the editable install of upop is one)
    code = f"""
import sys
sys.path.append({site!r})
try:
    import upop
    raise SystemExit("upop is importable")
except ImportError:
    pass
import torch
from safetensors.torch import load_file, save_file
program = torch.export.load({str(output)!r}).module()
outputs = program(**load_file({str(tmp_path / 'inputs.safetensors')!r}))
assert "transformers" not in sys.modules and "upop" not in sys.modules
save_file({{k: v.contiguous() for k, v in outputs.items()}}, {str(tmp_path / 'outputs.safetensors')!r})
"""
    run = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    got = load_file(str(tmp_path / "outputs.safetensors"))
    with torch.no_grad():
        expected = model(**inputs)
    assert set(got) >= {"logits_per_image", "text_embeds", "image_embeds"}
    for name in ("logits_per_image", "text_embeds", "image_embeds"):
        assert torch.allclose(got[name], expected[name], atol=1e-5), name
    assert got["logits_per_image"].shape == (3, 3)


def test_export_that_differs_from_pytorch_is_exit_1(clip_folder, tmp_path, monkeypatch, capsys):
    from upop import export

    real = export.check_torch

    def off_by_one(*args, **kwargs):
        return {**real(*args, **kwargs), "max_abs_diff": 1.0}

    monkeypatch.setattr(export, "check_torch", off_by_one)
    assert cli.main(["export", "--model", str(clip_folder), "--format", "torch",
                     "--output", str(tmp_path / "x.pt2")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exported outputs differ from PyTorch by 1.00e+00" in err
