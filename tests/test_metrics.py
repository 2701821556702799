"""upop.metrics: every metric against an example computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from upop.metrics import (
    IGNORE_INDEX,
    accuracy,
    caption_scores,
    confusion_matrix,
    normalize_answer,
    recall_at_k,
    segmentation_metrics,
    top_k_accuracy,
    vqa_accuracy,
)


def test_recall_at_k_by_hand():
    # 2 images, 3 texts; image 0 owns texts 0 and 1, image 1 owns text 2
    sim = torch.tensor([[0.1, 0.9, 0.5],    # image 0: best text 1 (its own) -> rank 0
                        [0.8, 0.7, 0.6]])   # image 1: its text 2 is third -> rank 2
    out = recall_at_k(sim, [[0, 1], [2]], [0, 0, 1])
    assert out["txt_r1"] == 50.0 and out["txt_r5"] == 100.0
    # text->image (columns): text 0 (0.1, 0.8) ranks its image 0 second; text 1 (0.9, 0.7) and
    # text 2 (0.5, 0.6) rank theirs first -> R@1 = 2/3
    assert out["img_r1"] == pytest.approx(200 / 3) and out["img_r5"] == 100.0
    assert out["r_mean"] == pytest.approx((out["txt_r_mean"] + out["img_r_mean"]) / 2)


def test_top_k_and_two_way_accuracy_by_hand():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [1.0, 2.0, 3.0], [3.0, 1.0, 2.0]])
    labels = torch.tensor([0, 2, 1, 1])  # top-1 hits: row 0; top-2 hits: rows 0, 1, 2
    out = top_k_accuracy(logits, labels, ks=(1, 2, 3))
    assert out == {"top1": 25.0, "top2": 75.0, "top3": 100.0}
    two_way = accuracy(torch.tensor([[0.0, 1.0], [2.0, 1.0], [0.0, 3.0]]), torch.tensor([1, 1, 1]))
    assert two_way["accuracy"] == pytest.approx(200 / 3) and two_way["predicted_true"] == pytest.approx(200 / 3)
    with pytest.raises(ValueError, match="empty"):
        accuracy(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long))


def test_vqa_accuracy_and_normalisation_by_hand():
    assert normalize_answer("Two dogs.") == "2 dogs"
    assert normalize_answer("dont know") == "don't know"
    humans = ["2"] * 2 + ["3"] * 8  # "two" matches 2 of 10: each leave-one-out subset gives min(1, m/3)
    # 2 subsets drop a matching answer (1 match left -> 1/3), 8 drop another (2 matches -> 2/3)
    assert vqa_accuracy("two", humans) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    assert vqa_accuracy("3", humans) == 1.0 and vqa_accuracy("4", humans) == 0.0


def test_segmentation_metrics_by_hand():
    labels = torch.tensor([[0, 0, 1], [1, 2, IGNORE_INDEX]])
    pred = torch.tensor([[0, 1, 1], [1, 0, 2]])
    cm = confusion_matrix(pred, labels, 3)
    # rows = truth: class 0 -> (0, 1); class 1 -> (1, 1); class 2 -> 0; the ignored pixel counts nowhere
    assert cm.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    out = segmentation_metrics(cm)
    # IoU: 0 -> 1/(2+2-1)=1/3, 1 -> 2/(2+3-2)=2/3, 2 -> 0/(1+0-0)=0; accuracy: 1/2, 1, 0
    assert out["miou"] == pytest.approx(100 * (1 / 3 + 2 / 3 + 0) / 3)
    assert out["macc"] == pytest.approx(100 * (0.5 + 1 + 0) / 3)
    assert out["pixel_acc"] == pytest.approx(100 * 3 / 5)
    absent = segmentation_metrics(torch.tensor([[2, 0], [0, 0]]))  # class 1 nowhere: NaN, left out
    assert absent["miou"] == 100.0 and math.isfinite(absent["macc"])


def test_caption_scores_by_hand():
    refs = {1: ["a red circle"], 2: ["a blue square"]}
    perfect = caption_scores(refs, {1: "a red circle", 2: "a blue square"}, spice=False)
    assert perfect["Bleu_1"] == pytest.approx(100.0) and perfect["ROUGE_L"] == pytest.approx(100.0)
    # unigram precision of "a red square" against "a red circle": 2 of 3 words; the other caption exact
    partial = caption_scores(refs, {1: "a red square", 2: "a blue square"}, spice=False)
    assert partial["Bleu_1"] == pytest.approx(100 * 5 / 6, abs=1e-6)
