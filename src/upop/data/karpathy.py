"""Image-text retrieval data in the COCO / Flickr30K "Karpathy split" JSON format used by BLIP and UPop.

train file: a list of {"image": "relative/path.jpg", "caption": "a string", "image_id": str | int},
one entry per caption (`image_id` is optional; the image path is used when it is absent).
val/test file: a list of {"image": "relative/path.jpg", "caption": ["cap 1", "cap 2", ...]}, one entry per image.

Both files are checked completely when the dataset is built (structure, types, non-empty captions,
existence of every image file); images are decoded lazily in `__getitem__`. `on_bad_input` says what
a missing image, an empty caption or an undecodable image does: "stop" (DataError) or "skip" (dropped).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ._common import (
    DataError,
    check_mode,
    is_file,
    load_image,
    load_image_or_none,
    log_skipped,
    read_json,
    require_dir,
    undecodable,
)
from .formats import add_format

_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})


def pre_caption(text: str, max_words: int = 30) -> str:
    """Normalise a caption: lowercase, punctuation and symbols (except apostrophes) to spaces,
    whitespace collapsed, at most `max_words` words."""
    if max_words < 1:
        raise ValueError(f"max_words must be >= 1, got {max_words}")
    text = text.lower().translate(_APOSTROPHES)
    # Unicode categories P* (punctuation) and S* (symbols) cover ASCII and non-ASCII marks alike.
    chars = (" " if ch != "'" and unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    return " ".join("".join(chars).split()[:max_words])


def _entries(ann_file: Path, split_kind: str) -> list[Any]:
    data = read_json(ann_file)
    if not isinstance(data, list):
        raise DataError(f"{ann_file}: expected a JSON list of {split_kind} entries, got {type(data).__name__}")
    if not data:
        raise DataError(f"{ann_file}: contains no entries")
    return data


def _image_path(ann_file: Path, i: int, entry: Any, image_root: Path,
                checked: dict[str, bool]) -> tuple[Path, str | None]:
    """The entry's image path and, if the file does not exist, the problem (one line)."""
    if not isinstance(entry, dict):
        raise DataError(f"{ann_file}: entry {i}: expected an object, got {type(entry).__name__}")
    if "image" not in entry:
        raise DataError(f"{ann_file}: entry {i}: missing key 'image'")
    rel = entry["image"]
    if not isinstance(rel, str) or not rel.strip():
        raise DataError(f"{ann_file}: entry {i}: 'image' must be a non-empty string, got {rel!r}")
    if "caption" not in entry:
        raise DataError(f"{ann_file}: entry {i}: missing key 'caption'")
    path = image_root / rel
    if rel not in checked:  # stat each distinct image once (COCO train has 5 entries per image)
        checked[rel] = is_file(path)
    return path, None if checked[rel] else f"{ann_file}: entry {i}: image file not found: {path}"


def _caption(ann_file: Path, where: str, raw: Any, max_words: int) -> tuple[str, str | None]:
    """The normalised caption and, if it is empty, the problem (one line)."""
    if not isinstance(raw, str):
        raise DataError(f"{ann_file}: {where}: caption must be a string, got {type(raw).__name__}")
    caption = pre_caption(raw, max_words)
    if not caption:
        return "", f"{ann_file}: {where}: caption is empty" + (" after normalisation" if raw.strip() else "")
    return caption, None


class _BadInputs:
    """The on_bad_input policy of one dataset: "stop" raises the problem, "skip" records it in `skipped`."""

    on_bad_input: str
    skipped: list[str]

    def _bad(self, problem: str) -> None:
        if self.on_bad_input == "stop":
            raise DataError(problem)
        self.skipped.append(problem)

    def _none_left(self, source: Path, what: str) -> DataError:
        return DataError(f"{source}: no usable {what} left: all were skipped as bad input "
                         f"(first: {self.skipped[0] if self.skipped else '-'})")


class KarpathyTrain(_BadInputs, Dataset):
    """Training captions: item i is (image, caption, image_index).

    `image_index` is a contiguous id per distinct image_id (in order of first appearance), so a
    contrastive loss can treat captions of the same image as positives. The image is a PIL RGB image,
    or whatever `transform` (settable after construction) returns.

    on_bad_input "stop" (default): a missing image file or an empty caption raises DataError naming
    the file and entry; an image that fails to decode raises DataError naming its path when loaded.
    "skip": such entries are dropped at construction (listed in `skipped` and logged as one warning
    on the "upop" logger), and an image that fails to decode makes `__getitem__` return None
    (drop those with `upop.data.drop_none(collate_fn)`). Malformed files and entries (wrong types,
    missing keys) raise DataError in both modes.
    """

    def __init__(self, ann_file: str | Path, image_root: str | Path, transform: Callable | None = None,
                 max_words: int = 30, on_bad_input: str = "stop") -> None:
        self.ann_file, self.image_root = Path(ann_file), Path(image_root)
        self.transform = transform
        self.on_bad_input = check_mode(on_bad_input)
        self.skipped: list[str] = []  # one line per dropped entry (and per image skipped when loading)
        require_dir(self.image_root, "image root")
        checked: dict[str, bool] = {}
        index_of: dict[Any, int] = {}
        self.image_ids: list[str | int] = []  # distinct image ids; position = image_index
        self.samples: list[tuple[Path, str, int]] = []
        for i, entry in enumerate(_entries(self.ann_file, "train")):
            path, problem = _image_path(self.ann_file, i, entry, self.image_root, checked)
            raw = entry["caption"]
            if isinstance(raw, list):
                raise DataError(f"{self.ann_file}: entry {i}: caption must be a string, got a list "
                                "(a val/test file? train files have one entry per caption)")
            caption, caption_problem = _caption(self.ann_file, f"entry {i}", raw, max_words)
            image_id = entry.get("image_id", entry["image"])
            # bool is an int subclass, and 1/True or 1/"1" mixing would silently merge or split images
            if isinstance(image_id, bool) or not isinstance(image_id, (str, int)):
                raise DataError(f"{self.ann_file}: entry {i}: 'image_id' must be a string or an integer, "
                                f"got {type(image_id).__name__}")
            if problem or caption_problem:
                self._bad(problem or caption_problem)
                continue
            idx = index_of.setdefault((type(image_id), image_id), len(index_of))
            if idx == len(self.image_ids):
                self.image_ids.append(image_id)
            self.samples.append((path, caption, idx))
        if not self.samples:
            raise self._none_left(self.ann_file, "entries")
        log_skipped(self.ann_file, self.skipped)

    @property
    def num_images(self) -> int:
        return len(self.image_ids)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, str, int] | None:
        path, caption, idx = self.samples[i]
        image = load_image_or_none(path, self.on_bad_input, self.skipped)
        if image is None:
            return None
        return (self.transform(image) if self.transform else image), caption, idx


class KarpathyEval(_BadInputs, Dataset):
    """Val/test split: items are (image, i) over images; captions are in `texts`.

    `images[i]` is the path of image i, `texts` the flat list of captions, `img2txt[i]` the indices
    of image i's captions in `texts`, `txt2img[t]` the image of caption t.

    on_bad_input "stop" (default): a missing image file or an empty caption raises DataError naming
    the file and entry. "skip": an entry whose image file is missing is dropped, an empty caption is
    dropped, and an image left without captions is dropped; every image is also decoded once at
    construction and those that fail are dropped, so that items never fail later and the indices
    stay consistent. Dropped entries are listed in `skipped` and logged as one warning.
    check_images: decode every image at construction (None: only under "skip"); under "stop" the
    first image that fails raises DataError. Items never return None.
    """

    def __init__(self, ann_file: str | Path, image_root: str | Path, transform: Callable | None = None,
                 max_words: int = 30, on_bad_input: str = "stop", check_images: bool | None = None) -> None:
        self.ann_file, self.image_root = Path(ann_file), Path(image_root)
        self.transform = transform
        self.on_bad_input = check_mode(on_bad_input)
        self.skipped: list[str] = []
        require_dir(self.image_root, "image root")
        checked: dict[str, bool] = {}
        first_entry: dict[str, int] = {}
        kept: list[tuple[int, Path, list[str]]] = []  # (entry, image path, captions)
        for i, entry in enumerate(_entries(self.ann_file, "val/test")):
            path, problem = _image_path(self.ann_file, i, entry, self.image_root, checked)
            # a repeated image would split its captions over two "images" and corrupt the recall ground truth
            if entry["image"] in first_entry:
                raise DataError(f"{self.ann_file}: entry {i}: image {entry['image']!r} already listed in entry "
                                f"{first_entry[entry['image']]} (val/test files have one entry per image)")
            first_entry[entry["image"]] = i
            raw = entry["caption"]
            if not isinstance(raw, list):
                hint = " (a train file? val/test files list all captions of an image)" if isinstance(raw, str) else ""
                raise DataError(f"{self.ann_file}: entry {i}: caption must be a list of strings, "
                                f"got {type(raw).__name__}{hint}")
            captions = [_caption(self.ann_file, f"entry {i} caption {j}", cap, max_words) for j, cap in enumerate(raw)]
            if problem:
                self._bad(problem)
                continue
            if not raw:
                self._bad(f"{self.ann_file}: entry {i}: caption list is empty")
                continue
            good = [c for c, bad in captions if not bad]
            if not good and self.on_bad_input == "skip":  # one record for the image, not one per caption
                self._bad(f"{self.ann_file}: entry {i}: every caption is empty (image {path} dropped)")
                continue
            for _, bad in captions:
                if bad:
                    self._bad(bad)
            kept.append((i, path, good))
        if check_images is None:
            check_images = self.on_bad_input == "skip"
        if check_images:
            failed = undecodable([path for _, path, _ in kept])
            for i, path, _ in kept:
                if path in failed:
                    self._bad(f"{self.ann_file}: entry {i}: {failed[path]}")
            kept = [k for k in kept if k[1] not in failed]
        if not kept:
            raise self._none_left(self.ann_file, "images")
        self.images: list[Path] = []
        self.texts: list[str] = []
        self.img2txt: list[list[int]] = []
        self.txt2img: list[int] = []
        for _, path, captions in kept:
            self.img2txt.append(list(range(len(self.texts), len(self.texts) + len(captions))))
            self.texts.extend(captions)
            self.txt2img.extend([len(self.images)] * len(captions))
            self.images.append(path)
        log_skipped(self.ann_file, self.skipped)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image = load_image(self.images[i])
        return (self.transform(image) if self.transform else image), i


add_format("karpathy", ("root", "train", "val", "test"), "COCO / Flickr30K Karpathy-split JSON (BLIP's files)")
