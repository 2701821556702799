"""The one way upop writes a file, and the one check before any weights are written.

Every file a run or a save produces goes through `atomic_write` (or `atomic_folder` for a
folder of files): it is written under a temporary name in the same directory, flushed, then
renamed, so a half-written file never carries the real name. `check_finite` refuses to save
weights that hold NaN or infinity: a non-finite model is never taken for a result.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch


class NonFiniteWeightsError(ValueError):
    """Weights that hold NaN or infinity: refused before anything is written."""


class DiskFullError(OSError):
    """The disk filled up while a file was written; nothing under the real name changed."""


def check_finite(tensors: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], what: str) -> None:
    """Raise NonFiniteWeightsError naming `what` (e.g. "retrain: best model") and the first bad tensor."""
    items = tensors.items() if isinstance(tensors, dict) else tensors
    bad = [name for name, t in items if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise NonFiniteWeightsError(f"{what}: not saved, tensor {bad[0]!r}{more} holds NaN or infinity "
                                    "(lower the learning rate, or check the inputs)")


def _disk_full(exc: OSError, path: Path) -> OSError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(exc.errno, f"no space left on the device while writing {path}; free some space "
                                        "and run the same command again")
    return exc


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Call write(file) on a temporary file next to `path`, then rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _disk_full(exc, path) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: str | os.PathLike, data: Any) -> Path:
    return write_text(path, json.dumps(data, indent=1) + "\n")


@contextmanager
def atomic_folder(folder: str | os.PathLike, last: str | None = None) -> Iterator[Path]:
    """Yield an empty staging folder next to `folder`; on success its files replace those of
    `folder` (the file named `last` moved last, so a reader never sees it beside old files)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        yield staging
        folder.mkdir(exist_ok=True)
        if last is not None:
            (folder / last).unlink(missing_ok=True)  # the folder is incomplete until the end
        for item in sorted(staging.iterdir(), key=lambda p: p.name == last):
            os.replace(item, folder / item.name)
    except OSError as exc:
        raise _disk_full(exc, folder) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
