"""Query-document pairs for text-to-text retrieval (`data.format: text_pairs`): one JSON Lines file
per split (data.train, data.val, data.test), each line an object {"query": ..., "document": ...}.

A document may have several queries (lines with the same document text); evaluation ranks every
distinct document of a split for each query and every query for each document. Texts are used as
written (stripped of surrounding whitespace): the tokenizer lowercases where its model does. Blank
lines are ignored; any other bad line stops the run with one DataError naming the file and line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ._common import DataError, is_file, one_line
from .formats import add_format

SPLITS = ("train", "val", "test")


@dataclass
class TextPairs(Dataset):
    """The pairs of one split. Items are (query, document, document id), the id the position of the
    document in `documents` (the distinct documents, in order of first appearance)."""

    queries: list[str]
    documents: list[str]
    doc_of_query: list[int]  # query i is a query of documents[doc_of_query[i]]
    source: str = ""
    queries_of_doc: list[list[int]] = field(init=False)

    def __post_init__(self) -> None:
        self.queries_of_doc = [[] for _ in self.documents]
        for q, d in enumerate(self.doc_of_query):
            self.queries_of_doc[d].append(q)

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, str]], source: str = "") -> TextPairs:
        ids: dict[str, int] = {}
        doc_of_query = [ids.setdefault(doc, len(ids)) for _, doc in pairs]
        return cls([q for q, _ in pairs], list(ids), doc_of_query, source)

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, i: int) -> tuple[str, str, int]:
        d = self.doc_of_query[i]
        return self.queries[i], self.documents[d], d

    def first_documents(self, n: int | None) -> TextPairs:
        """The split cut to its first `n` distinct documents and their queries (data.limit_eval)."""
        if not n or n >= len(self.documents):
            return self
        pairs = [(q, self.documents[d]) for q, d in zip(self.queries, self.doc_of_query, strict=True) if d < n]
        return TextPairs.from_pairs(pairs, self.source)


def _text(path: Path, lineno: int, entry: dict[str, Any], key: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str):
        problem = "missing" if value is None else f"must be a string, got {type(value).__name__}"
        raise DataError(f"{path}: line {lineno}: \"{key}\" {problem}")
    value = value.strip()
    if not value:
        raise DataError(f"{path}: line {lineno}: \"{key}\" is empty")
    return value


def read_text_pairs(path: str | Path) -> TextPairs:
    """Parse and check a JSON Lines file of {"query", "document"} objects."""
    path = Path(path).expanduser()
    if not is_file(path):
        raise DataError(f"{path}: text pairs file not found" if not path.exists() else f"{path}: not a file")
    pairs: list[tuple[str, str]] = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except (json.JSONDecodeError, RecursionError, ValueError) as exc:
                    raise DataError(f"{path}: line {lineno}: invalid JSON: {one_line(exc)}") from None
                if not isinstance(entry, dict):
                    raise DataError(f"{path}: line {lineno}: expected an object with \"query\" and \"document\", "
                                    f"got {type(entry).__name__}")
                pairs.append((_text(path, lineno, entry, "query"), _text(path, lineno, entry, "document")))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({one_line(exc)})") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read the text pairs: {one_line(exc.strerror or exc)}") from exc
    if not pairs:
        raise DataError(f"{path}: contains no query-document pairs")
    return TextPairs.from_pairs(pairs, str(path))


def text_pair_splits(files: dict[str, str | Path]) -> dict[str, TextPairs]:
    """Every split's file read and checked (train, val, test), before any model is built."""
    return {split: read_text_pairs(files[split]) for split in SPLITS}


add_format("text_pairs", ("train", "val", "test"),
           "query-document pairs, one JSON Lines file per split: {\"query\": ..., \"document\": ...}")
