"""Hugging Face `datasets` data (data.format hf_datasets): tiny datasets built offline with
Dataset.from_dict and PIL images, saved to disk, run through `upop compress` for classification and
retrieval; an image folder read by datasets' imagefolder builder; one line for each bad input.
Also: ImageFolder split folders relative to data.root, and the user's own transforms
(data.train_transform / data.eval_transform)."""

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image, ImageDraw

from upop import cli
from upop.data import DataError
from upop.data.hf_datasets import classification_splits, retrieval_splits
from upop.runconfig import DataConfig, load_run_config
from upop.tasks import make_task

datasets = pytest.importorskip("datasets")
datasets.disable_progress_bars()  # save_to_disk's bars would mix with the error lines checked here

COLORS = ["red", "green", "blue"]
SHAPES = ["circle", "square"]
TRAIN = {"batch_size": 4, "eval_batch_size": 8, "dense_epochs": 0, "search_epochs": 1, "retrain_epochs": 1,
         "max_steps_per_epoch": 1}


def _image(color: str, shape: str, size: int = 24) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    (draw.ellipse if shape == "circle" else draw.rectangle)((4, 4, size - 4, size - 4), fill=color)
    return image


def _classification_split(n: int, features) -> "datasets.Dataset":
    rows = [(c, s) for c in range(len(COLORS)) for s in SHAPES] * n
    return datasets.Dataset.from_dict({"img": [_image(COLORS[c], s) for c, s in rows],
                                       "y": [c for c, _ in rows]}, features=features)


@pytest.fixture(scope="module")
def classification_folder(tmp_path_factory) -> Path:
    """A DatasetDict (train / validation / test) with an `img` Image column and a `y` ClassLabel column."""
    features = datasets.Features({"img": datasets.Image(), "y": datasets.ClassLabel(names=COLORS)})
    root = tmp_path_factory.mktemp("hf_cls") / "ds"
    datasets.DatasetDict(train=_classification_split(2, features), validation=_classification_split(1, features),
                         test=_classification_split(1, features)).save_to_disk(str(root))
    return root


def _retrieval_rows(offset: int) -> dict:
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    return {"image": [_image(c, s) for c, s in pairs],
            "captions": [[f"a {c} {s}", f"{s} in {c}"] for c, s in pairs],
            "key": [f"img{offset + i}" for i in range(len(pairs))]}


@pytest.fixture(scope="module")
def retrieval_folder(tmp_path_factory) -> Path:
    """A DatasetDict whose `captions` column lists the captions of each image."""
    root = tmp_path_factory.mktemp("hf_ret") / "ds"
    datasets.DatasetDict(train=datasets.Dataset.from_dict(_retrieval_rows(0)),
                         val=datasets.Dataset.from_dict(_retrieval_rows(100)),
                         test=datasets.Dataset.from_dict(_retrieval_rows(200))).save_to_disk(str(root))
    return root


def _write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _classification_config(root: Path, out: Path, **data) -> dict:
    return {"task": "classification", "output_dir": str(out), "model": {"preset": "tiny-vit"},
            "data": {"format": "hf_datasets", "root": str(root), "image_column": "img", "label_column": "y",
                     "image_size": 32, **data},
            "upop": {"target": 0.5, "interval": 1, "granularity": "head"}, "train": TRAIN,
            "eval": {"skip_latency": True}}


def _retrieval_config(root: Path, out: Path, **data) -> dict:
    return {"task": "retrieval", "output_dir": str(out), "model": {"preset": "tiny-dual"},
            "data": {"format": "hf_datasets", "root": str(root), "text_column": "captions", "image_size": 32,
                     "max_tokens": 8, **data},
            "upop": {"target": 0.5, "interval": 1}, "train": TRAIN, "eval": {"skip_latency": True}}


def _data(config: dict) -> DataConfig:
    return DataConfig(**config["data"])


# ---- end to end through the CLI ---------------------------------------------------------------------
def test_classification_from_a_saved_dataset(classification_folder, tmp_path):
    out = tmp_path / "run"
    config = _classification_config(classification_folder, out, splits={"val": "validation"})
    assert cli.main(["compress", "--config", str(_write(tmp_path, config))]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "classification" and 0 <= metrics["compressed"]["metrics"]["top1"] <= 100
    assert metrics["compressed"]["params"] < metrics["dense"]["params"]


def test_retrieval_from_a_saved_dataset_with_caption_lists(retrieval_folder, tmp_path):
    out = tmp_path / "run"
    config = _retrieval_config(retrieval_folder, out)
    assert cli.main(["compress", "--config", str(_write(tmp_path, config))]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["compressed"]["metrics"]["r_mean"] <= 100
    assert metrics["compressed"]["params"] < metrics["dense"]["params"]


# ---- readers -----------------------------------------------------------------------------------------
def test_classification_splits_follow_the_dataset(classification_folder):
    splits = classification_splits(_data(_classification_config(classification_folder, Path("x"))))
    assert splits["train"].classes == COLORS  # the ClassLabel names
    assert [len(splits[s]) for s in ("train", "val", "test")] == [12, 6, 6]  # "validation" found by default
    image, label = splits["test"][2]
    assert image.mode == "RGB" and label == 1


def test_integer_labels_and_a_single_saved_dataset(tmp_path):
    """A plain Dataset saved alone is the train split; integer labels name classes "0".."n-1"."""
    features = datasets.Features({"img": datasets.Image(), "y": datasets.Value("int64")})
    _classification_split(1, features).save_to_disk(str(tmp_path / "one"))
    data = _data(_classification_config(tmp_path / "one", Path("x"), splits={"test": "train"}))
    splits = classification_splits(data)
    assert splits["train"].classes == ["0", "1", "2"] and splits["val"] is None
    assert len(splits["test"]) == 6


def test_retrieval_rows_grouped_by_image_id(tmp_path):
    """Repeated rows (one caption each) of the same image id are one image with all its captions."""
    pairs = [("red", "circle"), ("red", "circle"), ("blue", "square"), ("red", "circle"), ("blue", "square")]
    rows = {"image": [_image(c, s) for c, s in pairs], "text": [f"{c} {s} {i}" for i, (c, s) in enumerate(pairs)],
            "image_id": [7, 7, 9, 7, 9]}
    split = datasets.Dataset.from_dict(rows)
    datasets.DatasetDict(train=split, val=split, test=split).save_to_disk(str(tmp_path / "ds"))
    data = _data({"data": {"format": "hf_datasets", "root": str(tmp_path / "ds"), "text_column": "text",
                           "image_id_column": "image_id"}})
    train, evals = retrieval_splits(data)
    assert [idx for *_, idx in (train.samples[i] for i in range(len(train)))] == [0, 0, 1, 0, 1]
    assert train.num_images == 2 and train[2][1] == "blue square 2"
    test = evals["test"]
    assert len(test) == 2 and test.img2txt == [[0, 1, 2], [3, 4]]
    assert test.texts == ["red circle 0", "red circle 1", "red circle 3", "blue square 2", "blue square 4"]
    assert test.txt2img == [0, 0, 0, 1, 1] and test[1][1] == 1


def test_an_image_folder_read_by_the_imagefolder_builder(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))  # never the user's
    for split, n in (("train", 2), ("test", 1)):
        for color in COLORS[:2]:
            for i in range(n):
                path = tmp_path / "images" / split / color / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                _image(color, SHAPES[i % 2]).save(path)
    data = _data({"data": {"format": "hf_datasets", "root": str(tmp_path / "images")}})
    splits = classification_splits(data)
    assert splits["train"].classes == ["green", "red"] and len(splits["train"]) == 4
    assert splits["val"] is None and len(splits["test"]) == 2


# ---- bad input: one line each --------------------------------------------------------------------------
def _one_line_error(config: dict, tmp_path: Path, capsys, expected: str) -> None:
    capsys.readouterr()
    assert cli.main(["compress", "--config", str(_write(tmp_path, config))]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize(("data", "expected"), [
    ({"label_column": "nope"}, "data.label_column 'nope': no such column in"),
    ({"image_column": "y"}, "data.image_column 'y' of"),
    ({"splits": {"val": "dev"}}, "data.splits.val: split 'dev' is not in"),
    ({"splits": {"tset": "test"}}, "data.splits: unknown run split 'tset'"),
])
def test_classification_bad_keys(classification_folder, tmp_path, capsys, data, expected):
    _one_line_error(_classification_config(classification_folder, tmp_path / "x", **data), tmp_path, capsys, expected)
    assert not (tmp_path / "x" / "metrics.json").exists()


def test_retrieval_bad_keys(retrieval_folder, tmp_path, capsys):
    base = _retrieval_config(retrieval_folder, tmp_path / "x")
    _one_line_error({**base, "data": {**base["data"], "text_column": "caption"}}, tmp_path, capsys,
                    "data.text_column 'caption': no such column in")
    _one_line_error({**base, "data": {**base["data"], "text_column": "key", "image_id_column": "image"}},
                    tmp_path, capsys, "data.image_id_column 'image' must hold strings or integers")


def test_a_label_column_of_strings_is_refused(tmp_path, capsys):
    split = datasets.Dataset.from_dict({"img": [_image("red", "circle")] * 2, "y": ["red", "blue"]})
    datasets.DatasetDict(train=split, test=split).save_to_disk(str(tmp_path / "ds"))
    _one_line_error(_classification_config(tmp_path / "ds", tmp_path / "x"), tmp_path, capsys,
                    "must be a ClassLabel or integer class ids (convert it: dataset.class_encode_column('y'))")


def test_not_a_dataset_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "state.json").write_text("{}")  # looks saved, is not
    _one_line_error(_classification_config(tmp_path / "empty", tmp_path / "x"), tmp_path, capsys,
                    "cannot read the dataset saved there")


def _with_a_broken_image(tmp_path: Path) -> Path:
    good = [_image(c, s) for c in COLORS for s in SHAPES]
    rows = {"img": [{"bytes": b"not an image", "path": None}] + good[1:], "y": [c for c in range(3) for _ in SHAPES]}
    features = datasets.Features({"img": datasets.Image(), "y": datasets.ClassLabel(names=COLORS)})
    split = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict(train=split, test=split).save_to_disk(str(tmp_path / "broken"))
    return tmp_path / "broken"


def test_an_image_that_fails_to_decode_stops_or_is_skipped(tmp_path, capsys):
    root = _with_a_broken_image(tmp_path)
    _one_line_error(_classification_config(root, tmp_path / "x"), tmp_path, capsys,
                    "split 'test' row 0: cannot decode image")
    splits = classification_splits(_data(_classification_config(root, Path("x"), on_bad_input="skip")))
    assert len(splits["test"]) == 5 and "row 0: cannot decode image" in splits["test"].skipped[0]
    assert splits["train"][0] is None  # training items are dropped by the collate function
    assert splits["train"][1][1] == 0


def test_missing_datasets_package_is_one_line(classification_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    _one_line_error(_classification_config(classification_folder, tmp_path / "x"), tmp_path, capsys,
                    "data.format hf_datasets needs the `datasets` package: pip install datasets")


# ---- ImageFolder: relative split folders are inside data.root --------------------------------------------
def test_imagefolder_split_folders_relative_to_root(tmp_path, monkeypatch):
    for split in ("train", "test"):
        for color in COLORS[:2]:
            for i in range(3):
                path = tmp_path / "data" / split / color / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                _image(color, SHAPES[i % 2]).save(path)
    monkeypatch.chdir(tmp_path)
    config = {"task": "classification", "model": {"preset": "tiny-vit"},
              "data": {"format": "imagefolder", "root": str(tmp_path / "data"), "train": "train", "test": "test",
                       "image_size": 32}}
    task = make_task(load_run_config(_write(tmp_path, config)))
    assert task.splits["test"].root == tmp_path / "data" / "test"
    # without data.root a relative folder is relative to the working directory
    config["data"].update(root=None, train="data/train", test=str(tmp_path / "data" / "test"))
    task = make_task(load_run_config(_write(tmp_path, config)))
    assert task.splits["test"].root == tmp_path / "data" / "test"
    assert task.splits["train"].dataset.root == Path("data/train")
    config["data"].update(root=str(tmp_path / "data"), train="nope")
    with pytest.raises(DataError, match=f"{tmp_path / 'data' / 'nope'}: image folder root not found"):
        make_task(load_run_config(_write(tmp_path, config)))


# ---- the user's own transforms ---------------------------------------------------------------------------
TRANSFORMS = '''
import torch
from torchvision import transforms as T

calls = {"train": 0, "eval": 0}


def train_tf(image):
    calls["train"] += 1
    return torch.full((3, 32, 32), 0.25)


eval_tf = T.Compose([T.Resize((32, 32)), T.ToTensor()])  # an object built at module level works too


def wrong_size(image):
    return torch.zeros(3, 16, 16)
'''


def test_user_transforms_replace_the_tasks(classification_folder, retrieval_folder, tmp_path, monkeypatch):
    (tmp_path / "my_transforms.py").write_text(TRANSFORMS)
    monkeypatch.syspath_prepend(str(tmp_path))
    import my_transforms

    config = _classification_config(classification_folder, tmp_path / "x", train_transform="my_transforms:train_tf",
                                     eval_transform="my_transforms:eval_tf")
    task = make_task(load_run_config(_write(tmp_path, config)))
    image, label = task.train_dataset()[0]
    assert torch.equal(image, torch.full((3, 32, 32), 0.25)) and my_transforms.calls["train"] >= 2  # checked once
    assert task._eval_tf is my_transforms.eval_tf
    config = _retrieval_config(retrieval_folder, tmp_path / "y", train_transform="my_transforms:train_tf",
                               eval_transform="my_transforms:eval_tf")
    task = make_task(load_run_config(_write(tmp_path, config)))
    assert task._train.transform is my_transforms.train_tf
    assert all(ds.transform is my_transforms.eval_tf for ds in task._eval.values())


@pytest.mark.parametrize(("spec", "expected"), [
    ("my_transforms", "data.train_transform must look like 'package.module:name'"),
    ("no_such_module_here:tf", "data.train_transform: cannot import 'no_such_module_here'"),
    ("my_transforms:nope", "data.train_transform: 'my_transforms' has no 'nope'"),
    ("my_transforms:calls", "is a dict, not a callable"),
    ("my_transforms:wrong_size", "returns a tensor torch.float32 (3, 16, 16); expected a float tensor (3, 32, 32)"),
])
def test_user_transform_errors(classification_folder, tmp_path, capsys, monkeypatch, spec, expected):
    (tmp_path / "my_transforms.py").write_text(TRANSFORMS)
    monkeypatch.syspath_prepend(str(tmp_path))
    _one_line_error(_classification_config(classification_folder, tmp_path / "x", train_transform=spec),
                    tmp_path, capsys, expected)


# ---- the user guide's data section runs as written ------------------------------------------------------
GUIDE = Path(__file__).resolve().parent.parent / "docs" / "user_guide.md"


def _guide_subsection(title: str) -> str:
    text = GUIDE.read_text()
    start = text.index(f"### {title}")
    end = text.find("\n#", start + 4)
    return text[start:end if end != -1 else None]


def test_user_guide_data_snippets(tmp_path, monkeypatch):
    import re

    monkeypatch.chdir(tmp_path)
    hf = _guide_subsection("Hugging Face `datasets`")
    (python,) = re.findall(r"```python\n(.*?)```", hf, flags=re.S)
    exec(compile(python, "docs/user_guide.md#hf_datasets", "exec"), {})
    (data,) = re.findall(r"```yaml\n(.*?)```", hf, flags=re.S)
    config = {"task": "classification", "model": {"preset": "tiny-vit"}, **yaml.safe_load(data)}
    config["data"]["image_size"] = 32
    task = make_task(load_run_config(_write(tmp_path, config)))
    assert task.classes == ["red", "green", "blue"] and len(task.splits["test"]) == 4
    for title in ("Classification: ImageFolder", "Your own image transforms"):  # every key exists, as written
        (data,) = re.findall(r"```yaml\n(.*?)```", _guide_subsection(title), flags=re.S)
        load_run_config(_write(tmp_path, {"task": "classification", "model": {"preset": "tiny-vit"},
                                          **yaml.safe_load(data)}))
