"""Datasets built once into a cache folder: written to a temporary sibling, marked complete
last, renamed into place. A folder whose marker does not hold the same parameters is rebuilt;
an interrupted build is never taken for a finished one."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ._common import DataError, one_line

MARKER = "BUILD_COMPLETE.json"  # written last: its presence means the build is complete
_STALE_S = 3600  # leftover temp folders older than this are from dead builds


def cached_build(cache_dir: Path, params: dict[str, Any], what: str, build: Callable[[Path], dict[str, Any]],
                 force: bool = False) -> Path:
    """Reuse `cache_dir` if its marker holds `params`, else run `build(tmp)` (which fills tmp and
    returns the meta.json contents) and move the result into place. `what` names the dataset in errors."""
    if not force and is_complete(cache_dir, params):
        return cache_dir
    if cache_dir.exists() and not _replaceable(cache_dir):
        raise DataError(f"{cache_dir}: exists and is not an {what} build (no {MARKER}); "
                        "remove it or choose another folder")
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(cache_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.tmp-", dir=cache_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary readable folder
    try:
        meta = build(tmp)
        write_json(tmp / "meta.json", meta, indent=2)
        write_json(tmp / MARKER, params, indent=2)  # last: marks the folder complete
        _swap_into_place(tmp, cache_dir, params)
    except OSError as exc:
        raise DataError(f"{cache_dir}: cannot build the {what} data: {one_line(exc)}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return cache_dir


def is_complete(folder: Path, params: dict[str, Any]) -> bool:
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8")) == params
    except (OSError, ValueError):
        return False


def write_json(path: Path, data: Any, indent: int | None = None) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=indent) + "\n", encoding="utf-8")


def _replaceable(folder: Path) -> bool:
    """Only an empty folder or an earlier build (other parameters) may be replaced."""
    return folder.is_dir() and ((folder / MARKER).is_file() or not any(folder.iterdir()))


def _remove_stale(cache_dir: Path) -> None:
    """Delete temp folders left by builds that died long ago (a live build takes seconds)."""
    now = time.time()
    for pattern in (f".{cache_dir.name}.tmp-*", f".{cache_dir.name}.old-*"):
        for path in cache_dir.parent.glob(pattern):
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime > _STALE_S:
                    shutil.rmtree(path, ignore_errors=True)


def _swap_into_place(tmp: Path, cache_dir: Path, params: dict[str, Any]) -> None:
    old = None
    if cache_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.old-", dir=cache_dir.parent))
        cache_dir.rename(old / "build")
    try:
        tmp.rename(cache_dir)
    except OSError as exc:
        if not is_complete(cache_dir, params):  # else a concurrent build won the race with the same result
            raise DataError(f"{cache_dir}: cannot move the finished build into place: {one_line(exc)}") from exc
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
