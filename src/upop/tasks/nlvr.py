"""Visual reasoning on NLVR2: two images, one statement, true or false (paper section 5, "NLVR2").

Model: the paper's twin-branch `BlipNLVRTwinModel` from BLIP's official NLVR2 checkpoint (model.name:
`model_base_nlvr.pth`, a `.safetensors` of it, or a folder holding it; model.tokenizer: a BERT or BLIP
tokenizer folder), or a `*-blip-nlvr-twin` preset; or the single-branch `BlipForNLVR` (a preset, or a
Hugging Face BLIP checkpoint folder with a fresh head). The statement's first token is BLIP's
[ENC], as in BLIP's NLVR model. Loss: plain cross-entropy on the two logits (the paper's;
train.label_smoothing is not used). Metric: accuracy in percent on dev (`val`, checkpoint selection) and test.

Data: data.format nlvr2 (the official JSON-lines files, data.root = image root, data.train /
val / test = train.json / dev.json / test1.json), or openmoji (the OpenMoji-derived statements of
`build_openmoji_nlvr`, in the same format, built next to the OpenMoji cache in data.root).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data import DataError, drop_none
from ..data.nlvr2 import NLVR2Dataset
from ..data.openmoji_nlvr import SPLITS as OPENMOJI_NLVR_SPLITS
from ..data.openmoji_nlvr import build_openmoji_nlvr
from ..metrics import accuracy
from ..models import BuiltModel, hub_tokenizer, require_model_type
from ..models.blip_nlvr import BlipNLVRTwinModel
from ..models.nlvr import BlipForNLVR, from_blip_checkpoint
from ..models.official import NLVR_FILE, load_official_nlvr, official_file
from ..runconfig import ConfigError, RunConfig
from ._recipe import Recipe
from .base import Task, evaluating, openmoji_source, register_task


@register_task
class NLVRTask(Recipe, Task):
    name = "nlvr"
    metric = "accuracy"
    formats = ("openmoji", "nlvr2")

    @classmethod
    def load_hub_model(cls, config: Any, source: str, num_labels: int | None, **kwargs: Any) -> tuple[nn.Module, Any]:
        # project-built model: BLIP's vision_model + text_encoder, fresh head
        require_model_type(cls.name, config, source, "blip", "BLIP")
        return from_blip_checkpoint(source, **kwargs), hub_tokenizer(source, **kwargs)

    @classmethod
    def load_model(cls, model_cfg: Any, image_size: int, num_labels: int | None = None) -> BuiltModel:
        """BLIP's official NLVR2 checkpoint (model.name a .pth / .safetensors file or a folder holding
        model_base_nlvr.pth), else a preset or a Hugging Face BLIP folder."""
        path = official_file(model_cfg.name, NLVR_FILE)
        if path is not None:
            return load_official_nlvr(path, image_size, model_cfg.tokenizer)
        return super().load_model(model_cfg, image_size, num_labels)

    def check_model(self, model: nn.Module) -> None:
        if not isinstance(model, (BlipNLVRTwinModel, BlipForNLVR)):
            raise ConfigError(f"task nlvr needs a BlipForNLVR model or the paper's BlipNLVRTwinModel, "
                              f"got {type(model).__name__}")

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        data = cfg.data
        if data.format == "openmoji":
            source = openmoji_source(data)
            root = build_openmoji_nlvr(source.with_name(source.name + "-nlvr"), source, seed=0)
            files = {s: root / f"{name}.json" for s, name in OPENMOJI_NLVR_SPLITS.items()}
            image_root = root / "images"
        else:
            files = {s: Path(getattr(data, s)).expanduser() for s in ("train", "val", "test")}
            image_root = Path(data.root).expanduser()
        # every annotation line and image path is checked before the model is built
        self.splits: dict[str, Dataset] = {
            s: NLVR2Dataset(files[s], image_root, on_bad_input=data.on_bad_input) for s in ("train", "val", "test")}
        self.build_model()
        if self.built.tokenizer is None:
            raise DataError("the nlvr model has no tokenizer")
        self.splits["train"].transform = self.train_transform()
        for s in ("val", "test"):
            self.splits[s].transform = self.eval_transform()
        self._train: Dataset = self.limited(self.splits["train"], data.limit_train)

    def train_dataset(self) -> Dataset:
        return self._train

    def tokens(self, sentences: list[str], padding: str = "longest") -> dict[str, torch.Tensor]:
        """Tokenised statements (B, L) whose first token is [ENC] when the tokenizer has one (BLIP)."""
        out = self.built.tokenizer(sentences, padding=padding, truncation=True, max_length=self.cfg.data.max_tokens,
                                   return_tensors="pt")
        input_ids = out["input_ids"].clone()
        enc = getattr(self.built.tokenizer, "enc_token_id", None)
        if enc is not None:
            input_ids[:, 0] = enc  # BLIP's NLVR encoder reads [ENC] where BERT has [CLS]
        return {"input_ids": input_ids, "attention_mask": out["attention_mask"]}

    def collate(self, items: list) -> dict[str, torch.Tensor]:
        left, right, sentences, labels = zip(*items, strict=True)
        return {**self.tokens(list(sentences)), "pixel_values_left": torch.stack(left),
                "pixel_values_right": torch.stack(right), "labels": torch.as_tensor(labels, dtype=torch.long)}

    @staticmethod
    def _forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values_left=batch["pixel_values_left"],
                     pixel_values_right=batch["pixel_values_right"]).logits

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(self._forward(model, batch), batch["labels"])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, device: torch.device) -> dict[str, float]:
        ds = self.limited(self.splits[split], self.cfg.data.limit_eval)
        logits, labels = [], []
        loader = DataLoader(ds, batch_size=self.cfg.train.eval_batch_size, collate_fn=drop_none(self.collate),
                            num_workers=self.cfg.data.num_workers)
        with evaluating(model):
            for batch in filter(None, loader):  # None: every pair of the batch skipped (on_bad_input skip)
                labels.append(batch.pop("labels"))
                batch = {k: v.to(device) for k, v in batch.items()}
                logits.append(self._forward(model, batch).float().cpu())
        if not labels:
            raise DataError(f"nlvr {split}: no example left to evaluate")
        return accuracy(torch.cat(logits), torch.cat(labels))

    def example_inputs(self, batch_size: int) -> dict[str, Any]:
        """A statement of data.max_tokens tokens and two images per example."""
        size = self.built.image_size
        tokens = self.tokens(["a"] * batch_size, padding="max_length")
        return {**tokens, "pixel_values_left": torch.randn(batch_size, 3, size, size),
                "pixel_values_right": torch.randn(batch_size, 3, size, size)}
