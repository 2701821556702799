"""Hugging Face `datasets` data (`data.format: hf_datasets`), read from a local folder, never the hub.

`data.root` is either a dataset saved with `save_to_disk` (a `DatasetDict`; a single `Dataset` is
its "train" split) or a folder of images that datasets' own "imagefolder" builder reads (class
subfolders, split folders such as train/ validation/ test/, a metadata.jsonl or .csv with captions).
The columns are configurable: `data.image_column` (a `datasets.Image` column), `data.label_column`
(classification: a `ClassLabel` or integer class ids), `data.text_column` (retrieval: one caption per
row, or a list of captions), `data.image_id_column` (retrieval: rows with the same id are one image's
captions). `data.splits` maps the run's splits to the dataset's (default: train; validation or val;
test).

Items are those of the other readers (ImageFolderDataset for classification, KarpathyTrain /
KarpathyEval for retrieval), so a task reads either the same way. Images are decoded here, not by
`datasets`, so that one that fails follows `data.on_bad_input` as in the other readers. The `datasets`
package is imported only when such data is read.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ._common import DataError, check_mode, load_image, load_image_or_none, log_skipped, one_line, require_dir
from .formats import FORMATS, DataFormat
from .karpathy import _BadInputs, pre_caption

RUN_SPLITS = ("train", "val", "test")
DEFAULT_SPLITS = {"train": ("train",), "val": ("validation", "val"), "test": ("test",)}
_CHECK_THREADS = 8


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError("data.format hf_datasets needs the `datasets` package: pip install datasets") from None
    return datasets


@dataclass(frozen=True)
class HFDataFormat(DataFormat):
    """The hf_datasets format also checks its own keys (data.splits, the column names) before any data is read."""

    def check(self, data: Any) -> None:
        super().check(data)
        for run_split, name in data.splits.items():
            if run_split not in RUN_SPLITS:
                raise DataError(f"data.splits: unknown run split {run_split!r} (known: {', '.join(RUN_SPLITS)})")
            if not isinstance(name, str) or not name:
                raise DataError(f"data.splits.{run_split} must be a split name (a string), got {name!r}")
        for key in ("image_column", "label_column", "text_column", "image_id_column"):
            if getattr(data, key) == "":
                raise DataError(f"data.{key} must not be empty")


FORMATS.add("hf_datasets", HFDataFormat(
    "hf_datasets", ("root",), "a Hugging Face datasets folder (save_to_disk, or images read by its imagefolder "
    "builder); data.image_column / label_column / text_column / image_id_column, data.splits"))


@dataclass
class HFSplit:
    """One split of the dataset: `name` in the dataset, `where` names it in messages."""

    name: str
    dataset: Any  # a datasets.Dataset
    where: str

    def column(self, key: str, column: str) -> Any:
        """The feature of `column`; a one-line DataError naming data.<key> when the split has none."""
        features = self.dataset.features
        if column not in features:
            raise DataError(f"data.{key} {column!r}: no such column in {self.where} "
                            f"(columns: {', '.join(features)})")
        return features[column]

    def values(self, column: str) -> list[Any]:
        return list(self.dataset.select_columns([column])[column])

    def raw_images(self, column: str) -> Any:
        """The image column undecoded ({"bytes", "path"} per row): decoding stays here, under on_bad_input."""
        feature = self.column("image_column", column)
        if type(feature).__name__ != "Image":
            raise DataError(f"data.image_column {column!r} of {self.where} holds {feature}, not images; "
                            f"cast it: dataset.cast_column({column!r}, datasets.Image())")
        return self.dataset.select_columns([column]).cast_column(column, _datasets().Image(decode=False))


def load_splits(data: Any, required: Sequence[str]) -> dict[str, HFSplit | None]:
    """Run split -> the dataset's split (None: not given and not found under a default name).
    Splits in `required` must exist; a name given in data.splits must exist."""
    root = require_dir(Path(data.root).expanduser(), "data.root (the hf_datasets folder)")
    ds = _datasets()
    if (root / "dataset_dict.json").is_file() or (root / "state.json").is_file():
        try:
            loaded = ds.load_from_disk(str(root))
        except Exception as exc:  # datasets raises FileNotFoundError, ValueError, pyarrow errors, ...
            raise DataError(f"{root}: cannot read the dataset saved there: {one_line(exc)}") from exc
        if isinstance(loaded, ds.Dataset):
            loaded = {"train": loaded}
        how = "saved dataset"
    else:
        try:
            loaded = ds.load_dataset("imagefolder", data_dir=str(root))
        except Exception as exc:
            raise DataError(f"{root}: neither a dataset saved with save_to_disk nor an image folder datasets' "
                            f"imagefolder builder reads: {one_line(exc)}") from exc
        how = "image folder"
    names = list(loaded.keys())
    out: dict[str, HFSplit | None] = {}
    for run_split in RUN_SPLITS:
        name = data.splits.get(run_split)
        if name is not None and name not in loaded:
            raise DataError(f"data.splits.{run_split}: split {name!r} is not in {root} "
                            f"(its splits: {', '.join(names)})")
        if name is None:
            name = next((n for n in DEFAULT_SPLITS[run_split] if n in loaded), None)
        if name is None and run_split in required:
            raise DataError(f"{root}: no {run_split} split (its splits: {', '.join(names)}); "
                            f"name the one to use with data.splits.{run_split}")
        out[run_split] = None if name is None else HFSplit(name, loaded[name], f"{root} ({how}) split {name!r}")
    return out


# ---- images ------------------------------------------------------------------------------------
def decode_image(value: Any, where: str) -> Any:
    """An undecoded datasets.Image value ({"bytes", "path"}) as a PIL RGB image; DataError naming `where`."""
    data, path = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (None, None)
    if data is None and not path:
        raise DataError(f"{where}: no image")
    if data is not None:
        return load_image(io.BytesIO(data), where)
    return load_image(path, f"{where}: {path}")


class _Images:
    """Lazy images of one split (picklable for DataLoader workers: the arrow data is memory-mapped)."""

    def __init__(self, split: HFSplit, column: str) -> None:
        self.rows, self.column, self.where = split.raw_images(column), column, split.where

    def load(self, row: int) -> Any:
        return decode_image(self.rows[row][self.column], f"{self.where} row {row}")

    def load_or_none(self, row: int, on_bad_input: str, skipped: list[str]) -> Any:
        return load_image_or_none(row, on_bad_input, skipped, loader=self.load)

    def undecodable(self, rows: Sequence[int]) -> dict[int, str]:
        """Decode the images of `rows` (a few threads: Pillow releases the GIL); row -> error line."""
        def check(row: int) -> str | None:
            try:
                self.load(row)
            except DataError as exc:
                return str(exc)
            return None

        with ThreadPoolExecutor(max_workers=max(1, min(_CHECK_THREADS, len(rows)))) as pool:
            results = list(pool.map(check, rows))
        return {r: e for r, e in zip(rows, results, strict=True) if e is not None}


# ---- classification ------------------------------------------------------------------------------
class HFImageClassification(Dataset):
    """Items are (image, label), as ImageFolderDataset's; `classes` are the ClassLabel names (integer
    labels: "0" .. str(num_classes - 1)).

    on_bad_input and check_images as in ImageFolderDataset: under "stop" an image that fails to decode
    raises DataError naming the split and row; under "skip" `__getitem__` returns None for it
    (check_images: decode every image now and drop the failures, so items never return None).
    """

    def __init__(self, split: HFSplit, image_column: str = "image", label_column: str = "label",
                 transform: Callable | None = None, on_bad_input: str = "stop", check_images: bool = False,
                 num_classes: int | None = None) -> None:
        self.where, self.transform = split.where, transform
        self.on_bad_input = check_mode(on_bad_input)
        self.skipped: list[str] = []
        feature = split.column("label_column", label_column)
        labels = split.values(label_column)
        names = getattr(feature, "names", None)
        if names is not None:  # a ClassLabel
            self.classes = list(names)
        elif str(getattr(feature, "dtype", "")).startswith(("int", "uint")):
            count = num_classes if num_classes is not None else max(labels, default=-1) + 1
            self.classes = [str(i) for i in range(count)]
        else:
            raise DataError(f"data.label_column {label_column!r} of {split.where} holds {feature}; it must be "
                            f"a ClassLabel or integer class ids (convert it: "
                            f"dataset.class_encode_column({label_column!r}))")
        for row, label in enumerate(labels):
            if label is None or not 0 <= label < len(self.classes):
                raise DataError(f"{split.where} row {row}: label {label!r} is not a class id "
                                f"in [0, {len(self.classes)})")
        self.images = _Images(split, image_column)
        self.samples: list[tuple[int, int]] = list(enumerate(labels))  # (row, label)
        if check_images:
            failed = self.images.undecodable([row for row, _ in self.samples])
            if failed and self.on_bad_input == "stop":
                raise DataError(failed[min(failed)])
            self.skipped.extend(failed[row] for row in sorted(failed))
            self.samples = [(row, label) for row, label in self.samples if row not in failed]
            log_skipped(split.where, self.skipped, "undecodable images")
        if not self.samples:
            raise DataError(f"{split.where}: no examples" + (f" left (first failure: {self.skipped[0]})"
                                                              if self.skipped else ""))
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int] | None:
        row, label = self.samples[i]
        image = self.images.load_or_none(row, self.on_bad_input, self.skipped)
        if image is None:
            return None
        return (self.transform(image) if self.transform else image), label


def classification_splits(data: Any) -> dict[str, HFImageClassification | None]:
    """Train, val (None: not in the dataset) and test of a classification run; evaluation splits are
    decoded now, so that their indices stay fixed under "skip". Their classes must be train's."""
    splits = load_splits(data, required=("train", "test"))
    train = HFImageClassification(splits["train"], data.image_column, data.label_column,
                                  on_bad_input=data.on_bad_input)
    out: dict[str, HFImageClassification | None] = {"train": train}
    for s in ("val", "test"):
        split = splits[s]
        out[s] = None if split is None else HFImageClassification(
            split, data.image_column, data.label_column, on_bad_input=data.on_bad_input, check_images=True,
            num_classes=len(train.classes))
        if out[s] is not None and out[s].classes != train.classes:
            raise DataError(f"{split.where}: classes {out[s].classes} differ from the train split's {train.classes}")
    return out


# ---- retrieval ------------------------------------------------------------------------------------
def _captions_per_row(split: HFSplit, column: str, max_words: int) -> list[list[tuple[str, str | None]]]:
    """Per row: (normalised caption, problem or None) for each caption of the row."""
    feature = split.column("text_column", column)
    inner = getattr(feature, "feature", None)  # List / Sequence of strings
    if getattr(feature, "dtype", None) not in ("string", "large_string") and \
            getattr(inner, "dtype", None) not in ("string", "large_string"):
        raise DataError(f"data.text_column {column!r} of {split.where} holds {feature}; "
                        "it must be a caption (string) or a list of captions")
    rows = []
    for row, value in enumerate(split.values(column)):
        texts = [value] if isinstance(value, str) or value is None else list(value)
        caps = []
        for j, raw in enumerate(texts):
            caption = pre_caption(raw, max_words) if isinstance(raw, str) else ""
            where = f"{split.where} row {row}" + (f" caption {j}" if len(texts) > 1 else "")
            caps.append((caption, None if caption else f"{where}: caption is empty"))
        if not texts:
            caps.append(("", f"{split.where} row {row}: caption list is empty"))
        rows.append(caps)
    return rows


def _image_keys(split: HFSplit, column: str | None) -> list[Any]:
    """Per row, the key of its image: the row itself, or its data.image_id_column value."""
    if column is None:
        return list(range(len(split.dataset)))
    split.column("image_id_column", column)
    keys = split.values(column)
    for row, key in enumerate(keys):
        # bool is an int subclass, and 1/True or 1/"1" mixing would silently merge or split images
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise DataError(f"{split.where} row {row}: data.image_id_column {column!r} must hold strings or "
                            f"integers, got {type(key).__name__}")
    return [(type(k), k) for k in keys]


class HFRetrievalTrain(_BadInputs, Dataset):
    """Training captions, as KarpathyTrain's: item i is (image, caption, image_index); captions of the
    same image (a list column, or rows with the same data.image_id_column value) are positives.
    An empty caption follows on_bad_input when the dataset is built, an undecodable image when loaded."""

    def __init__(self, split: HFSplit, image_column: str = "image", text_column: str = "caption",
                 image_id_column: str | None = None, transform: Callable | None = None, max_words: int = 30,
                 on_bad_input: str = "stop") -> None:
        self.where, self.transform = split.where, transform
        self.on_bad_input = check_mode(on_bad_input)
        self.skipped: list[str] = []
        captions = _captions_per_row(split, text_column, max_words)
        keys = _image_keys(split, image_id_column)
        self.images = _Images(split, image_column)
        index_of: dict[Any, int] = {}
        self.samples: list[tuple[int, str, int]] = []  # (row, caption, image_index)
        for row, caps in enumerate(captions):
            for caption, problem in caps:
                if problem:
                    self._bad(problem)
                    continue
                self.samples.append((row, caption, index_of.setdefault(keys[row], len(index_of))))
        if not self.samples:
            raise DataError(f"{split.where}: no usable captions "
                            f"(first problem: {self.skipped[0] if self.skipped else '-'})")
        self.num_images = len(index_of)
        log_skipped(split.where, self.skipped)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, str, int] | None:
        row, caption, idx = self.samples[i]
        image = self.images.load_or_none(row, self.on_bad_input, self.skipped)
        if image is None:
            return None
        return (self.transform(image) if self.transform else image), caption, idx


class HFRetrievalEval(_BadInputs, Dataset):
    """A val/test split, as KarpathyEval's: items are (image, i) over distinct images (the first row of
    each data.image_id_column value); `texts`, `img2txt`, `txt2img` as there. Under "skip" empty
    captions are dropped, then images left without captions, and every image is decoded now (those
    that fail are dropped) so that items never fail later; under "stop" the first problem raises."""

    def __init__(self, split: HFSplit, image_column: str = "image", text_column: str = "caption",
                 image_id_column: str | None = None, transform: Callable | None = None, max_words: int = 30,
                 on_bad_input: str = "stop", check_images: bool | None = None) -> None:
        self.where, self.transform = split.where, transform
        self.on_bad_input = check_mode(on_bad_input)
        self.skipped: list[str] = []
        captions = _captions_per_row(split, text_column, max_words)
        keys = _image_keys(split, image_id_column)
        self.images = _Images(split, image_column)
        grouped: dict[Any, tuple[int, list[str]]] = {}  # image key -> (first row, good captions)
        for row, caps in enumerate(captions):
            good = grouped.setdefault(keys[row], (row, []))[1]
            for caption, problem in caps:
                if problem:
                    self._bad(problem)
                else:
                    good.append(caption)
        kept = [(row, caps) for row, caps in grouped.values() if caps]
        for row, caps in grouped.values():
            if not caps:
                self._bad(f"{split.where} row {row}: image left without captions (dropped)")
        if check_images is None:
            check_images = self.on_bad_input == "skip"
        if check_images:
            failed = self.images.undecodable([row for row, _ in kept])
            for row in sorted(failed):
                self._bad(failed[row])
            kept = [k for k in kept if k[0] not in failed]
        if not kept:
            raise DataError(f"{split.where}: no usable images left: all were skipped as bad input "
                            f"(first: {self.skipped[0] if self.skipped else '-'})")
        self.rows: list[int] = []
        self.texts: list[str] = []
        self.img2txt: list[list[int]] = []
        self.txt2img: list[int] = []
        for row, caps in kept:
            self.img2txt.append(list(range(len(self.texts), len(self.texts) + len(caps))))
            self.texts.extend(caps)
            self.txt2img.extend([len(self.rows)] * len(caps))
            self.rows.append(row)
        log_skipped(split.where, self.skipped)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image = self.images.load(self.rows[i])
        return (self.transform(image) if self.transform else image), i


def retrieval_splits(data: Any) -> tuple[HFRetrievalTrain, dict[str, HFRetrievalEval]]:
    """Train / val / test of a retrieval run (as upop.tasks.base.karpathy_splits returns them)."""
    splits = load_splits(data, required=RUN_SPLITS)
    columns = {"image_column": data.image_column, "text_column": data.text_column,
               "image_id_column": data.image_id_column, "on_bad_input": data.on_bad_input}
    train = HFRetrievalTrain(splits["train"], **columns)
    return train, {s: HFRetrievalEval(splits[s], **columns) for s in ("val", "test")}
