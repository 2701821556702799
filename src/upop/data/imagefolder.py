"""Image classification from a folder tree: root/<class name>/**/<image>, plus top-k accuracy."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ._common import DataError, check_mode, load_image_or_none, log_skipped, require_dir, undecodable
from .formats import add_format

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".gif", ".tif", ".tiff", ".webp")


class ImageFolderDataset(Dataset):
    """Items are (image, label); label = index of the class folder in sorted `classes`.

    Checked at construction: the root exists, it has at least 2 class folders, and every class
    holds at least one image file (searched recursively; hidden files and folders are ignored).
    Images are decoded lazily, as PIL RGB images unless a `transform` is given.

    on_bad_input "stop" (default): an image that fails to decode raises DataError naming its path.
    "skip": `__getitem__` returns None for it instead (drop those with `upop.data.drop_none(collate_fn)`);
    it is recorded in `skipped` and logged on the "upop" logger.
    check_images: decode every image at construction (meant for evaluation splits, which are small):
    under "stop" the first failure raises DataError, under "skip" the failures are dropped from
    `samples` (and listed in `skipped`), so that items never return None.
    """

    def __init__(self, root: str | Path, transform: Callable | None = None,
                 extensions: Iterable[str] = IMG_EXTENSIONS, on_bad_input: str = "stop",
                 check_images: bool = False) -> None:
        self.root = require_dir(Path(root), "image folder root")
        self.transform = transform
        self.on_bad_input = check_mode(on_bad_input)
        self.skipped: list[str] = []
        exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
        self.classes: list[str] = sorted(
            d.name for d in self.root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if len(self.classes) < 2:
            raise DataError(f"{self.root}: expected at least 2 class subfolders, found {len(self.classes)}"
                            + (f" ({self.classes[0]!r})" if self.classes else ""))
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples: list[tuple[Path, int]] = []
        for label, name in enumerate(self.classes):
            files = _find_images(self.root / name, exts)
            if not files:
                raise DataError(f"{self.root / name}: class folder holds no image files ({', '.join(exts)})")
            self.samples.extend((f, label) for f in files)
        if check_images:
            failed = undecodable([path for path, _ in self.samples])
            if failed and self.on_bad_input == "stop":
                raise DataError(next(failed[path] for path, _ in self.samples if path in failed))
            self.skipped.extend(failed[path] for path, _ in self.samples if path in failed)
            self.samples = [(path, label) for path, label in self.samples if path not in failed]
            empty = [c for label, c in enumerate(self.classes) if all(lab != label for _, lab in self.samples)]
            if empty:
                raise DataError(f"{self.root / empty[0]}: class folder holds no image that decodes "
                                f"(first failure: {self.skipped[0]})")
            log_skipped(self.root, self.skipped, "undecodable images")
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int] | None:
        path, label = self.samples[i]
        image = load_image_or_none(path, self.on_bad_input, self.skipped)
        if image is None:
            return None
        return (self.transform(image) if self.transform else image), label


def split_folder(folder: str | None, root: str | None) -> Path | None:
    """The folder of an imagefolder split (data.train / val / test): a relative one is inside
    data.root when that is set, else relative to the working directory; None stays None."""
    if not folder:
        return None
    path = Path(folder).expanduser()
    return Path(root).expanduser() / path if root and not path.is_absolute() else path


def _find_images(folder: Path, exts: tuple[str, ...]) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # sorted: a stable sample order
        found.extend(Path(dirpath, f) for f in sorted(filenames)
                     if not f.startswith(".") and f.lower().endswith(exts))
    return found


add_format("imagefolder", ("train", "test"), "one folder per class in each of data.train / data.test (data.val "
           "optional), relative to data.root when it is set")
