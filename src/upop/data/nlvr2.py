"""NLVR2 (Suhr et al., 2019) in its official release format: JSON lines plus image folders.

Annotation file (train.json, dev.json, test1.json): one JSON object per line, e.g.

    {"identifier": "dev-850-0-0", "sentence": "The left image contains twice the number of dogs ...",
     "label": "False", "left_url": "...", "right_url": "...", "writer": "...", ...}

`identifier` is <split>-<set>-<pair>-<sentence>; the pair's two images are named
<split>-<set>-<pair>-img0.png (left) and -img1.png (right). Train lines also carry
"directory": the numbered subfolder holding the pair's images. Other fields are ignored.

Image root (`image_root`): the folder the official zips were unpacked into. The first line of each
file decides where its images live, trying in turn (with <name> the image file name):
<root>/<split>/<directory>/<name>, <root>/<directory>/<name> (train), <root>/<split>/<name>,
<root>/<name>; every other line of the file must follow the same layout.

Every line is checked when the dataset is built (JSON, fields, label, identifier, image files);
a malformed line raises DataError naming the file and line number. Images decode lazily.
on_bad_input: a missing image file or an empty sentence stops the run ("stop") or drops the line
("skip", counted in `skipped`); an image that fails to decode raises, or gives None under "skip".
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ._common import DataError, check_mode, is_file, load_image_or_none, log_skipped, one_line
from .formats import add_format

_IDENTIFIER = re.compile(r"^(?P<pair>(?P<split>[A-Za-z0-9_]+)-\d+-\d+)-\d+$")
LABELS = {"true": 1, "false": 0}


@dataclass(frozen=True)
class NLVRExample:
    identifier: str
    sentence: str
    label: int  # 1 true, 0 false
    left: Path
    right: Path


def _label(raw: Any) -> int | None:
    if isinstance(raw, bool):  # tolerated: some converted copies store JSON booleans
        return int(raw)
    if isinstance(raw, str) and raw.strip().lower() in LABELS:
        return LABELS[raw.strip().lower()]
    return None


def _layouts(root: Path, split: str, directory: str | None, name: str) -> list[Path | None]:
    """Where one image may be, in the order the layout is searched; None for the layouts with a
    numbered subfolder when the line has no "directory"."""
    numbered = [root / split / directory / name, root / directory / name] if directory is not None else [None, None]
    return [*numbered, root / split / name, root / name]


def read_nlvr2(ann_file: str | Path, image_root: str | Path, on_bad_input: str = "stop",
               skipped: list[str] | None = None) -> list[NLVRExample]:
    """Parse and check an NLVR2 JSON-lines file; returns its examples in file order."""
    ann_file, image_root = Path(ann_file), Path(image_root)
    check_mode(on_bad_input)
    skipped = [] if skipped is None else skipped
    if not ann_file.exists():
        raise DataError(f"{ann_file}: NLVR2 annotation file not found")
    if not ann_file.is_file():
        raise DataError(f"{ann_file}: NLVR2 annotation file is not a file")
    if not image_root.is_dir():
        raise DataError(f"{image_root}: NLVR2 image root not found or not a directory")
    try:
        lines = ann_file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{ann_file}: not UTF-8 text ({one_line(exc)})") from exc
    except OSError as exc:
        raise DataError(f"{ann_file}: cannot read: {one_line(exc.strerror or exc)}") from exc

    layout: int | None = None  # index into _layouts(), fixed by the first line
    examples: list[NLVRExample] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{ann_file}: line {number}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno}); NLVR2 files hold one "
                            "JSON object per line") from None
        except (ValueError, RecursionError) as exc:
            raise DataError(f"{where}: invalid JSON: {one_line(exc) or type(exc).__name__}") from None
        if not isinstance(entry, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(entry).__name__}")
        for key in ("identifier", "sentence", "label"):
            if key not in entry:
                raise DataError(f"{where}: missing key {key!r}")
        identifier = entry["identifier"]
        match = _IDENTIFIER.match(identifier) if isinstance(identifier, str) else None
        if match is None:
            raise DataError(f"{where}: identifier must look like 'dev-850-0-0' (<split>-<set>-<pair>-<sentence>), "
                            f"got {str(identifier)[:80]!r}")
        label = _label(entry["label"])
        if label is None:
            raise DataError(f"{where}: label must be \"True\" or \"False\", got {str(entry['label'])[:40]!r}")
        sentence = entry["sentence"]
        if not isinstance(sentence, str):
            raise DataError(f"{where}: sentence must be a string, got {type(sentence).__name__}")
        directory = entry.get("directory")
        if directory is not None:
            if isinstance(directory, bool) or not isinstance(directory, (int, str)) or not str(directory).strip():
                raise DataError(f"{where}: directory must be a folder number or name, got {str(directory)[:40]!r}")
            directory = str(directory).strip()
            if "/" in directory or "\\" in directory or directory in (".", ".."):
                raise DataError(f"{where}: directory must be one folder name, got {directory[:40]!r}")
        if not sentence.strip():
            problem = f"{where}: sentence is empty"
            if on_bad_input == "stop":
                raise DataError(problem)
            skipped.append(problem)
            continue
        names = [f"{match['pair']}-img{i}.png" for i in (0, 1)]
        if layout is None:
            candidates = _layouts(image_root, match["split"], directory, names[0])
            layout = next((i for i, p in enumerate(candidates) if p is not None and is_file(p)), None)
            if layout is None:
                problem = (f"{where}: image {names[0]} not found under {image_root} (looked for "
                           f"{', '.join(str(p) for p in candidates if p is not None)})")
                if on_bad_input == "stop":
                    raise DataError(problem)
                skipped.append(problem)
                continue
        candidates = [_layouts(image_root, match["split"], directory, n) for n in names]
        paths = [c[layout] for c in candidates]
        if paths[0] is None:
            raise DataError(f"{where}: no 'directory' field, unlike the first line of the file")
        missing = [p for p in paths if not is_file(p)]
        if missing:
            problem = f"{where}: image file not found: {missing[0]}"
            if on_bad_input == "stop":
                raise DataError(problem)
            skipped.append(problem)
            continue
        examples.append(NLVRExample(identifier, sentence.strip(), label, paths[0], paths[1]))
    if not examples:
        if skipped:
            raise DataError(f"{ann_file}: no usable example left: all were skipped as bad input (first: {skipped[0]})")
        raise DataError(f"{ann_file}: contains no examples")
    return examples


class NLVR2Dataset(Dataset):
    """Item i: (left image, right image, sentence, label) with images as PIL RGB or whatever
    `transform` (settable after construction) returns; None when an image fails to decode under
    on_bad_input "skip" (drop it with `upop.data.drop_none`)."""

    def __init__(self, ann_file: str | Path, image_root: str | Path, transform: Callable | None = None,
                 on_bad_input: str = "stop") -> None:
        self.ann_file = Path(ann_file)
        self.on_bad_input = check_mode(on_bad_input)
        self.skipped: list[str] = []
        self.examples = read_nlvr2(ann_file, image_root, on_bad_input, self.skipped)
        log_skipped(self.ann_file, self.skipped)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[Any, Any, str, int] | None:
        ex = self.examples[i]
        images = [load_image_or_none(p, self.on_bad_input, self.skipped) for p in (ex.left, ex.right)]
        if any(img is None for img in images):
            return None
        if self.transform is not None:
            images = [self.transform(img) for img in images]
        return images[0], images[1], ex.sentence, ex.label

    def label_counts(self) -> dict[int, int]:
        counts = {0: 0, 1: 0}
        for ex in self.examples:
            counts[ex.label] += 1
        return counts


add_format("nlvr2", ("root", "train", "val", "test"), "official NLVR2 JSON-lines files")
