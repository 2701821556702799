"""Data layer: retrieval (Karpathy JSON, OpenMoji) and classification (ImageFolder, Fashion-MNIST) datasets.

Every bad input raises `DataError` (a ValueError) with one line naming the file, the entry and the
problem. Annotation files are checked completely when a dataset is built; images decode lazily.

`on_bad_input` (the run config's `data.on_bad_input`): "stop" (default) raises DataError for a missing
image file, an empty caption or an image that fails to decode; "skip" drops them instead, counts them
in the dataset's `skipped` list and logs them on the "upop" logger. Training items whose image fails
to decode are returned as None: wrap the collate function with `drop_none`.
"""

from ._common import BAD_INPUT_MODES, DataError, DropNone, drop_none
from .fashion_mnist import CLASSES, FashionMNIST, find_fashion_mnist, load_fashion_mnist
from .imagefolder import IMG_EXTENSIONS, ImageFolderDataset, top_k_accuracy
from .karpathy import KarpathyEval, KarpathyTrain, pre_caption, recall_at_k
from .openmoji import build_openmoji

__all__ = [
    "BAD_INPUT_MODES",
    "CLASSES",
    "IMG_EXTENSIONS",
    "DataError",
    "DropNone",
    "FashionMNIST",
    "ImageFolderDataset",
    "KarpathyEval",
    "KarpathyTrain",
    "build_openmoji",
    "drop_none",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "pre_caption",
    "recall_at_k",
    "top_k_accuracy",
]
