"""Captioning (BLIP decoder): Karpathy caption files, prompt-masked LM loss, generation consistent with
training, compressed == masked generation, COCO metrics with and without java, compress -> evaluate."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image, ImageDraw

import upop
from upop import cli
from upop.data import DataError
from upop.evaluate import run_evaluate
from upop.metrics import caption as cm
from upop.runconfig import load_run_config
from upop.tasks import make_task

COLORS = ["red", "green", "blue", "orange", "purple", "black"]
SHAPES = ["circle", "square"]


def _draw(path: Path, color: str, shape: str) -> None:
    image = Image.new("RGB", (32, 32), "white")
    draw = ImageDraw.Draw(image)
    (draw.ellipse if shape == "circle" else draw.rectangle)((6, 6, 26, 26), fill=color)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    """A COCO Karpathy-format caption set: train one entry per caption, val/test one entry per image."""
    root = tmp_path_factory.mktemp("coco")
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    train, evals = [], {"val": [], "test": []}
    for i, (color, shape) in enumerate(pairs * 2):
        split = "train2014" if i < len(pairs) else "val2014"
        rel = f"{split}/COCO_{split}_{i:012d}.png"  # COCO's file names carry the image id
        _draw(root / rel, color, shape)
        captions = [f"A {color} {shape}.", f"the {shape} is {color}"]
        if i < len(pairs):
            train += [{"image": rel, "caption": c, "image_id": f"coco_{i}"} for c in captions]
        else:
            evals["val" if i % 2 else "test"].append({"image": rel, "caption": captions})
    (root / "coco_karpathy_train.json").write_text(json.dumps(train))
    for split, entries in evals.items():
        (root / f"coco_karpathy_{split}.json").write_text(json.dumps(entries))
    return root


def _config(root: Path, out: Path, **overrides) -> dict:
    config = {
        "task": "caption", "output_dir": str(out), "model": {"preset": "tiny-blip-caption"},
        "data": {"format": "karpathy", "root": str(root), "train": str(root / "coco_karpathy_train.json"),
                 "val": str(root / "coco_karpathy_val.json"), "test": str(root / "coco_karpathy_test.json"),
                 "image_size": 32, "max_tokens": 12},
        "upop": {"target": 0.5, "interval": 2},
        "train": {"batch_size": 6, "eval_batch_size": 8, "dense_epochs": 1, "search_epochs": 2,
                  "retrain_epochs": 1, "max_steps_per_epoch": 2, "dense_lr": 1e-3},
        "eval": {"latency_batches": [1, 2], "latency_repeats": 1},
        "caption": {"num_beams": 2, "max_new_tokens": 6, "min_new_tokens": 2},
    }
    for key, value in overrides.items():
        config[key] = {**config[key], **value}
    return config


def _write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def task(coco, tmp_path_factory):
    out = tmp_path_factory.mktemp("task")
    return make_task(load_run_config(_write(out, _config(coco, out / "run"))))


# ---- training inputs ----------------------------------------------------------------------------------
def test_inputs_start_with_dec_and_mask_prompt_and_padding(task):
    tok = task.built.tokenizer
    batch = task.collate([(torch.zeros(3, 32, 32), "a red circle", 0), (torch.zeros(3, 32, 32), "square", 1)])
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert (ids[:, 0] == tok.bos_token_id).all() and tok.convert_ids_to_tokens(tok.bos_token_id) == "[DEC]"
    prompt = tok("a picture of ", add_special_tokens=False)["input_ids"]
    assert task.prompt_length == 1 + len(prompt)
    assert ids[:, 1:task.prompt_length].tolist() == [prompt, prompt]
    assert (labels[:, :task.prompt_length] == -100).all()
    assert (labels[mask == 0] == -100).all() and (mask[1] == 0).any()
    # exactly the caption tokens and [SEP] are learned
    learned = [tok.decode(row[row != -100]) for row in labels]
    assert learned == ["a red circle [SEP]", "square [SEP]"]


def test_loss_is_label_smoothed_lm_loss_on_caption_tokens(task):
    torch.manual_seed(0)
    model = task.model.eval()
    batch = task.collate([(torch.randn(3, 32, 32), c, i) for i, c in enumerate(["a red circle", "blue", "x y z w"])])
    logits = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                   attention_mask=batch["attention_mask"]).logits
    reference = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100,
                                label_smoothing=task.cfg.train.label_smoothing)
    assert torch.allclose(task.loss(model, batch), reference, atol=1e-5)
    assert task.cfg.train.label_smoothing > 0
    plain = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)
    assert not torch.allclose(plain, reference)


def test_generation_sees_the_training_prefix(task):
    """Greedy generation's step scores equal the teacher-forced logits of [DEC] prompt + generated tokens."""
    torch.manual_seed(0)
    model = task.model.eval()
    pixels = torch.randn(2, 3, 32, 32)
    prefix = torch.cat([task.prompt_ids, torch.full((1, 1), task.built.tokenizer.sep_token_id)], 1).repeat(2, 1)
    out = model.generate(pixel_values=pixels, input_ids=prefix, max_new_tokens=4, min_new_tokens=4,
                         do_sample=False, return_dict_in_generate=True, output_logits=True)
    seq = out.sequences
    assert (seq[:, 0] == task.built.tokenizer.bos_token_id).all()
    assert torch.equal(seq[:, 1:task.prompt_length], task.prompt_ids[:, 1:].repeat(2, 1))
    forced = model(pixel_values=pixels, input_ids=seq, attention_mask=torch.ones_like(seq)).logits
    steps = torch.stack(out.logits, 1)  # (batch, new tokens, vocab)
    assert (forced[:, task.prompt_length - 1:-1] - steps).abs().max() <= 1e-4
    captions = task.generate(model, pixels)
    assert len(captions) == 2 and not any(c.startswith("a picture of") for c in captions)


# ---- compressed == masked ------------------------------------------------------------------------------
def test_compressed_generates_what_the_masked_model_generates(task):
    torch.manual_seed(0)
    model = task.build_fresh_model().eval()
    batch = task.collate([(torch.randn(3, 32, 32), c, i) for i, c in
                          enumerate(["a red circle", "the blue square", "green", "a black circle"])])
    kinds = {(s["modality"], s["kind"]) for s in upop.structures(model)}
    assert kinds == {("vision", "attention"), ("vision", "mlp"), ("decoder", "attention"),
                     ("decoder", "cross_attention"), ("decoder", "mlp")}
    config = upop.UPopConfig(target=0.5, total_steps=12, interval=2)
    search = upop.UPopSearch(model, config)
    for _ in range(config.total_steps):
        (task.loss(model, batch) + search.sparsity_loss()).backward()
        search.step()
    assert search.finished
    pixels = batch["pixel_values"]
    sep = task.built.tokenizer.sep_token_id

    def outputs(m):
        with torch.no_grad():
            logits = m(pixel_values=pixels, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            prefix = torch.cat([task.prompt_ids, torch.full((1, 1), sep)], 1).repeat(len(pixels), 1)
            beams = m.generate(pixel_values=pixels, input_ids=prefix, num_beams=3, max_new_tokens=6, min_new_tokens=6)
        return logits, beams

    masked_logits, masked_tokens = outputs(model)
    plan = search.plan()
    pruned = {plan.structures[s["name"]].total - len(plan.structures[s["name"]].kept) > 0 and s["modality"]
              for s in upop.structures(model)}
    assert {"vision", "decoder"} <= pruned, "one search prunes both the image encoder and the text decoder"
    before = upop.count_params(model)
    search.compress()
    assert upop.count_params(model) < before
    got_logits, got_tokens = outputs(model)
    assert (got_logits - masked_logits).abs().max() <= 1e-5
    assert torch.equal(got_tokens, masked_tokens)


# ---- data ---------------------------------------------------------------------------------------------
def test_malformed_caption_files_are_rejected(coco, tmp_path):
    bad = tmp_path / "train.json"
    entries = json.loads((coco / "coco_karpathy_train.json").read_text())
    entries[3]["caption"] = ["a list", "in a train file"]
    bad.write_text(json.dumps(entries))
    config = _config(coco, tmp_path / "run", data={"train": str(bad)})
    with pytest.raises(DataError) as err:
        make_task(load_run_config(_write(tmp_path, config)))
    message = str(err.value)
    assert "\n" not in message and str(bad) in message and "entry 3" in message

    missing = tmp_path / "test.json"
    entries = json.loads((coco / "coco_karpathy_test.json").read_text())
    entries[1]["image"] = "val2014/nowhere.png"
    missing.write_text(json.dumps(entries))
    config = _config(coco, tmp_path / "run", data={"test": str(missing)})
    with pytest.raises(DataError, match="image file not found"):
        make_task(load_run_config(_write(tmp_path, config)))

    config = _config(coco, tmp_path / "run", data={"format": "imagefolder"})
    with pytest.raises(DataError, match="openmoji or karpathy"):
        make_task(load_run_config(_write(tmp_path, config)))


# ---- metrics ------------------------------------------------------------------------------------------
REFS = {1: ["A red circle.", "the circle is red"], 2: ["a blue square", "blue square on white"],
        3: ["a green circle", "the circle is green"]}


def test_metrics_rank_better_captions_higher():
    good = cm.caption_scores(REFS, {1: "a red circle", 2: "a blue square", 3: "a green circle"}, spice=False)
    bad = cm.caption_scores(REFS, {1: "a blue square", 2: "a red circle", 3: ""}, spice=False)
    for key in ("Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"):
        assert good[key] > bad[key], key
    assert good["Bleu_1"] == pytest.approx(100.0, abs=1e-6)  # every word matches, no brevity penalty
    # METEOR runs exactly when java does (the PTB tokenizer too)
    assert ("METEOR" in good) == cm.java_available()


def test_metrics_without_java_fall_back_with_one_line_notices(monkeypatch, caplog):
    with_java = cm.caption_scores(REFS, {1: "a red circle", 2: "blue squares", 3: "the green circle"}, spice=False)
    monkeypatch.setenv("PATH", "")  # no java on PATH
    monkeypatch.setattr(cm, "_noticed", set())
    assert shutil.which("java") is None and not cm.java_available()
    with caplog.at_level(logging.WARNING, logger="upop"):
        without = cm.caption_scores(REFS, {1: "a red circle", 2: "blue squares", 3: "the green circle"})
    assert "METEOR" not in without and "SPICE" not in without
    notices = [r.getMessage() for r in caplog.records]
    assert any("java not found" in m and "METEOR" in m for m in notices)
    assert any("SPICE skipped" in m for m in notices)
    assert all("\n" not in m for m in notices)
    # the Python tokenizer agrees with PTB on plain captions: same scores
    for key in ("Bleu_1", "Bleu_4", "ROUGE_L", "CIDEr"):
        assert without[key] == pytest.approx(with_java[key], abs=1e-9), key
    assert cm.simple_tokenize("A man's dog doesn't run (fast).") == "a man 's dog does n't run -lrb- fast -rrb-"


# ---- the pipeline -------------------------------------------------------------------------------------
def test_caption_compress_then_evaluate(coco, tmp_path, capsys):
    out = tmp_path / "run"
    config = _write(tmp_path, _config(coco, out))
    assert cli.main(["compress", "--config", str(config)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "caption" and metrics["metric"] == "CIDEr"
    assert metrics["compressed"]["params"] < metrics["dense"]["params"]
    assert metrics["compressed"]["flops"] < metrics["dense"]["flops"]
    assert abs(metrics["achieved"] - 0.5) <= 0.02
    scores = metrics["compressed"]["metrics"]
    for key in ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "ROUGE_L", "CIDEr"):
        assert key in scores and scores[key] >= 0
    assert scores["CIDEr"] == metrics["compressed"]["metric"]
    # the captions of the final test evaluation, in COCO result format with COCO's integer ids
    results = json.loads((out / "captions_test.json").read_text())
    test_ids = sorted(int(e["image"].split("_")[-1].split(".")[0])
                      for e in json.loads((coco / "coco_karpathy_test.json").read_text()))
    assert sorted(r["image_id"] for r in results) == test_ids
    assert all(isinstance(r["caption"], str) and "picture of" not in r["caption"] for r in results)
    assert (out / "captions" / f"test-{metrics['dense']['params']}.json").is_file()
    # evaluating the saved model reproduces the run's final numbers
    result = run_evaluate(load_run_config(config, [f"output_dir={tmp_path / 'eval'}"]), out / "model")
    assert result["metrics"] == pytest.approx(scores)
    assert json.loads((tmp_path / "eval" / "captions_test.json").read_text()) == results


# ---- caption length as the paper counts it ------------------------------------------------------------
def test_caption_length_limits_are_the_papers(coco, tmp_path):
    """BLIP's generate (the paper) passes min_length 5 / max_length 20, counted over the decoder's whole input:
    [DEC] a picture of = 4 tokens. The default new-token limits (1 / 16) must give exactly those sequences."""
    config = _config(coco, tmp_path / "run")
    del config["caption"]  # the defaults
    task = make_task(load_run_config(_write(tmp_path, config)))
    tok = task.built.tokenizer
    assert tok.convert_ids_to_tokens(task.prompt_ids[0].tolist()) == ["[CLS]", "a", "picture", "of"]
    assert task.prompt_length == 4  # [DEC] replaces [CLS]: the prefix the paper's lengths include
    torch.manual_seed(0)
    model = task.model.eval()
    pixels = torch.randn(3, 3, 32, 32)
    prefix = torch.cat([task.prompt_ids, torch.full((1, 1), tok.sep_token_id)], 1).repeat(len(pixels), 1)
    bias = model.text_decoder.cls.predictions.bias  # the LM head's output bias
    sep = tok.sep_token_id

    def paper(m):  # the paper's call, in its own length convention
        with torch.no_grad():
            return m.generate(pixel_values=pixels, input_ids=prefix.clone(), num_beams=3, min_length=5, max_length=20)

    with torch.no_grad():
        bias[sep] += 1e4  # [SEP] is every step's best token: the shortest caption the minimum allows
    ours = task.generate_ids(model, pixels)
    assert torch.equal(ours, paper(model))
    assert ours.shape[1] == 6  # [DEC] a picture of + 1 word + [SEP]: [SEP] is barred until length 5
    assert (ours[:, 4] != sep).all() and (ours[:, 5] == sep).all()
    assert all(len(c.split()) == 1 for c in task.generate(model, pixels))
    with torch.no_grad():
        bias[sep] -= 2e4  # [SEP] never wins: the longest caption
    ours = task.generate_ids(model, pixels)
    assert torch.equal(ours, paper(model))
    assert ours.shape[1] == 20 and not (ours[:, 4:] == sep).any()  # 16 new tokens, counted with the prefix: 20
