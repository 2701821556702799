"""COCO caption metrics through pycocoevalcap: Bleu_1..4, METEOR, ROUGE_L, CIDEr (and SPICE when it can run).

Scores are returned in percent, as the BLIP and UPop papers report them (CIDEr 133.3, not 1.333).
Java is needed by the PTB tokenizer, METEOR and SPICE. Without java the tokenizer falls back to a
Python imitation (lowercase, punctuation split off and dropped) and METEOR is skipped; SPICE is
skipped unless its Stanford CoreNLP jars were fetched beforehand (pycocoevalcap downloads them on
first use, which an offline machine cannot do). Each skip is logged once as one line on "upop".
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import re
import shutil
import subprocess
import threading
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..data._common import DataError

log = logging.getLogger("upop")

# the PTB tokens pycocoevalcap drops after tokenising (its PUNCTUATIONS list)
PUNCTUATIONS = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                          ".", "?", "!", ",", ":", "-", "--", "...", ";"])
# a word, a contraction suffix ('s, n't, 're ...) or one non-space symbol: what PTB splits on, roughly
_TOKEN = re.compile(r"\w+(?=n't\b)|n't\b|'\w+|\w+(?:[-.]\w+)*|\.\.\.|--|\S")
# PTB writes brackets as -LRB- ...; lowercased to -lrb-, they escape pycocoevalcap's PUNCTUATIONS and stay
_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}

_noticed: set[str] = set()
_lock = threading.Lock()
_meteor: Any = None  # one METEOR java process per Python process: it loads a 60 MB table in ~8 s


def _notice(key: str, message: str) -> None:
    """Log `message` once per process."""
    if key not in _noticed:
        _noticed.add(key)
        log.warning("%s", message)


def java_available() -> bool:
    """True when a `java` executable on PATH starts (checked at every call: PATH can change)."""
    java = shutil.which("java")
    if java is None:
        return False
    return _java_runs(java)


_java_ok: dict[str, bool] = {}


def _java_runs(java: str) -> bool:
    if java not in _java_ok:
        try:
            _java_ok[java] = subprocess.run([java, "-version"], capture_output=True, timeout=60).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            _java_ok[java] = False
    return _java_ok[java]


def simple_tokenize(text: str) -> str:
    """Python stand-in for the PTB tokenizer as pycocoevalcap uses it: lowercase, split, drop punctuation.

    Agrees with PTB on ordinary captions (all OpenMoji test captions but "three o'clock", plus
    contractions and brackets); rare cases differ (abbreviations like "u.s.", quotes inside a sentence)."""
    tokens = _TOKEN.findall(text.lower().replace("\n", " "))
    return " ".join(_BRACKETS.get(t, t) for t in tokens if t not in PUNCTUATIONS)


def tokenize(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    """Tokenise every caption of every key, with the Stanford PTB tokenizer when java runs."""
    if java_available():
        try:
            return _ptb_tokenize(captions)
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            _notice("ptb-failed", f"caption metrics: the PTB tokenizer failed ({' '.join(str(exc).split())}); "
                                  "using a simple Python tokenizer")
    else:
        _notice("java", "caption metrics: java not found, using a simple Python tokenizer instead of the PTB "
                       "tokenizer and skipping METEOR (install a JRE, e.g. apt-get install default-jre-headless)")
    return {k: [simple_tokenize(c) for c in caps] for k, caps in captions.items()}


def _ptb_tokenize(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # pycocoevalcap pairs output lines with inputs by position, so an empty caption (no output
    # line at the end of the file) would shift or drop keys: tokenise only the non-empty ones.
    out: dict[Hashable, list[str]] = {k: [""] * len(caps) for k, caps in captions.items()}
    index = {}
    payload: dict[int, list[dict[str, str]]] = {}
    for k, caps in captions.items():
        for j, c in enumerate(caps):
            if c.strip():
                index[len(index)] = (k, j)
                payload[len(payload)] = [{"caption": c}]
    if not payload:
        return out
    tokenized = PTBTokenizer().tokenize(payload)
    if len(tokenized) != len(payload):
        raise ValueError(f"it returned {len(tokenized)} of {len(payload)} captions")
    for i, (k, j) in index.items():
        out[k][j] = tokenized[i][0]
    return out


def _meteor_scorer() -> Any:
    global _meteor
    if _meteor is None or _meteor.meteor_p.poll() is not None:
        from pycocoevalcap.meteor.meteor import Meteor

        _meteor = Meteor()
        atexit.register(_close_meteor)
    return _meteor


def _close_meteor() -> None:
    global _meteor
    if _meteor is not None:
        with contextlib.suppress(Exception):
            _meteor.meteor_p.stdin.close()
            _meteor.meteor_p.kill()
            _meteor.meteor_p.wait(timeout=10)
        _meteor = None


def _spice_ready() -> bool:
    """SPICE runs only if its CoreNLP jars are already there (fetching them needs the network)."""
    try:
        import pycocoevalcap.spice as spice
    except ImportError:
        return False
    lib = Path(spice.__file__).parent / "lib"
    return (lib / "stanford-corenlp-3.6.0.jar").is_file() and (lib / "stanford-corenlp-3.6.0-models.jar").is_file()


def caption_scores(references: Mapping[Hashable, Sequence[str]], predictions: Mapping[Hashable, str],
                   spice: bool = True) -> dict[str, float]:
    """COCO caption metrics of `predictions` (one caption per key) against `references` (several per key).

    Returns Bleu_1..Bleu_4, ROUGE_L, CIDEr and, when java runs, METEOR; SPICE when `spice` and its
    models are installed. All in percent. Keys must match; every key needs at least one reference.
    """
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.rouge.rouge import Rouge
    except ImportError:
        raise DataError("caption metrics need pycocoevalcap: pip install pycocoevalcap==1.2") from None
    if set(references) != set(predictions):
        raise ValueError("caption_scores: references and predictions must have the same keys")
    if not references:
        raise ValueError("caption_scores: nothing to score")
    if any(len(refs) == 0 for refs in references.values()):
        raise ValueError("caption_scores: every key needs at least one reference caption")
    with _lock:  # the METEOR process and the notices are shared
        gts = tokenize(references)
        res = tokenize({k: [p] for k, p in predictions.items()})
        scores: dict[str, float] = {}
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        scores.update({f"Bleu_{n + 1}": float(b) for n, b in enumerate(bleu)})
        if java_available():
            try:
                scores["METEOR"] = float(_meteor_scorer().compute_score(gts, res)[0])
            except (OSError, ValueError, subprocess.SubprocessError) as exc:
                _close_meteor()
                _notice("meteor-failed", f"caption metrics: METEOR failed ({' '.join(str(exc).split())}), skipped")
        else:
            _notice("java", "caption metrics: java not found, METEOR skipped")
        scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
        scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
        if spice:
            if java_available() and _spice_ready():
                try:
                    from pycocoevalcap.spice.spice import Spice

                    scores["SPICE"] = float(Spice().compute_score(gts, res)[0])
                except Exception as exc:  # a java crash or a missing cache folder must not end the run
                    _notice("spice-failed", f"caption metrics: SPICE failed ({' '.join(str(exc).split())[:200]}), "
                                            "skipped")
            else:
                _notice("spice", "caption metrics: SPICE skipped (needs java and the Stanford CoreNLP 3.6.0 "
                                 "models, which pycocoevalcap downloads on first use)")
    return {k: 100.0 * v for k, v in scores.items()}
