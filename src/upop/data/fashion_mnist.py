"""Fashion-MNIST read from the Debian package `dataset-fashion-mnist` (idx files, gzipped or not).

Install it with `apt-get install dataset-fashion-mnist`, or point UPOP_FASHION_MNIST_DIR at a folder
holding train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-images-idx3-ubyte[.gz] and
t10k-labels-idx1-ubyte[.gz].
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ._common import DataError, one_line
from .formats import add_format

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
ENV_VAR = "UPOP_FASHION_MNIST_DIR"
SEARCH_DIRS = (  # where the Debian package (and local installs) put it
    Path("/usr/share/datasets/fashion-mnist"),
    Path("/usr/local/share/datasets/fashion-mnist"),
    Path("/usr/share/fashion-mnist"),
)
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
INSTALL_HINT = f"install it with `apt-get install dataset-fashion-mnist` or set {ENV_VAR}"


def _find_file(folder: Path, name: str) -> Path | None:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _complete(folder: Path) -> bool:
    return all(_find_file(folder, n) for names in FILES.values() for n in names)


def find_fashion_mnist() -> Path | None:
    """The folder holding the Fashion-MNIST idx files, or None if it is not installed.

    $UPOP_FASHION_MNIST_DIR wins when set; a set-but-wrong value is an error rather than silently ignored.
    """
    env = os.environ.get(ENV_VAR)
    if env:
        folder = Path(env).expanduser()
        if not _complete(folder):
            raise DataError(f"{folder}: {ENV_VAR} does not point to a folder with the Fashion-MNIST idx files "
                            f"({', '.join(n for names in FILES.values() for n in names)}, optionally .gz)")
        return folder
    return next((d for d in SEARCH_DIRS if _complete(d)), None)


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an idx file of unsigned bytes with `ndim` dimensions (magic 0x0801 labels, 0x0803 images)."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":  # gzip magic: decide by content, not by the file name
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read idx file: {one_line(exc)}") from exc
    if len(raw) < 4 or raw[:2] != b"\x00\x00":
        raise DataError(f"{path}: not an idx file (bad magic number)")
    if raw[2] != 0x08:
        raise DataError(f"{path}: idx data type 0x{raw[2]:02x} is not unsigned byte (0x08)")
    if raw[3] != ndim:
        raise DataError(f"{path}: idx file has {raw[3]} dimensions, expected {ndim} (magic 0x080{ndim})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: idx header is truncated")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    if len(raw) - header != expected:
        raise DataError(f"{path}: idx payload has {len(raw) - header} bytes, the header {dims} needs {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_fashion_mnist(split: str, root: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 28, 28) uint8 and labels (N,) int64 of split "train" or "test"."""
    if split not in FILES:
        raise DataError(f"Fashion-MNIST split must be one of {sorted(FILES)}, got {split!r}")
    if root is None:
        folder = find_fashion_mnist()
        if folder is None:
            raise DataError(f"Fashion-MNIST not found in {', '.join(map(str, SEARCH_DIRS))}: {INSTALL_HINT}")
    else:
        folder = Path(root).expanduser()
        if not folder.is_dir():
            raise DataError(f"{folder}: Fashion-MNIST folder not found")
    paths = []
    for name in FILES[split]:
        path = _find_file(folder, name)
        if path is None:
            raise DataError(f"{folder / name}: Fashion-MNIST file not found (nor .gz): {INSTALL_HINT}")
        paths.append(path)
    images, labels = _read_idx(paths[0], 3), _read_idx(paths[1], 1)
    if len(images) != len(labels):
        raise DataError(f"{paths[1]}: {len(labels)} labels for {len(images)} images in {paths[0]}")
    if len(labels) and labels.max() >= len(CLASSES):
        raise DataError(f"{paths[1]}: label {int(labels.max())} outside 0..{len(CLASSES) - 1}")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


class FashionMNIST(Dataset):
    """Items are (PIL RGB image 28x28, label), or (transform(image), label); `limit` keeps the first N."""

    def __init__(self, split: str, transform: Callable | None = None, limit: int | None = None,
                 root: str | Path | None = None) -> None:
        images, labels = load_fashion_mnist(split, root)
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        self.images, self.labels = images, labels
        self.targets = labels.tolist()
        self.classes = list(CLASSES)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        from PIL import Image

        image = Image.fromarray(self.images[i].numpy()).convert("RGB")
        return (self.transform(image) if self.transform else image), int(self.labels[i])


add_format("fashion_mnist", (), "Fashion-MNIST idx files (Debian package or data.root)")
