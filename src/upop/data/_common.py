"""Shared helpers: the DataError type, JSON reading, lazy image decoding and the bad-input policy."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

logger = logging.getLogger("upop")

BAD_INPUT_MODES = ("stop", "skip")
_LOGGED_PATHS = 5  # how many skipped paths a warning names
# torch.utils.data re-raises an exception from a DataLoader worker as
# type(exc)("Caught <Type> in DataLoader worker process N.\nOriginal Traceback (most recent call last): ...").
_WORKER_MESSAGE = re.compile(r"Caught DataError (?P<where>[^\n]*?)\.?\nOriginal Traceback", re.S)
_FINAL_LINE = re.compile(r"^(?:[\w.]+\.)?DataError: (?P<message>.+)$")


class DataError(ValueError):
    """Bad input data: a missing path, a malformed annotation file or entry, an image that fails to decode.

    The message is one line naming the file (and entry) and the problem. Raised inside a DataLoader
    worker, PyTorch re-raises it in the main process with the worker's traceback in the message; the
    clean line then still comes first: `str(exc).splitlines()[0]` is always the one-line message.
    """

    def __init__(self, *args: Any) -> None:
        if len(args) == 1 and isinstance(args[0], str) and args[0].startswith("Caught DataError "):
            args = (_clean_first_line(args[0]),)
        super().__init__(*args)


def _clean_first_line(text: str) -> str:
    """Move the original one-line message of a worker's DataError to the front of the re-raised message."""
    match = _WORKER_MESSAGE.match(text)
    if match is None:
        return text
    for line in reversed(text.splitlines()):
        final = _FINAL_LINE.match(line)
        if final:
            return f"{final['message']}\n(raised {match['where']}; the worker's message follows)\n{text}"
    return text


def one_line(text: object) -> str:
    """Collapse whitespace so that messages built from library errors stay on one line."""
    return " ".join(str(text).split())


def check_mode(on_bad_input: str) -> str:
    if on_bad_input not in BAD_INPUT_MODES:
        raise DataError(f"on_bad_input must be one of {BAD_INPUT_MODES}, got {on_bad_input!r}")
    return on_bad_input


def printable(text: object) -> str:
    """`text` safe to write anywhere: a file name that is not valid UTF-8 reaches Python as surrogate
    escapes ("\\udcff"), which a UTF-8 stream refuses; they are shown as the bytes they stand for ("\\xff")."""
    text = str(text)
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that stands for no byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def log_skipped(source: object, skipped: Sequence[str], what: str = "bad entries") -> None:
    """One warning on the "upop" logger: how many entries were dropped and the first few reasons."""
    if not skipped:
        return
    shown = "; ".join(skipped[:_LOGGED_PATHS]) + ("; ..." if len(skipped) > _LOGGED_PATHS else "")
    logger.warning("%s", printable(f"{source}: skipped {len(skipped)} {what} (data.on_bad_input: skip): {shown}"))


def is_file(path: Path) -> bool:
    """Path.is_file that also answers False for names the OS rejects (too long, undecodable)."""
    try:
        return path.is_file()
    except (OSError, ValueError):
        return False


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
    except RecursionError:
        raise DataError(f"{path}: invalid JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal longer than Python's int conversion limit
        raise DataError(f"{path}: invalid JSON: {one_line(exc)}") from exc


def load_image(path: Path | Any, where: str | None = None):
    """Decode an image (a path, or a file-like object such as in-memory bytes) as RGB; decoding is lazy
    (per item), so errors surface here naming `where` (default: the path)."""
    from PIL import Image  # imported here so that the package imports without Pillow

    where = where if where is not None else str(path)
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError as exc:
        raise DataError(f"{where}: image file not found") from exc
    except MemoryError as exc:
        raise DataError(f"{where}: cannot decode image: out of memory") from exc
    except Exception as exc:  # Pillow's decoders raise OSError, ValueError, EOFError, struct.error, ...
        raise DataError(f"{where}: cannot decode image: {one_line(exc) or type(exc).__name__}") from exc


def load_image_or_none(path: Any, on_bad_input: str, skipped: list[str], loader: Callable[[Any], Any] | None = None):
    """load_image (or `loader`: e.g. a row of a datasets split), except that in "skip" mode an
    undecodable image gives None (recorded in `skipped`)."""
    try:
        return (loader or load_image)(path)
    except DataError as exc:
        if on_bad_input != "skip":
            raise
        skipped.append(str(exc))
        if len(skipped) <= _LOGGED_PATHS:  # per process: workers each keep their own list
            logger.warning("%s (data.on_bad_input: skip: item dropped)", printable(exc))
        return None


def undecodable(paths: Sequence[Path]) -> dict[Path, str]:
    """Decode every image (a few threads: Pillow releases the GIL); path -> error line for those that fail."""
    def check(path: Path) -> str | None:
        try:
            load_image(path)
        except DataError as exc:
            return str(exc)
        return None

    workers = max(1, min(8, os.cpu_count() or 1, len(paths)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(check, paths))
    return {p: r for p, r in zip(paths, results, strict=True) if r is not None}


class DropNone:
    """A collate_fn wrapper that drops the None items (images skipped under on_bad_input "skip").

    `dropped` counts the items dropped in this process (with num_workers > 0 collation runs in the
    workers, so the main process's count stays 0 there; the workers log each skipped image).
    A batch whose items are all None collates to None: the training loop must skip it.
    """

    def __init__(self, collate_fn: Callable[[list], Any] | None = None) -> None:
        if collate_fn is None:
            from torch.utils.data import default_collate

            collate_fn = default_collate
        self.collate_fn = collate_fn
        self.dropped = 0

    def __call__(self, items: list) -> Any:
        kept = [item for item in items if item is not None]
        self.dropped += len(items) - len(kept)
        return self.collate_fn(kept) if kept else None


def drop_none(collate_fn: Callable[[list], Any] | None = None) -> DropNone:
    """Wrap `collate_fn` (default: torch's default_collate) so that None items are dropped before collating."""
    return DropNone(collate_fn)
