"""Data layer: one reader per data format, each registered in `upop.data.formats.FORMATS`:
Karpathy-split JSON (retrieval, caption), ImageFolder and Fashion-MNIST (classification), VQAv2,
NLVR2, ADE20K, Hugging Face `datasets` folders (classification, retrieval; hf_datasets.py), and the
OpenMoji-derived sets every task can run on without a download. `user_transform` loads the
image transform a run config names (data.train_transform / data.eval_transform).

Every bad input raises `DataError` (a ValueError) with one line naming the file, the entry and the
problem. Annotation files are checked completely when a dataset is built; images decode lazily.

`on_bad_input` (the run config's `data.on_bad_input`): "stop" (default) raises DataError for a missing
image file, an empty caption or an image that fails to decode; "skip" drops them instead, counts them
in the dataset's `skipped` list and logs them on the "upop" logger. Training items whose image fails
to decode are returned as None: wrap the collate function with `drop_none`.

Metrics (recall@K, top-k, VQA accuracy, caption scores) live in `upop.metrics`.
"""

from ._common import BAD_INPUT_MODES, DataError, DropNone, drop_none
from .ade20k import ADE20KDataset, load_annotation
from .emoji_text import build_emoji_text  # noqa: F401  (registers emoji_text)
from .fashion_mnist import CLASSES, FashionMNIST, find_fashion_mnist, load_fashion_mnist
from .formats import FORMATS, DataFormat
from .hf_datasets import HFImageClassification, HFRetrievalEval, HFRetrievalTrain
from .imagefolder import IMG_EXTENSIONS, ImageFolderDataset, split_folder
from .karpathy import KarpathyEval, KarpathyTrain, pre_caption
from .nlvr2 import NLVR2Dataset, read_nlvr2
from .openmoji import build_openmoji
from .openmoji_nlvr import build_openmoji_nlvr
from .openmoji_seg import build_openmoji_seg
from .openmoji_vqa import build_openmoji_vqa
from .text_pairs import TextPairs, read_text_pairs  # noqa: F401  (registers text_pairs)
from .transforms import user_transform
from .vqav2 import VQAv2Dataset, read_vqav2

__all__ = [
    "ADE20KDataset",
    "BAD_INPUT_MODES",
    "CLASSES",
    "FORMATS",
    "IMG_EXTENSIONS",
    "DataError",
    "DataFormat",
    "DropNone",
    "FashionMNIST",
    "HFImageClassification",
    "HFRetrievalEval",
    "HFRetrievalTrain",
    "ImageFolderDataset",
    "KarpathyEval",
    "KarpathyTrain",
    "NLVR2Dataset",
    "VQAv2Dataset",
    "build_openmoji",
    "build_openmoji_nlvr",
    "build_openmoji_seg",
    "build_openmoji_vqa",
    "drop_none",
    "find_fashion_mnist",
    "load_annotation",
    "load_fashion_mnist",
    "pre_caption",
    "read_nlvr2",
    "read_vqav2",
    "split_folder",
    "user_transform",
]
