"""The official VQAv2 accuracy and its answer normalisation (written from the evaluation's description)."""

from __future__ import annotations

import re
from collections.abc import Sequence

# ---- the official answer normalisation (VQA evaluation), written from its description ----------
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
# apostrophe-less spellings annotators type -> the contraction the evaluation compares against
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldntve": "couldn't've", "couldn'tve": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadntve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hedve": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "isnt": "isn't",
    "itd": "it'd", "itdve": "it'd've", "itll": "it'll", "lets": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "shant": "shan't", "shed": "she'd", "shes": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "somebodyd": "somebody'd", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
# the marks the evaluation strips; periods, apostrophes, colons, %, $, & ... are not among them
_PUNCTUATION = tuple(';/[]"{}()=+\\_-><@`,?!')
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_LONE_PERIOD = re.compile(r"\.(?!\d)")  # a period not followed by a digit (a decimal point stays)


def normalize_answer(answer: str) -> str:
    """VQA evaluation normalisation: whitespace, punctuation, number words -> digits, articles dropped,
    contractions restored. "Two dogs." -> "2 dogs", "the cat's" -> "cat's", "dont know" -> "don't know"."""
    original = answer.replace("\n", " ").replace("\t", " ").strip()
    text = original
    # a mark next to a space (or any mark, when the text has a thousands comma) is dropped;
    # elsewhere it separates words; the test looks at the original text, as the official code does
    comma_number = _COMMA_IN_NUMBER.search(original) is not None
    for p in _PUNCTUATION:
        text = text.replace(p, "" if (f"{p} " in original or f" {p}" in original or comma_number) else " ")
    text = _LONE_PERIOD.sub("", text).lower()
    words = []
    for word in text.split():
        word = _NUMBERS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The official VQAv2 accuracy of one prediction against the human answers (normalised inside):
    min(#humans who gave it / 3, 1), averaged over the leave-one-annotator-out subsets (with 10
    answers: 1 match -> 0.3, 2 -> 0.6, 3 -> 0.9, 4+ -> 1)."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in answers]
    if len(gts) == 1:
        return float(gts[0] == pred)
    matches = sum(g == pred for g in gts)
    # annotator j left out: the others give `matches - (gts[j] == pred)` matching answers
    return sum(min(1.0, (matches - (g == pred)) / 3) for g in gts) / len(gts)
