"""Visual reasoning on NLVR2: two images, one statement, true or false (paper section 5, "NLVR2").

Model: upop.architectures.nlvr.BlipForNLVR (a preset, or a BLIP checkpoint folder with a fresh
head). The statement's first token is BLIP's [ENC], as in BLIP's NLVR model. Loss: plain
cross-entropy on the two logits (the paper's; train.label_smoothing is not used). Metric:
accuracy in percent on dev (`val`, checkpoint selection) and test.

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
from torch.utils.data import DataLoader, Dataset, Subset

from ..data import DataError, drop_none
from ..data.nlvr2 import NLVR2Dataset
from ..data.openmoji_nlvr import SPLITS as OPENMOJI_NLVR_SPLITS
from ..data.openmoji_nlvr import build_openmoji_nlvr
from ..models import build_model
from ..runconfig import RunConfig
from .base import Task, openmoji_source


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """accuracy (%) of argmax(logits) and how often "true" is predicted (%, to spot a collapsed model)."""
    if len(labels) == 0:
        raise ValueError("accuracy of an empty evaluation set")
    predicted = logits.argmax(dim=-1)
    return {"accuracy": 100.0 * float((predicted == labels).float().mean()),
            "predicted_true": 100.0 * float(predicted.float().mean())}


class NLVRTask(Task):
    name = "nlvr"
    metric = "accuracy"

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        data = cfg.data
        if data.format == "openmoji":
            source = openmoji_source(data)
            root = build_openmoji_nlvr(source.with_name(source.name + "-nlvr"), source, seed=0)
            files = {s: root / f"{name}.json" for s, name in OPENMOJI_NLVR_SPLITS.items()}
            image_root = root / "images"
        elif data.format == "nlvr2":
            missing = [k for k in ("root", "train", "val", "test") if getattr(data, k) is None]
            if missing:
                raise DataError(f"data.format nlvr2 needs data.{', data.'.join(missing)}")
            files = {s: Path(getattr(data, s)).expanduser() for s in ("train", "val", "test")}
            image_root = Path(data.root).expanduser()
        else:
            raise DataError(f"task nlvr reads data.format nlvr2 or openmoji, not {data.format}")
        # every annotation line and image path is checked before the model is built
        self.splits: dict[str, Dataset] = {
            s: NLVR2Dataset(files[s], image_root, on_bad_input=data.on_bad_input) for s in ("train", "val", "test")}
        self.built = build_model(cfg.model, "nlvr", data.image_size)
        if self.built.tokenizer is None:
            raise DataError("the nlvr model has no tokenizer")
        self.splits["train"].transform = self.train_transform()
        for s in ("val", "test"):
            self.splits[s].transform = self.eval_transform()
        self._train: Dataset = self.splits["train"]
        if data.limit_train:
            self._train = Subset(self._train, range(min(data.limit_train, len(self._train))))

    def build_fresh_model(self) -> nn.Module:
        return build_model(self.cfg.model, "nlvr", self.cfg.data.image_size).model

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
        ds = self.splits[split]
        limit = self.cfg.data.limit_eval
        if limit:
            ds = Subset(ds, range(min(limit, len(ds))))
        was_training = model.training
        model.eval()
        logits, labels = [], []
        loader = DataLoader(ds, batch_size=self.cfg.train.eval_batch_size, collate_fn=drop_none(self.collate),
                            num_workers=self.cfg.data.num_workers)
        for batch in filter(None, loader):  # None: every pair of the batch skipped (on_bad_input skip)
            labels.append(batch.pop("labels"))
            batch = {k: v.to(device) for k, v in batch.items()}
            logits.append(self._forward(model, batch).float().cpu())
        model.train(was_training)
        if not labels:
            raise DataError(f"nlvr {split}: no example left to evaluate")
        return accuracy(torch.cat(logits), torch.cat(labels))

    def example_inputs(self, batch_size: int) -> dict[str, Any]:
        """A statement of data.max_tokens tokens and two images per example."""
        size = self.built.image_size
        tokens = self.tokens(["a"] * batch_size, padding="max_length")
        return {**tokens, "pixel_values_left": torch.randn(batch_size, 3, size, size),
                "pixel_values_right": torch.randn(batch_size, 3, size, size)}
