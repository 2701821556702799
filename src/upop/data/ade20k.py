"""Semantic-segmentation data in the official ADE20K (ADEChallengeData2016) folder layout:

    <root>/images/training/<name>.jpg        <root>/annotations/training/<name>.png
    <root>/images/validation/<name>.jpg      <root>/annotations/validation/<name>.png

Annotations are single-channel PNGs of class indices: 0 is "other" and is ignored, 1..K are the
K classes. As mmseg's `reduce_zero_label`, the loader maps 0 -> 255 (IGNORE_INDEX) and k -> k-1,
so the model predicts K classes 0..K-1. A value above K is an error (it would be a silent
out-of-range class otherwise).

Checks: missing folders, an image without its annotation (or an annotation without its image),
an annotation that is not a single-channel PNG, of another size than its image, or with labels
above K, and files that fail to decode. Every problem raises a one-line DataError naming the file;
with on_bad_input "skip" the example is dropped and counted instead. The evaluation splits are
decoded and checked completely up front (they are decoded at every evaluation anyway); training
annotations are checked as they are read, so a bad one stops (or is skipped in) the first epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._common import (
    DataError,
    check_mode,
    load_image,
    load_image_or_none,
    log_skipped,
    logger,
    one_line,
    require_dir,
)
from .formats import add_format

IGNORE_INDEX = 255
ADE20K_CLASSES = 150
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # the official release has .jpg; OpenMoji-derived data .png
SPLIT_FOLDERS = {"train": "training", "val": "validation"}


def load_annotation(path: Path, num_labels: int, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Decode an annotation PNG into a (H, W) int64 tensor of 0..num_labels-1 and IGNORE_INDEX.

    size: the (width, height) of its image; a mask of another size is an error.
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            mode = img.mode
            if mode not in ("L", "P", "I", "I;16"):
                raise DataError(f"{path}: annotation must be a single-channel label PNG, got mode {mode}")
            if size is not None and img.size != size:
                raise DataError(f"{path}: annotation is {img.size[0]}x{img.size[1]}, "
                                f"its image is {size[0]}x{size[1]}")
            raw = np.asarray(img, dtype=np.int64)  # "P": the palette indices are the labels
    except DataError:
        raise
    except FileNotFoundError as exc:
        raise DataError(f"{path}: annotation file not found") from exc
    except Exception as exc:  # Pillow's decoders raise OSError, ValueError, SyntaxError, ...
        raise DataError(f"{path}: cannot decode annotation: {one_line(exc) or type(exc).__name__}") from exc
    top = int(raw.max()) if raw.size else 0
    if top > num_labels:
        raise DataError(f"{path}: label {top} above the class count {num_labels} "
                        "(labels are 0 = ignored, 1..K; set model.num_labels)")
    labels = torch.from_numpy(raw - 1)
    labels[labels < 0] = IGNORE_INDEX  # reduce_zero_label: 0 "other" is ignored
    return labels


class ADE20KDataset(torch.utils.data.Dataset):
    """One split of an ADE20K-layout folder: items are (PIL RGB image, (H, W) int64 label tensor).

    `transform(image, labels)` (joint, for segmentation) is applied when set. Items whose files fail
    to decode are None under on_bad_input "skip" (wrap the collate with `drop_none`).
    """

    def __init__(self, root: str | Path, split: str, num_labels: int = ADE20K_CLASSES, on_bad_input: str = "stop",
                 check: bool = False) -> None:
        self.root = Path(root).expanduser()
        self.split, self.num_labels = split, num_labels
        self.on_bad_input = check_mode(on_bad_input)
        self.transform: Any = None
        self.skipped: list[str] = []
        require_dir(self.root, "ADE20K root")
        image_dir = require_dir(self.root / "images" / split, "ADE20K image folder")
        label_dir = require_dir(self.root / "annotations" / split, "ADE20K annotation folder")
        images = {p.stem: p for p in sorted(image_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
        labels = {p.stem: p for p in sorted(label_dir.iterdir()) if p.suffix.lower() == ".png"}
        pairs, problems = [], []
        for stem, image in images.items():
            if stem in labels:
                pairs.append((image, labels[stem]))
            else:
                problems.append(f"{image}: image has no annotation {label_dir / (stem + '.png')}")
        problems += [f"{path}: annotation has no image in {image_dir}" for stem, path in labels.items()
                     if stem not in images]
        self._bad(problems)
        if not pairs:
            raise DataError(f"{image_dir}: no images ({', '.join(IMAGE_SUFFIXES)}) with annotations")
        if check:  # decode every pair now: bad files fail before any training
            errors = _check_pairs(pairs, num_labels)
            self._bad([errors[i] for i in sorted(errors)])
            pairs = [pair for i, pair in enumerate(pairs) if i not in errors]
            if not pairs:
                raise DataError(f"{image_dir}: every image-annotation pair was skipped as unreadable")
        self.pairs = pairs

    def _bad(self, problems: Sequence[str]) -> None:
        if not problems:
            return
        if self.on_bad_input == "stop":
            raise DataError(problems[0])
        self.skipped += list(problems)
        log_skipped(self.root / "images" / self.split, problems, "bad image-annotation pairs")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        image_path, label_path = self.pairs[i]
        image = load_image_or_none(image_path, self.on_bad_input, self.skipped)
        if image is None:
            return None
        try:
            labels = load_annotation(label_path, self.num_labels, image.size)
        except DataError as exc:
            if self.on_bad_input != "skip":
                raise
            self.skipped.append(str(exc))
            logger.warning("%s (data.on_bad_input: skip: item dropped)", exc)
            return None
        return self.transform(image, labels) if self.transform is not None else (image, labels)


def _check_pairs(pairs: list[tuple[Path, Path]], num_labels: int) -> dict[int, str]:
    """index -> one-line error for the pairs whose image or annotation is unusable (a few threads)."""
    def check(pair: tuple[Path, Path]) -> str | None:
        try:
            image = load_image(pair[0])
            load_annotation(pair[1], num_labels, image.size)
        except DataError as exc:
            return str(exc)
        return None

    with ThreadPoolExecutor(max_workers=max(1, min(4, len(pairs)))) as pool:
        results = list(pool.map(check, pairs))
    return {i: r for i, r in enumerate(results) if r is not None}


add_format("ade20k", ("root",), "ADEChallengeData2016 folder")
