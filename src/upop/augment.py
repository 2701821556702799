"""Augmentation and regularisation of the paper's recipes, from the field's libraries.

`train.augment` picks the training transform (`train_transform`):
- "none" (default): the task's plain transform (RandomResizedCrop(size, scale 0.5-1, bicubic));
- "blip": BLIP's (`transform_train` of salesforce/BLIP data/__init__.py): RandomResizedCrop(size,
  scale 0.5-1, bicubic), RandomHorizontalFlip, then `BlipRandAugment` (2 ops, magnitude 5 of 10);
- "deit": DeiT's, through `timm.data.create_transform(is_training=True,
  auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic", re_prob=train.random_erasing,
  re_mode="pixel")`.
Evaluation (`eval_transform`): bicubic resize to size x size (BLIP's; the default), or with
`train.eval_crop` < 1 DeiT's resize of the short side to int(size / eval_crop) and a centre crop.

`Mixing` is timm's Mixup / CutMix (`train.mixup`, `train.cutmix`) with SoftTargetCrossEntropy and
`train.label_smoothing`, for classification.

`add_drop_path(model, rate)`: stochastic depth of the vision tower, the rate rising linearly over
the depth from 0 to `rate` (`train.drop_path`) as DeiT and BLIP do. timm blocks get their own
DropPath modules; Hugging Face layers have none, so a forward hook on each residual branch's last
module (the attention output projection and the MLP's fc2) multiplies the branch output per sample
by Bernoulli(keep) / keep in training mode. The residual sum happens outside those modules, so this
is exactly drop-path; in eval mode the hook returns the output unchanged.

Randomness comes from torch's RNG, which the trainer reseeds every epoch (so a resumed run makes the
same draws); timm's transforms and Mixup draw from Python's and NumPy's generators, which are seeded
from torch's before each call for the same reason.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms as T
from torchvision.transforms.autoaugment import _apply_op

BICUBIC = T.InterpolationMode.BICUBIC
BLIP_FILL = [128, 128, 128]  # BLIP's randaugment.py fills exposed pixels with grey


def _seed_host_rngs() -> None:
    """Seed Python's and NumPy's generators from torch's (timm draws from them)."""
    seed = int(torch.randint(0, 2**31 - 1, ()))
    random.seed(seed)
    np.random.seed(seed)


class TorchSeeded:
    """A transform whose Python / NumPy randomness follows torch's RNG (picklable for workers)."""

    def __init__(self, transform: Callable[[Any], Any]) -> None:
        self.transform = transform

    def __call__(self, image: Any) -> Any:
        _seed_host_rngs()
        return self.transform(image)

    def __repr__(self) -> str:
        return f"TorchSeeded({self.transform!r})"


class BlipRandAugment(T.RandAugment):
    """BLIP's RandomAugment(2, 5) (transform/randaugment.py) on torchvision's RandAugment: the same ten
    operations (Identity, AutoContrast, Equalize, Brightness, Sharpness, ShearX/Y, TranslateX/Y,
    Rotate; torchvision's extra Color, Contrast, Posterize and Solarize are left out), magnitude
    `level` of BLIP's 10 (shear 0.3 * level/10, rotate 30 degrees * level/10, translate 10 px *
    level/10, enhance factor 0.1 + 1.8 * level/10: 1.0 at level 5, as BLIP's), each picked operation
    applied with probability 0.5, bilinear warps with grey fill. What differs: BLIP warps with OpenCV,
    this with PIL (the same affine maps; border pixels may round differently)."""

    def __init__(self, num_ops: int = 2, level: int = 5) -> None:
        super().__init__(num_ops=num_ops, magnitude=level, num_magnitude_bins=11,
                         interpolation=T.InterpolationMode.BILINEAR, fill=BLIP_FILL)

    def _augmentation_space(self, num_bins: int, image_size: tuple[int, int]) -> dict[str, tuple[torch.Tensor, bool]]:
        # BLIP's enhance factor (level / 10) * 1.8 + 0.1, as torchvision's "1 + magnitude", unsigned
        enhance = torch.tensor([(i / (num_bins - 1)) * 1.8 + 0.1 - 1 for i in range(num_bins)])
        return {
            "Identity": (torch.tensor(0.0), False),
            "AutoContrast": (torch.tensor(0.0), False),
            "Equalize": (torch.tensor(0.0), False),
            "Brightness": (enhance, False),
            "Sharpness": (enhance, False),
            "ShearX": (torch.linspace(0.0, 0.3, num_bins), True),
            "ShearY": (torch.linspace(0.0, 0.3, num_bins), True),
            "TranslateX": (torch.linspace(0.0, 10.0, num_bins), True),
            "TranslateY": (torch.linspace(0.0, 10.0, num_bins), True),
            "Rotate": (torch.linspace(0.0, 30.0, num_bins), True),
        }

    def forward(self, img: Any) -> Any:
        ops = self._augmentation_space(self.num_magnitude_bins, T.functional.get_image_size(img)[::-1])
        names = list(ops)
        for _ in range(self.num_ops):
            name = names[int(torch.randint(len(names), ()))]
            if float(torch.rand(())) < 0.5:  # BLIP applies each drawn operation with probability 0.5
                continue
            magnitudes, signed = ops[name]
            magnitude = float(magnitudes[self.magnitude]) if magnitudes.ndim > 0 else 0.0
            if signed and int(torch.randint(2, ())):
                magnitude = -magnitude
            img = _apply_op(img, name, magnitude, interpolation=self.interpolation, fill=self.fill)
        return img


def train_transform(train_cfg: Any, size: int, mean: tuple[float, ...], std: tuple[float, ...],
                    plain: Callable[[], Any]) -> Any:
    """The training image transform `train.augment` names; "none" is `plain()`, the task's own."""
    kind = getattr(train_cfg, "augment", "none")
    if kind == "none":
        return plain()
    if kind == "blip":
        return T.Compose([
            T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=BICUBIC),
            T.RandomHorizontalFlip(),
            BlipRandAugment(2, 5),
            T.ToTensor(),
            T.Normalize(mean, std),
        ])
    if kind == "deit":
        from timm.data import create_transform

        return TorchSeeded(create_transform(
            input_size=size, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", interpolation="bicubic",
            re_prob=train_cfg.random_erasing, re_mode="pixel", re_count=1, mean=tuple(mean), std=tuple(std)))
    raise ValueError(f"train.augment must be none, blip or deit, got {kind!r}")


def eval_transform(train_cfg: Any, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> T.Compose:
    """Bicubic resize to size x size (train.eval_crop 1, the default), or DeiT's: the short side to
    int(size / eval_crop), then a centre crop of size x size (eval_crop 0.875: 256 -> 224)."""
    crop = getattr(train_cfg, "eval_crop", 1.0)
    resize = [T.Resize((size, size), interpolation=BICUBIC)] if crop >= 1 else [
        T.Resize(int(size / crop), interpolation=BICUBIC), T.CenterCrop(size)]
    return T.Compose([*resize, T.ToTensor(), T.Normalize(mean, std)])


# ---- Mixup / CutMix ----------------------------------------------------------------------------
class Mixing:
    """timm's Mixup (batch mode) with its SoftTargetCrossEntropy: `loss(logits_fn, images, labels)`.

    Off (`active` False) when both alphas are 0: the caller keeps its plain cross-entropy."""

    def __init__(self, mixup: float, cutmix: float, label_smoothing: float, num_classes: int) -> None:
        self.active = mixup > 0 or cutmix > 0
        self.smoothing, self.num_classes = label_smoothing, num_classes
        if self.active:
            from timm.data import Mixup
            from timm.loss import SoftTargetCrossEntropy

            self.mix = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=label_smoothing,
                             num_classes=num_classes)
            self.criterion = SoftTargetCrossEntropy()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixed images and soft targets (B, classes). timm mixes pairs: an odd batch (an image skipped
        under data.on_bad_input) keeps its last example unmixed, with the smoothed one-hot target."""
        _seed_host_rngs()
        even = images.shape[0] - images.shape[0] % 2
        if even == 0:
            return images, self.smoothed(labels)
        mixed, targets = self.mix(images[:even].clone(), labels[:even])
        if even < images.shape[0]:
            mixed = torch.cat([mixed, images[even:]])
            targets = torch.cat([targets, self.smoothed(labels[even:]).to(targets.dtype)])
        return mixed, targets

    def smoothed(self, labels: torch.Tensor) -> torch.Tensor:
        off = self.smoothing / self.num_classes
        return F.one_hot(labels, self.num_classes).float() * (1 - self.smoothing) + off

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.criterion(logits.float(), targets)


# ---- drop-path ---------------------------------------------------------------------------------
class DropPathHook:
    """Forward hook: in training mode, each sample's output is kept with probability 1 - rate and
    scaled by 1 / (1 - rate), else zeroed (one draw per sample for the whole branch)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate

    def __call__(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if not module.training or self.rate <= 0:
            return output
        keep = 1.0 - self.rate
        shape = (output.shape[0],) + (1,) * (output.dim() - 1)
        mask = torch.empty(shape, device=output.device, dtype=output.dtype).bernoulli_(keep)
        return output * mask / keep


# per Hugging Face vision layer class: its residual branches' last modules
_BRANCH_ENDS = {
    "ViTLayer": ("attention.o_proj", "mlp.fc2"),
    "DeiTLayer": ("attention.o_proj", "mlp.fc2"),
    "BlipEncoderLayer": ("self_attn.projection", "mlp.fc2"),
    "CLIPEncoderLayer": ("self_attn.out_proj", "mlp.fc2"),
    "SiglipEncoderLayer": ("self_attn.out_proj", "mlp.fc2"),
}


def _vision_layer_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The encoder layer lists of the vision towers (never a text tower, never a Segmenter decoder)."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or not len(module):
            continue
        kind = type(module[0]).__name__
        if kind == "Block" and hasattr(module[0], "drop_path1"):  # a timm ViT's `blocks`
            found.append((name, module))
        elif kind in _BRANCH_ENDS and name.rsplit(".", 1)[-1] in ("layer", "layers"):
            if kind in ("CLIPEncoderLayer", "SiglipEncoderLayer") and "vision" not in name:
                continue  # the same layer class serves CLIP's text tower
            found.append((name, module))
    return found


def add_drop_path(model: nn.Module, rate: float) -> int:
    """Stochastic depth over every vision tower of `model`, layer i of n at rate * i / (n - 1);
    returns the number of layers given a non-zero rate. rate 0 changes nothing. Raises ValueError
    when the model has no vision layer this knows."""
    if rate <= 0:
        return 0
    lists = _vision_layer_lists(model)
    if not lists:
        raise ValueError(f"train.drop_path: no vision encoder layers found in {type(model).__name__}")
    count = 0
    for _, layers in lists:
        rates = torch.linspace(0, rate, len(layers)).tolist()
        for layer, r in zip(layers, rates, strict=True):
            kind = type(layer).__name__
            if kind == "Block":  # timm: its own DropPath modules, as drop_path_rate at creation makes them
                from timm.layers import DropPath

                layer.drop_path1 = DropPath(r) if r > 0 else nn.Identity()
                layer.drop_path2 = DropPath(r) if r > 0 else nn.Identity()
            else:
                for path in _BRANCH_ENDS[kind]:
                    layer.get_submodule(path).register_forward_hook(DropPathHook(r))
            count += r > 0
    return count


__all__ = ["BlipRandAugment", "DropPathHook", "Mixing", "TorchSeeded", "add_drop_path", "eval_transform",
           "train_transform"]
