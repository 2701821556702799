"""The user's own image transforms, named by the run config: `data.train_transform` /
`data.eval_transform: "package.module:name"`, a callable (a function, a torchvision `Compose` built at
module level, ...) that takes a PIL RGB image and returns a float tensor (3, size, size).

Named by import path rather than passed as a Python object so that every process of a torchrun /
accelerate launch and every DataLoader worker gets the same transform, and so that it is part of the
run config (a resumed run with another transform is another run). The module is the user's own code,
imported as their config says; it is checked once on a blank image before any data is read.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from ._common import DataError, one_line


def user_transform(spec: str | None, key: str, image_size: int) -> Callable[[Any], Any] | None:
    """The callable `spec` names ("package.module:name", name may be dotted), checked to map a PIL RGB
    image to a tensor of shape (3, image_size, image_size); None when `spec` is None. `key` is the
    config key (e.g. "data.train_transform") that messages name."""
    if spec is None:
        return None
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise DataError(f"{key} must look like 'package.module:name', got {spec!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises while it is imported
        raise DataError(f"{key}: cannot import {module_name!r}: {one_line(exc) or type(exc).__name__}") from exc
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise DataError(f"{key}: {module_name!r} has no {attribute!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise DataError(f"{key}: {spec} is a {type(obj).__name__}, not a callable")
    _check(obj, spec, key, image_size)
    return obj


def _check(transform: Callable[[Any], Any], spec: str, key: str, size: int) -> None:
    """One call on a non-square blank image: the shape every batch is stacked with must come out."""
    import torch
    from PIL import Image

    probe = Image.new("RGB", (size + size // 4 + 1, size), "gray")
    try:
        out = transform(probe)
    except Exception as exc:
        raise DataError(f"{key}: {spec} fails on a {probe.width}x{probe.height} RGB image: "
                        f"{one_line(exc) or type(exc).__name__}") from exc
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (3, size, size) or not out.is_floating_point():
        got = f"a tensor {out.dtype} {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise DataError(f"{key}: {spec} returns {got}; expected a float tensor (3, {size}, {size}) "
                        f"(the model's image size)")
