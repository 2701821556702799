"""Query-document pairs for text-to-text retrieval (`data.format: text_pairs`): one JSON Lines file
per split (data.train, data.val, data.test), each line an object {"query": ..., "document": ...}.

A document may have several queries (lines with the same document text). A line with a "document"
and no "query" (absent or null) is a distractor: a candidate document that no query is paired with,
ranked against every query of the split (a search over a large collection of which few documents
are ever asked for). Distractors are for val and test only: training's negatives are the other
documents of each batch, so a distractor in the training file would be silently unused, and it is
refused instead. A distractor equal to a document of the same file is that document (dropped).

Texts are used as written (stripped of surrounding whitespace): the tokenizer lowercases where its
model does. Blank lines are ignored; any other bad line stops the run with one DataError naming the
file and line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
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
    document in `documents` (the distinct documents with queries, in order of first appearance).
    `distractors`: the split's further candidate documents, without queries (none equals a document)."""

    queries: list[str]
    documents: list[str]
    doc_of_query: list[int]  # query i is a query of documents[doc_of_query[i]]
    source: str = ""
    distractors: list[str] = field(default_factory=list)
    queries_of_doc: list[list[int]] = field(init=False)

    def __post_init__(self) -> None:
        self.queries_of_doc = [[] for _ in self.documents]
        for q, d in enumerate(self.doc_of_query):
            self.queries_of_doc[d].append(q)

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, str]], source: str = "", distractors: Iterable[str] = ()) -> TextPairs:
        """Pairs (query, document) and distractor documents; distractors equal to a document or to
        an earlier distractor are dropped (one text, one candidate)."""
        ids: dict[str, int] = {}
        doc_of_query = [ids.setdefault(doc, len(ids)) for _, doc in pairs]
        extra = [d for d in dict.fromkeys(distractors) if d not in ids]
        return cls([q for q, _ in pairs], list(ids), doc_of_query, source, extra)

    @property
    def candidates(self) -> list[str]:
        """What a query is ranked against: the documents, then the distractors."""
        return self.documents + self.distractors

    def __len__(self) -> int:
        return len(self.queries)

    def __getitem__(self, i: int) -> tuple[str, str, int]:
        d = self.doc_of_query[i]
        return self.queries[i], self.documents[d], d

    def first_documents(self, n: int | None) -> TextPairs:
        """The split cut to its first `n` distinct documents and their queries (data.limit_eval). All
        distractors are kept: each kept query still faces the whole collection, so its recall is
        measured as in the full split (fewer queries, not an easier search)."""
        if not n or n >= len(self.documents):
            return self
        pairs = [(q, self.documents[d]) for q, d in zip(self.queries, self.doc_of_query, strict=True) if d < n]
        return TextPairs.from_pairs(pairs, self.source, self.distractors)


def _text(path: Path, lineno: int, entry: dict[str, Any], key: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str):
        problem = "missing" if value is None else f"must be a string, got {type(value).__name__}"
        raise DataError(f"{path}: line {lineno}: \"{key}\" {problem}")
    value = value.strip()
    if not value:
        raise DataError(f"{path}: line {lineno}: \"{key}\" is empty")
    return value


def read_text_pairs(path: str | Path, distractors: bool = True) -> TextPairs:
    """Parse and check a JSON Lines file of {"query", "document"} objects and, when `distractors`,
    {"document"} objects (a candidate without a query); otherwise such a line is refused."""
    path = Path(path).expanduser()
    if not is_file(path):
        raise DataError(f"{path}: text pairs file not found" if not path.exists() else f"{path}: not a file")
    pairs: list[tuple[str, str]] = []
    extra: list[str] = []
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
                if entry.get("query") is not None:
                    pairs.append((_text(path, lineno, entry, "query"), _text(path, lineno, entry, "document")))
                elif entry.get("document") is None:
                    raise DataError(f"{path}: line {lineno}: neither \"query\" nor \"document\" "
                                    f"(a pair needs both, a distractor a \"document\")")
                elif not distractors:
                    raise DataError(f"{path}: line {lineno}: a \"document\" without a \"query\" (a distractor) "
                                    f"is for val and test only: training's negatives are the batch's documents")
                else:
                    extra.append(_text(path, lineno, entry, "document"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({one_line(exc)})") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read the text pairs: {one_line(exc.strerror or exc)}") from exc
    if not pairs:
        raise DataError(f"{path}: contains no query-document pairs")
    return TextPairs.from_pairs(pairs, str(path), extra)


def text_pair_splits(files: dict[str, str | Path]) -> dict[str, TextPairs]:
    """Every split's file read and checked (train, val, test), before any model is built; distractors
    refused in train (see the module docstring)."""
    return {split: read_text_pairs(files[split], distractors=split != "train") for split in SPLITS}


add_format("text_pairs", ("train", "val", "test"),
           "query-document pairs, one JSON Lines file per split: {\"query\": ..., \"document\": ...}; "
           "{\"document\": ...} alone adds a distractor (val, test)")
