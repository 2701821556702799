"""Models this project builds itself, as `transformers.PreTrainedModel` subclasses with their own
config class: the BLIP-based NLVR2 model and the Segmenter. `upop.save_pretrained` /
`upop.from_pretrained` rebuild them by class name from `ARCHITECTURES`, like transformers' own
classes; the adapters find their prunable structures like any other model's.
"""

from __future__ import annotations

from transformers import PreTrainedModel

ARCHITECTURES: dict[str, type[PreTrainedModel]] = {}


def register(cls: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """Class decorator: make a project-built model class loadable by `upop.from_pretrained`."""
    ARCHITECTURES[cls.__name__] = cls
    return cls


from . import nlvr, segmenter  # noqa: E402,F401  (each registers its classes)
