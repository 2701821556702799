"""Shared helpers: the DataError type, JSON reading and lazy image decoding."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class DataError(ValueError):
    """Bad input data: a missing path, a malformed annotation file or entry, an image that fails to decode.

    The message is one line naming the file (and entry) and the problem.
    """


def one_line(text: object) -> str:
    """Collapse whitespace so that messages built from library errors stay on one line."""
    return " ".join(str(text).split())


def require_dir(path: Path, what: str) -> Path:
    if not path.exists():
        raise DataError(f"{path}: {what} not found")
    if not path.is_dir():
        raise DataError(f"{path}: {what} is not a directory")
    return path


def read_json(path: Path, what: str = "annotation file") -> Any:
    """Parse a JSON file, turning every failure into a DataError naming the file."""
    if not path.exists():
        raise DataError(f"{path}: {what} not found")
    if not path.is_file():
        raise DataError(f"{path}: {what} is not a file")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({one_line(exc)})") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read {what}: {one_line(exc.strerror or exc)}") from exc


def load_image(path: Path):
    """Decode an image as RGB; decoding is lazy (per item), so errors surface here with the path."""
    from PIL import Image  # imported here so that the package imports without Pillow

    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError as exc:
        raise DataError(f"{path}: image file not found") from exc
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: cannot decode image: {one_line(exc)}") from exc
