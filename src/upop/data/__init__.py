"""Data layer: retrieval (Karpathy JSON, OpenMoji) and classification (ImageFolder, Fashion-MNIST) datasets.

Every bad input raises `DataError` (a ValueError) with one line naming the file, the entry and the
problem. Annotation files are checked completely when a dataset is built; images decode lazily.

`on_bad_input` (the run config's `data.on_bad_input`): "stop" (default) raises DataError for a missing
image file, an empty caption or an image that fails to decode; "skip" drops them instead, counts them
in the dataset's `skipped` list and logs them on the "upop" logger. Training items whose image fails
to decode are returned as None: wrap the collate function with `drop_none`.
"""

from ._common import BAD_INPUT_MODES, DataError, DropNone, drop_none
from .ade20k import ADE20KDataset, load_annotation
from .caption_metrics import caption_scores
from .fashion_mnist import CLASSES, FashionMNIST, find_fashion_mnist, load_fashion_mnist
from .imagefolder import IMG_EXTENSIONS, ImageFolderDataset, top_k_accuracy
from .karpathy import KarpathyEval, KarpathyTrain, pre_caption, recall_at_k
from .nlvr2 import NLVR2Dataset, read_nlvr2
from .openmoji import build_openmoji
from .openmoji_nlvr import build_openmoji_nlvr
from .openmoji_seg import build_openmoji_seg
from .openmoji_vqa import build_openmoji_vqa
from .vqav2 import VQAv2Dataset, normalize_answer, read_vqav2, vqa_accuracy

__all__ = [
    "ADE20KDataset",
    "build_openmoji_seg",
    "load_annotation",
    "BAD_INPUT_MODES",
    "CLASSES",
    "IMG_EXTENSIONS",
    "DataError",
    "DropNone",
    "FashionMNIST",
    "ImageFolderDataset",
    "KarpathyEval",
    "KarpathyTrain",
    "NLVR2Dataset",
    "build_openmoji",
    "caption_scores",
    "build_openmoji_nlvr",
    "build_openmoji_vqa",
    "VQAv2Dataset",
    "normalize_answer",
    "read_vqav2",
    "vqa_accuracy",
    "drop_none",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "pre_caption",
    "read_nlvr2",
    "recall_at_k",
    "top_k_accuracy",
]
