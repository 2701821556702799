"""Semantic segmentation: the Segmenter model (structures, compressed == masked, exact reload), the
ADE20K-layout loader and its rejections, metrics, joint transforms, the OpenMoji-derived builder,
and compress -> evaluate end to end on a tiny preset."""

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageDraw

import upop
from families import Family
from helpers import run_search
from upop import cli, pipeline
from upop.data import ADE20KDataset, DataError, build_openmoji, build_openmoji_seg, load_annotation
from upop.evaluate import run_evaluate
from upop.metrics import confusion_matrix, segmentation_metrics
from upop.models import ARCHITECTURES
from upop.models.segmenter import SegmenterConfig, SegmenterForSemanticSegmentation
from upop.runconfig import load_run_config
from upop.tasks import make_task
from upop.tasks.segmentation import SegmentationTask, TrainTransform, predict, slide

# ---- the model -------------------------------------------------------------------------------------------


def _segmenter() -> SegmenterForSemanticSegmentation:
    config = SegmenterConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=37, decoder_hidden_size=24, decoder_num_layers=2, decoder_num_heads=4,
                             decoder_intermediate_size=29, num_labels=5)
    return SegmenterForSemanticSegmentation(config)


SEGMENTER = Family("segmenter", _segmenter,
                   lambda g: {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}, lambda o: o.logits)


def test_segmenter_shapes_loss_and_structures():
    model = _segmenter().eval()
    assert ARCHITECTURES["SegmenterForSemanticSegmentation"] is SegmenterForSemanticSegmentation
    labels = torch.randint(0, 5, (2, 16, 16))
    labels[0, :4] = 255
    out = model(torch.randn(2, 3, 16, 16), labels=labels)
    assert out.logits.shape == (2, 5, 16, 16) and torch.isfinite(out.loss)
    all_ignored = model(torch.randn(1, 3, 16, 16), labels=torch.full((1, 16, 16), 255)).loss
    assert all_ignored.item() == 0.0  # not NaN: a crop of only "other" pixels must not poison a step
    # any size: padded to the patch, position table interpolated, padding cropped off
    assert model(torch.randn(1, 3, 18, 27)).logits.shape == (1, 5, 18, 27)
    found = upop.structures(model)
    assert {(s["modality"], s["kind"]) for s in found} == {
        ("vision", "attention"), ("vision", "mlp"), ("decoder", "attention"), ("decoder", "mlp")}
    assert sum(s["modality"] == "decoder" for s in found) == 4  # 2 decoder blocks x (attention, MLP)


@pytest.mark.parametrize("granularity", ["head_dim", "head"])
def test_segmenter_compressed_equals_masked_and_reloads(granularity, tmp_path):
    config = upop.UPopConfig(target=0.5, total_steps=24, interval=4, granularity=granularity)
    model, inputs, dense, search = run_search(SEGMENTER, config)
    with torch.no_grad():
        masked = model(**inputs).logits
        odd = torch.randn(1, 3, 20, 12)
        masked_odd = model(pixel_values=odd).logits
    assert (masked - dense).abs().max() > 1e-6, "the masks must change the output"
    plan = search.plan()
    before = upop.count_params(model)
    compressed = search.compress()
    with torch.no_grad():
        got = compressed(**inputs).logits
        assert (compressed(pixel_values=odd).logits - masked_odd).abs().max() <= 1e-5
    assert (got - masked).abs().max() <= 1e-5
    assert before - upop.count_params(compressed) == plan.stats["pruned_params"]
    pruned = {s["modality"] for s in upop.structures(compressed, granularity)
              if s["units"] < plan.structures[s["name"]].total}
    assert pruned, "the search pruned nothing"
    upop.save_pretrained(compressed, tmp_path / "ckpt")
    reloaded = upop.from_pretrained(tmp_path / "ckpt")
    assert type(reloaded) is SegmenterForSemanticSegmentation
    assert reloaded.config.num_labels == 5 and reloaded.config.decoder_num_layers == 2
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, got)


# ---- metrics and inference ---------------------------------------------------------------------------------


def test_metrics_follow_mmseg():
    # 4 classes; class 3 is in neither prediction nor ground truth (left out of both means);
    # class 2 is predicted but absent from the ground truth (IoU 0 counts, its accuracy is NaN)
    gt = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 255]])
    pred = torch.tensor([[0, 2, 1, 0], [0, 0, 1, 3]])  # the ignored pixel's prediction does not count
    conf = confusion_matrix(pred, gt, 4)
    assert conf.sum() == 7 and conf[0, 0] == 3 and conf[0, 2] == 1 and conf[1, 0] == 1 and conf[1, 1] == 2
    m = segmentation_metrics(conf)
    iou0, iou1, iou2 = 3 / 5, 2 / 3, 0.0
    assert m["miou"] == pytest.approx(100 * (iou0 + iou1 + iou2) / 3)
    assert m["macc"] == pytest.approx(100 * (3 / 4 + 2 / 3) / 2)
    assert m["pixel_acc"] == pytest.approx(100 * 5 / 7)


def test_sliding_window_and_multiscale():
    torch.manual_seed(0)
    model = _segmenter().eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        plain = model(pixel_values=x).logits
        assert torch.allclose(slide(model, x, 16), plain)  # one window = one forward
        wide = torch.randn(1, 3, 16, 40)
        tiled = slide(model, wide, 16)  # windows at 0, 16 and 24 (flush with the end)
        assert torch.allclose(tiled[..., :16], model(pixel_values=wide[..., :16]).logits, atol=1e-6)
        middle, last = model(pixel_values=wide[..., 16:32]).logits, model(pixel_values=wide[..., 24:]).logits
        assert torch.allclose(tiled[..., 16:24], middle[..., :8], atol=1e-6)
        assert torch.allclose(tiled[..., 24:32], (middle[..., 8:] + last[..., :8]) / 2, atol=1e-6)  # overlap
        assert torch.allclose(tiled[..., 32:], last[..., 8:], atol=1e-6)
        multi = predict(model, wide, 16, scales=(0.5, 0.75, 1.0, 1.25, 1.5, 1.75), flips=(False, True))
    assert multi.shape == (1, 5, 16, 40) and torch.isfinite(multi).all()
    assert not torch.allclose(multi, tiled)


def test_train_transform_keeps_image_and_labels_aligned():
    # left half red = class 0, right half blue = class 1: after rescale, crop and flip each
    # labelled pixel must still sit on its class's colour
    image = Image.new("RGB", (40, 24), "red")
    ImageDraw.Draw(image).rectangle((20, 0, 39, 23), fill="blue")
    labels = torch.zeros(24, 40, dtype=torch.int64)
    labels[:, 20:] = 1
    transform = TrainTransform(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    torch.manual_seed(3)
    flipped = 0
    for _ in range(20):
        x, y = transform(image, labels)
        assert x.shape == (3, 16, 16) and y.shape == (16, 16) and y.dtype == torch.int64
        clear = ((x[0] - x[2]).abs() > 1.5) & (y != 255)  # bilinear rescaling blends the boundary column
        assert clear.sum() > 16
        assert torch.equal(y[clear], (x[2] > x[0])[clear].long())  # blue pixels are class 1, red ones class 0
        both = (y == 0).any(1) & (y == 1).any(1)
        if both.any():
            row = int(both.nonzero()[0])
            flipped += int((y[row] == 1).nonzero()[0] < (y[row] == 0).nonzero()[0])
    assert flipped > 0  # horizontal flips happened


# ---- the ADE20K-layout loader ------------------------------------------------------------------------------

SIZES = [(40, 32), (32, 48), (36, 36)]


def _ade(root, split: str, n: int, num_classes: int = 3) -> None:
    """ADEChallengeData2016 layout: images/<split>/*.jpg, annotations/<split>/*.png (0 = other, 1..K)."""
    rng = np.random.default_rng(len(split) * 10 + n)
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    colours = [(0, 0, 0), (230, 230, 230), (220, 30, 30), (30, 30, 220), (30, 200, 30)]
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        image = Image.new("RGB", (w, h), colours[1])
        ann = Image.new("L", (w, h), 1)
        for _ in range(2):
            cls = int(rng.integers(2, num_classes + 1))
            x0, y0 = int(rng.integers(0, w - 14)), int(rng.integers(0, h - 14))
            box = (x0, y0, x0 + 13, y0 + 13)
            ImageDraw.Draw(image).ellipse(box, fill=colours[cls])
            ImageDraw.Draw(ann).ellipse(box, fill=cls)
        ImageDraw.Draw(ann).rectangle((0, 0, 2, 2), fill=0)  # a patch of "other"
        image.save(root / "images" / split / f"ADE_{split}_{i:08d}.jpg", quality=95)
        ann.save(root / "annotations" / split / f"ADE_{split}_{i:08d}.png")


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
    root = tmp_path_factory.mktemp("ADEChallengeData2016")
    _ade(root, "training", 24)
    _ade(root, "validation", 6)
    return root


def test_ade20k_loader_reads_the_official_layout(ade):
    ds = ADE20KDataset(ade, "validation", num_labels=3, check=True)
    assert len(ds) == 6
    image, labels = ds[0]
    raw = np.asarray(Image.open(ade / "annotations" / "validation" / "ADE_validation_00000000.png"))
    assert image.size == (40, 32) and labels.shape == (32, 40)
    # reduce_zero_label: 0 -> 255 (ignored), k -> k-1
    assert torch.equal(labels[torch.from_numpy(raw == 0)], torch.full(((raw == 0).sum(),), 255))
    assert torch.equal(labels[torch.from_numpy(raw > 0)], torch.from_numpy(raw[raw > 0].astype(np.int64) - 1))


def _copy(src, dst) -> None:
    import shutil

    shutil.copytree(src, dst)


def test_ade20k_loader_rejects_bad_input(ade, tmp_path):
    with pytest.raises(DataError, match="annotation folder not found"):
        bad = tmp_path / "noann"
        (bad / "images" / "validation").mkdir(parents=True)
        ADE20KDataset(bad, "validation")
    # an image without its annotation: the one-line message names the image
    root = tmp_path / "missing"
    _copy(ade, root)
    (root / "annotations" / "validation" / "ADE_validation_00000002.png").unlink()
    with pytest.raises(DataError, match=r"ADE_validation_00000002\.jpg: image has no annotation") as err:
        ADE20KDataset(root, "validation", num_labels=3)
    assert "\n" not in str(err.value)
    skipping = ADE20KDataset(root, "validation", num_labels=3, on_bad_input="skip")
    assert len(skipping) == 5 and len(skipping.skipped) == 1
    # labels above the class count: found up front in an evaluation split, at read time in training
    with pytest.raises(DataError, match=r"ADE_validation_00000000\.png: label 3 above the class count 2"):
        ADE20KDataset(ade, "validation", num_labels=2, check=True)
    train = ADE20KDataset(ade, "training", num_labels=2)
    with pytest.raises(DataError, match="above the class count 2"):
        [train[i] for i in range(len(train))]
    # a colour annotation (the full ADE20K release's format) and an undecodable image
    root = tmp_path / "wrong"
    _copy(ade, root)
    path = root / "annotations" / "validation" / "ADE_validation_00000001.png"
    Image.open(path).convert("RGB").save(path)
    with pytest.raises(DataError, match=r"00000001\.png: annotation must be a single-channel label PNG"):
        ADE20KDataset(root, "validation", num_labels=3, check=True)
    (root / "images" / "validation" / "ADE_validation_00000004.jpg").write_bytes(b"not a jpeg")
    skipping = ADE20KDataset(root, "validation", num_labels=3, on_bad_input="skip", check=True)
    assert len(skipping) == 4 and len(skipping.skipped) == 2
    with pytest.raises(DataError, match="cannot decode"):
        load_annotation(root / "images" / "validation" / "ADE_validation_00000004.jpg", 3)


# ---- the OpenMoji-derived data ----------------------------------------------------------------------------


def test_openmoji_seg_builder(tmp_path):
    source = build_openmoji(tmp_path / "om", image_size=32, limit=40, progress=False)
    out = build_openmoji_seg(tmp_path / "seg", source, image_size=32, scenes=(4, 2, 2))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["classes"][0] == "background" and len(meta["classes"]) == 7
    for split, n in (("training", 4), ("validation", 2), ("test", 2)):
        ds = ADE20KDataset(out, split, num_labels=7, check=True)
        assert len(ds) == n
    image, labels = ADE20KDataset(out, "training", num_labels=7)[0]
    values = set(labels.unique().tolist())
    assert image.size == (32, 32) and 0 in values and values - {0, 255}, "emoji over the background"
    # deterministic, and reused when complete
    again = build_openmoji_seg(tmp_path / "seg2", source, image_size=32, scenes=(4, 2, 2))
    for path in sorted(out.rglob("*.png")):
        assert path.read_bytes() == (again / path.relative_to(out)).read_bytes()
    stamp = (out / "BUILD_COMPLETE.json").stat().st_mtime_ns
    assert build_openmoji_seg(tmp_path / "seg", source, image_size=32, scenes=(4, 2, 2)) == out
    assert (out / "BUILD_COMPLETE.json").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="OpenMoji build marker"):
        build_openmoji_seg(tmp_path / "seg3", tmp_path, image_size=32)


# ---- the pipeline ---------------------------------------------------------------------------------------------


def _run_config(ade, tmp_path, out):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "task": "segmentation", "output_dir": str(out), "model": {"preset": "tiny-segmenter", "num_labels": 3},
        "data": {"format": "ade20k", "root": str(ade), "image_size": 32},
        "upop": {"target": 0.5, "interval": 2},
        "train": {"batch_size": 4, "eval_batch_size": 4, "dense_epochs": 1, "search_epochs": 2,
                  "retrain_epochs": 1, "max_steps_per_epoch": 3, "dense_lr": 1e-3},
        "eval": {"latency_batches": [1], "latency_repeats": 1},
    }))
    return config


def test_segmentation_compress_then_evaluate(ade, tmp_path, capsys):
    out = tmp_path / "run"
    config = _run_config(ade, tmp_path, out)
    assert cli.main(["compress", "--config", str(config)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "segmentation" and metrics["metric"] == "miou"
    assert metrics["compressed"]["params"] < metrics["dense"]["params"]
    assert metrics["compressed"]["flops"] < metrics["dense"]["flops"]
    assert abs(metrics["achieved"] - 0.5) <= 0.02
    for key in ("miou", "macc", "pixel_acc"):
        assert 0 <= metrics["compressed"]["metrics"][key] <= 100
    # the saved model gives the same numbers again, single-scale; multi-scale runs too
    result = run_evaluate(load_run_config(config), out / "model")
    assert result["metrics"] == metrics["compressed"]["metrics"]
    multi = run_evaluate(load_run_config(config, ["segmentation.multiscale=true"]), out / "model")
    assert 0 <= multi["metric"] <= 100 and multi["metrics"] != result["metrics"]
    assert cli.main(["evaluate", "--model", str(out / "model"), "--config", str(config)]) == 0
    assert "miou" in capsys.readouterr().out


def test_segmentation_config_errors(ade, tmp_path):
    base = {"task": "segmentation", "output_dir": str(tmp_path / "r"), "model": {"preset": "tiny-segmenter"},
            "data": {"format": "ade20k", "root": str(ade), "image_size": 32}}
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(base))  # 150 ADE20K classes by default: the fixture's labels fit
    task = make_task(load_run_config(config))
    assert task.num_labels == 150 and task.model.config.num_labels == 150
    config.write_text(yaml.safe_dump({**base, "data": {"format": "ade20k", "image_size": 32}}))
    with pytest.raises(DataError, match="needs data.root"):
        make_task(load_run_config(config))
    config.write_text(yaml.safe_dump({**base, "model": {"preset": "tiny-segmenter", "num_labels": 2}}))
    with pytest.raises(DataError, match="above the class count 2"):  # validation split checked up front
        make_task(load_run_config(config))


def test_segmenter_from_a_vit_checkpoint(tmp_path):
    import transformers as tf

    from upop.runconfig import ModelConfig

    vit = tf.ViTForImageClassification(tf.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=37, num_labels=3))
    vit.save_pretrained(tmp_path / "vit")
    built = SegmentationTask.load_model(ModelConfig(name=str(tmp_path / "vit")), 16, num_labels=5)
    model = built.model
    assert isinstance(model, SegmenterForSemanticSegmentation) and model.config.num_labels == 5
    assert model.config.decoder_num_layers == 2 and model.config.decoder_hidden_size == 32
    for name, value in vit.vit.state_dict().items():  # the encoder is the checkpoint's ViT
        assert torch.equal(model.encoder.state_dict()[name], value), name
    assert model(torch.randn(1, 3, 16, 16)).logits.shape == (1, 5, 16, 16)


def test_segmentation_resumes_in_retraining(ade, tmp_path, monkeypatch):
    # killed in the retrain epoch: the rerun rebuilds a fresh Segmenter, replays the plan, loads the state
    out = tmp_path / "run"
    config = _run_config(ade, tmp_path, out)
    real_epoch, calls = pipeline.Trainer.epoch, {"n": 0}

    def crashing(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # 1 dense + 2 search epochs, then the retrain epoch
            raise KeyboardInterrupt
        return real_epoch(self, *args, **kwargs)

    monkeypatch.setattr(pipeline.Trainer, "epoch", crashing)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_compress(load_run_config(config))
    monkeypatch.setattr(pipeline.Trainer, "epoch", real_epoch)
    metrics = pipeline.run_compress(load_run_config(config))
    plan = json.loads((out / "plan.json").read_text())["structures"]
    reloaded = upop.from_pretrained(out / "model")
    assert {s["name"]: s["units"] for s in upop.structures(reloaded)} == {k: len(v["kept"]) for k, v in plan.items()}
    assert metrics["compressed"]["params"] == upop.count_params(reloaded) < metrics["dense"]["params"]
