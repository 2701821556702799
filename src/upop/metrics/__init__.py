"""Every evaluation metric of the application, one module per kind, each tested against a
hand-computed example (tests/test_metrics.py):

- retrieval: `recall_at_k` (image->text and text->image recall@1/5/10, r_mean);
- classification: `top_k_accuracy`, `accuracy` (two-way, NLVR2);
- vqa: `vqa_accuracy` and its answer normalisation `normalize_answer`;
- caption: `caption_scores` (pycocoevalcap: BLEU, METEOR, ROUGE-L, CIDEr, SPICE);
- segmentation: `confusion_matrix`, `segmentation_metrics` (mIoU, mean accuracy, pixel accuracy).
"""

from .caption import caption_scores
from .classification import accuracy, top_k_accuracy
from .retrieval import recall_at_k
from .segmentation import IGNORE_INDEX, confusion_matrix, segmentation_metrics
from .vqa import normalize_answer, vqa_accuracy

__all__ = ["IGNORE_INDEX", "accuracy", "caption_scores", "confusion_matrix", "normalize_answer", "recall_at_k",
           "segmentation_metrics", "top_k_accuracy", "vqa_accuracy"]
