"""Data layer: retrieval (Karpathy JSON, OpenMoji) and classification (ImageFolder, Fashion-MNIST) datasets.

Every bad input raises `DataError` (a ValueError) with one line naming the file, the entry and the
problem. Annotation files are checked completely when a dataset is built; images decode lazily.
"""

from ._common import DataError
from .fashion_mnist import CLASSES, FashionMNIST, find_fashion_mnist, load_fashion_mnist
from .imagefolder import IMG_EXTENSIONS, ImageFolderDataset, top_k_accuracy
from .karpathy import KarpathyEval, KarpathyTrain, pre_caption, recall_at_k
from .openmoji import build_openmoji

__all__ = [
    "CLASSES",
    "IMG_EXTENSIONS",
    "DataError",
    "FashionMNIST",
    "ImageFolderDataset",
    "KarpathyEval",
    "KarpathyTrain",
    "build_openmoji",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "pre_caption",
    "recall_at_k",
    "top_k_accuracy",
]
