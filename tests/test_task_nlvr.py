"""NLVR2 task: the official JSON-lines loader, the BlipForNLVR model (compressed == masked, exact
reload, loading from a BLIP folder), the OpenMoji-derived statements, and compress -> evaluate."""

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
import yaml
from PIL import Image, ImageDraw

import upop
from families import Family
from helpers import run_search
from upop import cli
from upop.data import DataError, NLVR2Dataset, build_openmoji_nlvr, read_nlvr2
from upop.data.openmoji_nlvr import emoji_info
from upop.models import ARCHITECTURES
from upop.models.blip import blip_config, blip_tokenizer
from upop.models.nlvr import BlipForNLVR
from upop.runconfig import ModelConfig
from upop.tasks.nlvr import NLVRTask

COLORS = ["red", "green", "blue", "orange"]


def _draw(path: Path, color: str, circle: bool) -> None:
    image = Image.new("RGB", (24, 24), "white")
    draw = ImageDraw.Draw(image)
    (draw.ellipse if circle else draw.rectangle)((4, 4, 20, 20), fill=color)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _write_split(root: Path, split: str, n: int, directories: bool) -> Path:
    """n pairs in the official layout; the statement is about the left image's colour."""
    lines = []
    for k in range(n):
        set_id, pair = divmod(k, 2)
        prefix = f"{split}-{set_id}-{pair}"
        left, right = COLORS[k % 4], COLORS[(k + 1) % 4]
        folder = root / "images" / split / (str(set_id % 3) if directories else "")
        _draw(folder / f"{prefix}-img0.png", left, k % 2 == 0)
        _draw(folder / f"{prefix}-img1.png", right, k % 3 == 0)
        said = COLORS[(k // 2) % 4]
        entry = {"validation": {}, "sentence": f"The left image is {said}.", "left_url": "http://x/l.jpg",
                 "writer": "w1", "label": "True" if said == left else "False", "right_url": "http://x/r.jpg",
                 "synset": "n02", "query": "q", "identifier": f"{prefix}-0", "extra_validations": {}}
        if directories:
            entry["directory"] = set_id % 3
        lines.append(json.dumps(entry))
    path = root / f"{split}.json"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def nlvr2(tmp_path_factory) -> Path:
    """A tiny dataset in the official release layout: images/train/<directory>/..., images/dev/..."""
    root = tmp_path_factory.mktemp("nlvr2")
    _write_split(root, "train", 24, directories=True)
    _write_split(root, "dev", 8, directories=False)
    _write_split(root, "test1", 8, directories=False)
    return root


# ---- the loader ----------------------------------------------------------------------------------
def test_loader_reads_official_format(nlvr2):
    ds = NLVR2Dataset(nlvr2 / "train.json", nlvr2 / "images")
    assert len(ds) == 24
    lines = [json.loads(line) for line in (nlvr2 / "train.json").read_text().splitlines()]
    for ex, line in zip(ds.examples, lines, strict=True):
        assert ex.identifier == line["identifier"] and ex.sentence == line["sentence"]
        assert ex.label == (line["label"] == "True")
        # train images sit in the numbered folder named by "directory"
        prefix = line["identifier"].rsplit("-", 1)[0]
        assert ex.left == nlvr2 / "images" / "train" / str(line["directory"]) / f"{prefix}-img0.png"
        assert ex.right.name == f"{prefix}-img1.png"
    left, right, sentence, label = ds[3]
    assert left.size == right.size == (24, 24) and sentence == lines[3]["sentence"]
    assert ds.label_counts()[1] == sum(line["label"] == "True" for line in lines) > 0
    dev = read_nlvr2(nlvr2 / "dev.json", nlvr2 / "images")
    assert dev[0].left == nlvr2 / "images" / "dev" / "dev-0-0-img0.png"


@pytest.mark.parametrize("bad_line, problem", [
    ("{not json", "line 3: invalid JSON"),
    ("[1, 2]", "line 3: expected a JSON object"),
    ('{"identifier": "dev-1-0-0", "sentence": "x"}', "line 3: missing key 'label'"),
    ('{"identifier": "dev-1-0-0", "sentence": "x", "label": "maybe"}', "line 3: label must be"),
    ('{"identifier": "dev10", "sentence": "x", "label": "True"}', "line 3: identifier must look like"),
    ('{"identifier": "dev-1-0-0", "sentence": 5, "label": "True"}', "line 3: sentence must be a string"),
    ('{"identifier": "dev-77-0-0", "sentence": "x", "label": "False"}', "line 3: image file not found"),
    ('{"identifier": "dev-1-0-0", "sentence": "  ", "label": "False"}', "line 3: sentence is empty"),
])
def test_loader_rejects_malformed_line(nlvr2, tmp_path, bad_line, problem):
    lines = (nlvr2 / "dev.json").read_text().splitlines()
    bad = tmp_path / "dev.json"
    bad.write_text("\n".join([*lines[:2], bad_line, *lines[2:]]) + "\n")
    with pytest.raises(DataError) as info:
        NLVR2Dataset(bad, nlvr2 / "images")
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(bad)) and problem in message


def test_loader_skip_mode_and_missing_paths(nlvr2, tmp_path):
    lines = (nlvr2 / "dev.json").read_text().splitlines()
    bad = tmp_path / "dev.json"
    missing = '{"identifier": "dev-77-0-0", "sentence": "x", "label": "False"}'
    bad.write_text("\n".join([*lines, missing]) + "\n")
    ds = NLVR2Dataset(bad, nlvr2 / "images", on_bad_input="skip")
    assert len(ds) == len(lines) and len(ds.skipped) == 1 and "dev-77-0-img" in ds.skipped[0]
    with pytest.raises(DataError, match="annotation file not found"):
        NLVR2Dataset(tmp_path / "nope.json", nlvr2 / "images")
    with pytest.raises(DataError, match="image root not found"):
        NLVR2Dataset(nlvr2 / "dev.json", tmp_path / "no_images")
    with pytest.raises(DataError, match="line 1: image dev-0-0-img0.png not found"):  # wrong root
        NLVR2Dataset(nlvr2 / "dev.json", nlvr2)
    train = (nlvr2 / "train.json").read_text().splitlines()
    no_directory = json.loads(train[1])
    del no_directory["directory"]  # the first line fixed the numbered-folder layout
    bad.write_text("\n".join([train[0], json.dumps(no_directory)]) + "\n")
    with pytest.raises(DataError, match="line 2: no 'directory' field"):
        NLVR2Dataset(bad, nlvr2 / "images")


# ---- the model -----------------------------------------------------------------------------------
def _nlvr_model() -> BlipForNLVR:
    text = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=32, encoder_hidden_size=24)
    vision = dict(image_size=16, patch_size=4, hidden_size=24, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4, initializer_range=0.02)  # BLIP's default 1e-10 ignores the image
    return BlipForNLVR(tf.BlipConfig(text_config=text, vision_config=vision))


def _nlvr_inputs(g: torch.Generator) -> dict:
    ids = torch.randint(1, 99, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, -2:] = 0  # padding is part of the test
    return {"input_ids": ids, "attention_mask": mask, "pixel_values_left": torch.randn(3, 3, 16, 16, generator=g),
            "pixel_values_right": torch.randn(3, 3, 16, 16, generator=g)}


NLVR_FAMILY = Family("blip_nlvr", _nlvr_model, _nlvr_inputs, lambda o: o.logits)


def test_structures_cover_both_towers_and_cross_attention():
    found = upop.structures(_nlvr_model())
    kinds = {(s["modality"], s["kind"]) for s in found}
    assert kinds == {("vision", "attention"), ("vision", "mlp"), ("text", "attention"),
                     ("text", "cross_attention"), ("text", "mlp")}
    assert len(found) == 10  # 2 vision layers x 2 + 2 text layers x 3
    # the cross-attention reads the vision width, so its key/value take 24 inputs
    cross = [s for s in found if s["kind"] == "cross_attention"]
    assert all(s["units"] == 8 for s in cross)


def test_both_images_and_their_order_matter():
    model = _nlvr_model().eval()
    inputs = _nlvr_inputs(torch.Generator().manual_seed(0))
    with torch.no_grad():
        # at init the cross-attention is nearly uniform, and a uniform average over both images'
        # tokens cannot tell left from right; sharpen it, as training does
        for layer in model.text_encoder.encoder.layer:
            layer.crossattention.self.query.weight.mul_(50)
        base = model(**inputs).logits
        swapped = model(**{**inputs, "pixel_values_left": inputs["pixel_values_right"],
                           "pixel_values_right": inputs["pixel_values_left"]}).logits
        right_changed = model(**{**inputs, "pixel_values_right": torch.zeros_like(inputs["pixel_values_right"])}).logits
        labels = torch.tensor([0, 1, 1])
        loss = model(**inputs, labels=labels).loss
    assert base.shape == (3, 2)
    assert (swapped - base).abs().max() > 1e-6  # the image-type embedding tells left from right
    assert (right_changed - base).abs().max() > 1e-6
    assert torch.allclose(loss, torch.nn.functional.cross_entropy(base, labels))


@pytest.mark.parametrize("granularity", ["head_dim", "head"])
def test_compressed_equals_masked_and_reloads(granularity, tmp_path):
    config = upop.UPopConfig(target=0.5, total_steps=24, interval=4, granularity=granularity)
    model, inputs, dense, search = run_search(NLVR_FAMILY, config)
    assert search.finished
    with torch.no_grad():
        masked = model(**inputs).logits
    assert (masked - dense).abs().max() > 1e-6, "the masks must change the output"
    plan = search.plan()
    params_before = upop.count_params(model)
    compressed = search.compress()
    assert type(compressed) is BlipForNLVR
    with torch.no_grad():
        got = compressed(**inputs).logits
    assert (got - masked).abs().max() <= 1e-5
    assert params_before - upop.count_params(compressed) == plan.stats["pruned_params"]
    assert abs(plan.stats["achieved"] - 0.5) <= 0.01
    for s in upop.structures(compressed, granularity):  # every structure keeps what the plan says
        assert s["units"] == len(plan.structures[s["name"]].kept) >= 1

    upop.save_pretrained(compressed, tmp_path / "ckpt")
    assert "BlipForNLVR" in ARCHITECTURES
    reloaded = upop.from_pretrained(tmp_path / "ckpt")
    assert type(reloaded) is BlipForNLVR
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, got)
    assert upop.count_params(reloaded) == upop.count_params(compressed)


def test_loads_from_a_blip_checkpoint_folder(tmp_path):
    """model.name: a BLIP retrieval folder gives BlipForNLVR with its vision_model and text_encoder."""
    tok = blip_tokenizer()
    config = blip_config(tok, 32, 8, 32, 2, 4, 32, 2, 4, projection_dim=16)
    torch.manual_seed(3)
    source = tf.BlipForImageTextRetrieval(config)
    source.save_pretrained(tmp_path / "blip")
    tok.save_pretrained(tmp_path / "blip")
    built = NLVRTask.load_model(ModelConfig(name=str(tmp_path / "blip")), 32)
    model = built.model
    assert type(model) is BlipForNLVR and built.image_size == 32
    assert built.tokenizer.enc_token_id == tok.enc_token_id
    ours, theirs = model.state_dict(), source.state_dict()
    shared = [k for k in ours if k.startswith(("vision_model.", "text_encoder."))]
    assert shared and all(torch.equal(ours[k], theirs[k]) for k in shared)
    assert all(torch.isfinite(p).all() for p in model.cls_head.parameters())  # fresh, initialised
    assert torch.isfinite(model.image_type_embeddings.weight).all()
    retrieval = tf.BertModel(tf.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1,
                                           num_attention_heads=4, intermediate_size=37))
    retrieval.save_pretrained(tmp_path / "bert")
    tok.save_pretrained(tmp_path / "bert")
    with pytest.raises(upop.runconfig.ConfigError, match="needs a BLIP checkpoint"):
        NLVRTask.load_model(ModelConfig(name=str(tmp_path / "bert")), 32)


# ---- OpenMoji-derived statements -----------------------------------------------------------------
def test_emoji_properties():
    toned = emoji_info("1F44D-1F3FE", ":thumbs_up_medium-dark_skin_tone:")
    assert toned.tone == 3 and toned.toned and toned.base == "1F44D"
    flag = emoji_info("1F1EB-1F1F7", ":France:")
    assert flag.categories == {"flag"} and flag.tone is None
    assert "person" not in emoji_info("1F452", ":woman\u2019s_hat:").categories
    two_tones = emoji_info("1F9D1-1F3FB-200D-1F91D-200D-1F9D1-1F3FF",
                           ":people_holding_hands_light_skin_tone_dark_skin_tone:")
    assert two_tones.tone is None and two_tones.toned and "person" in two_tones.categories
    face = emoji_info("1F600", ":grinning_face:")
    assert face.categories == {"face"}
    # an emoji with skin-tone variants might show a person: never a negative for "person"
    assert "person" in emoji_info("1F46E", ":police_officer:", {"1F46E"}).maybe


_FAKE = [  # (stem, name, split): flags, faces, hearts, hands and skin-tone variants
    *[(s, n, "train") for s, n in [
        ("1F1EB-1F1F7", "France"), ("1F1E9-1F1EA", "Germany"), ("1F600", "grinning face"), ("1F622", "crying face"),
        ("2764-FE0F", "red heart"), ("1F49C", "purple heart"), ("1F697", "automobile"), ("1F955", "carrot"),
        ("1F44B", "waving hand"), ("1F44B-1F3FB", "waving hand light skin tone"),
        ("1F44B-1F3FF", "waving hand dark skin tone"), ("1F469-1F3FD", "woman medium skin tone"),
        ("1F469", "woman"), ("1F469-1F3FC", "woman medium-light skin tone")]],
    *[(s, n, "val") for s, n in [
        ("1F1EE-1F1F9", "Italy"), ("1F642", "slightly smiling face"), ("1F680", "rocket"),
        ("1F466-1F3FB", "boy light skin tone"), ("1F466-1F3FE", "boy medium-dark skin tone"), ("1F466", "boy")]],
    *[(s, n, "test") for s, n in [
        ("1F1EF-1F1F5", "Japan"), ("1F60E", "smiling face with sunglasses"), ("1F34E", "red apple"),
        ("1F467-1F3FB", "girl light skin tone"), ("1F467-1F3FF", "girl dark skin tone"), ("1F467", "girl")]],
]


@pytest.fixture(scope="module")
def fake_openmoji(tmp_path_factory) -> Path:
    """A folder shaped like build_openmoji's output (Karpathy files, images/<CODEPOINTS>.png, marker)."""
    root = tmp_path_factory.mktemp("openmoji")
    splits: dict[str, list] = {"train": [], "val": [], "test": []}
    for k, (stem, name, split) in enumerate(_FAKE):
        _draw(root / "images" / f"{stem}.png", COLORS[k % 4], k % 2 == 0)
        rel = f"images/{stem}.png"
        splits[split].append({"image": rel, "caption": name, "image_id": stem} if split == "train"
                             else {"image": rel, "caption": [name]})
    for split, entries in splits.items():
        (root / f"{split}.json").write_text(json.dumps(entries))
    (root / "BUILD_COMPLETE.json").write_text(json.dumps({"format": 1, "fake": True}))
    return root


def test_openmoji_nlvr_is_true_balanced_deterministic_and_cached(fake_openmoji, tmp_path, monkeypatch):
    import emoji

    names = [stem for stem, _, _ in _FAKE]
    for stem in names:  # real emoji: the builder takes their names from the emoji package
        assert "".join(chr(int(p, 16)) for p in stem.split("-")) in emoji.EMOJI_DATA, stem
    pairs = {"train": 40, "val": 12, "test": 12}
    out = build_openmoji_nlvr(tmp_path / "a", fake_openmoji, pairs=pairs, seed=1)
    toneable = {s.split("-")[0] for s in names if "-1F3F" in s}
    infos = {stem: emoji_info(stem, emoji.EMOJI_DATA["".join(chr(int(p, 16)) for p in stem.split("-"))]["en"],
                              toneable) for stem in names}
    split_of = {stem: split for stem, _, split in _FAKE}
    for split, file in (("train", "train.json"), ("val", "dev.json"), ("test", "test1.json")):
        ds = NLVR2Dataset(out / file, out / "images")  # the same loader reads it
        assert len(ds) == pairs[split] and ds.label_counts() == {0: pairs[split] // 2, 1: pairs[split] // 2}
        lines = [json.loads(line) for line in (out / file).read_text().splitlines()]
        for line, ex in zip(lines, ds.examples, strict=True):
            left, right = (Path(line[k]).stem for k in ("left_url", "right_url"))
            assert split_of[left] == split_of[right] == split and left != right
            assert ex.left.read_bytes() == (fake_openmoji / "images" / f"{left}.png").read_bytes()
            assert ex.label == _expected(line["sentence"], infos[left], infos[right])
    again = build_openmoji_nlvr(tmp_path / "b", fake_openmoji, pairs=pairs, seed=1)
    for file in ("train.json", "dev.json", "test1.json"):
        assert (out / file).read_text() == (again / file).read_text()
    # cached: a second call with the same parameters does not rebuild
    monkeypatch.setattr("upop.data.openmoji_nlvr._build", lambda *a: pytest.fail("rebuilt"))
    assert build_openmoji_nlvr(tmp_path / "a", fake_openmoji, pairs=pairs, seed=1) == out
    with pytest.raises(DataError, match="not an OpenMoji NLVR build"):
        (tmp_path / "c").mkdir()
        (tmp_path / "c" / "x").write_text("mine")
        build_openmoji_nlvr(tmp_path / "c", fake_openmoji, pairs=pairs, seed=1)


def _expected(sentence: str, left, right) -> bool:
    """The statement's truth, recomputed independently of the generator's code."""
    for category in ("face", "flag", "heart", "hand", "person"):
        a, b = category in left.categories, category in right.categories
        table = {f"Both images show a {category}.": a and b, f"The left image shows a {category}.": a,
                 f"The right image shows a {category}.": b, f"Exactly one image shows a {category}.": a != b}
        if sentence in table:
            return table[sentence]
    if sentence == "Both images show the same emoji.":
        return left.base == right.base
    assert left.tone is not None and right.tone is not None, "tone statements need one tone per image"
    return {"Both have the same skin tone.": left.tone == right.tone,
            "The right one has a darker skin tone.": right.tone > left.tone,
            "The left one has a darker skin tone.": left.tone > right.tone}[sentence]


# ---- the pipeline --------------------------------------------------------------------------------
def test_compress_then_evaluate(nlvr2, tmp_path, capsys):
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "task": "nlvr", "output_dir": str(out), "model": {"preset": "tiny-blip-nlvr"},
        "data": {"format": "nlvr2", "root": str(nlvr2 / "images"), "train": str(nlvr2 / "train.json"),
                 "val": str(nlvr2 / "dev.json"), "test": str(nlvr2 / "test1.json"), "image_size": 16,
                 "max_tokens": 10},
        "upop": {"target": 0.5, "interval": 2},
        "train": {"batch_size": 8, "eval_batch_size": 4, "dense_epochs": 1, "search_epochs": 2,
                  "retrain_epochs": 1},
        "eval": {"latency_batches": [1, 2], "latency_repeats": 1},
    }))
    assert cli.main(["compress", "--config", str(config)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "nlvr" and metrics["metric"] == "accuracy"
    for column in ("dense", "compressed"):
        acc = metrics[column]["metrics"]["accuracy"]
        assert 0 <= acc <= 100 and acc * 8 / 100 == pytest.approx(round(acc * 8 / 100))  # k of 8 test pairs
    assert metrics["compressed"]["params"] < metrics["dense"]["params"]
    assert metrics["compressed"]["flops"] < metrics["dense"]["flops"]
    assert abs(metrics["achieved"] - 0.5) <= 0.02
    assert cli.main(["evaluate", "--model", str(out / "model"), "--config", str(config)]) == 0
    assert "accuracy" in capsys.readouterr().out
    # the saved model computes the accuracy metrics.json reports
    model = upop.from_pretrained(out / "model")
    assert type(model) is BlipForNLVR


def test_bad_data_stops_before_training(nlvr2, tmp_path, capsys):
    bad = tmp_path / "train.json"
    bad.write_text((nlvr2 / "train.json").read_text() + '{"identifier": "train-1-0-0"}\n')
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "task": "nlvr", "output_dir": str(tmp_path / "run"), "model": {"preset": "tiny-blip-nlvr"},
        "data": {"format": "nlvr2", "root": str(nlvr2 / "images"), "train": str(bad),
                 "val": str(nlvr2 / "dev.json"), "test": str(nlvr2 / "test1.json")},
    }))
    assert cli.main(["compress", "--config", str(config)]) == 2
    assert f"{bad}: line 25: missing key 'sentence'" in capsys.readouterr().err
    assert not (tmp_path / "run" / "state").exists()  # nothing trained


def test_task_batches_start_with_enc_and_hold_both_images(nlvr2):
    from upop.runconfig import load_run_config
    from upop.tasks import make_task

    cfg = load_run_config(None, ["task=nlvr", "model.preset=tiny-blip-nlvr", "data.format=nlvr2",
                                 f"data.root={nlvr2 / 'images'}", f"data.train={nlvr2 / 'train.json'}",
                                 f"data.val={nlvr2 / 'dev.json'}", f"data.test={nlvr2 / 'test1.json'}",
                                 "data.image_size=16", "data.max_tokens=6"])
    task = make_task(cfg)
    batch = task.collate([task.train_dataset()[i] for i in range(4)])
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values_left", "pixel_values_right", "labels"}
    assert (batch["input_ids"][:, 0] == task.built.tokenizer.enc_token_id).all()  # BLIP's [ENC], not [CLS]
    assert batch["input_ids"].shape[1] <= 6 and batch["pixel_values_left"].shape == (4, 3, 16, 16)
    labels = [ex.label for ex in task.splits["train"].examples[:4]]
    assert batch["labels"].tolist() == labels
    assert torch.isfinite(task.loss(task.model, batch))
    example = task.example_inputs(2)
    assert example["input_ids"].shape == (2, 6) and example["pixel_values_right"].shape == (2, 3, 16, 16)
