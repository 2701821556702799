"""Image-text retrieval with a dual encoder (CLIPModel, VisionTextDualEncoderModel).

Loss: contrastive (ITC) where captions of the same image are all positives (targets are
row-normalised), as in the paper's ITC without the momentum queue. Metric: recall@1/5/10 in
both directions and their mean `r_mean`, the paper's selection metric.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data import DataError, KarpathyEval, KarpathyTrain, build_openmoji, recall_at_k
from ..models import build_model
from ..runconfig import RunConfig
from .base import Task

DEFAULT_OPENMOJI_CACHE = Path("~/.cache/upop/openmoji").expanduser()


def features(output: Any) -> torch.Tensor:
    """transformers 5 returns a model output whose pooler_output holds the projected features."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class RetrievalTask(Task):
    name = "retrieval"
    metric = "r_mean"

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        data = cfg.data
        if data.format == "openmoji":
            root = Path(data.root).expanduser() if data.root else DEFAULT_OPENMOJI_CACHE
            root = build_openmoji(root, image_size=max(data.image_size, 64))
            files = {s: root / f"{s}.json" for s in ("train", "val", "test")}
            image_root = root
        elif data.format == "karpathy":
            missing = [k for k in ("root", "train", "val", "test") if getattr(data, k) is None]
            if missing:
                raise DataError(f"data.format karpathy needs data.{', data.'.join(missing)}")
            files = {s: Path(getattr(data, s)).expanduser() for s in ("train", "val", "test")}
            image_root = Path(data.root).expanduser()
        else:
            raise DataError(f"task retrieval reads data.format openmoji or karpathy, not {data.format}")
        # Parse and check every annotation file before the model is built.
        bad = data.on_bad_input
        self._train = KarpathyTrain(files["train"], image_root, on_bad_input=bad)
        self._eval = {s: KarpathyEval(files[s], image_root, on_bad_input=bad) for s in ("val", "test")}
        self.built = build_model(cfg.model, "retrieval", data.image_size)
        if self.built.tokenizer is None:
            raise DataError("the retrieval model has no tokenizer")
        self._train.transform = self.train_transform()
        for ds in self._eval.values():
            ds.transform = self.eval_transform()
        if data.limit_train:
            self._train = torch.utils.data.Subset(self._train, range(min(data.limit_train, len(self._train))))

    def build_fresh_model(self) -> nn.Module:
        return build_model(self.cfg.model, "retrieval", self.cfg.data.image_size).model

    def train_dataset(self) -> Dataset:
        return self._train

    def _tokens(self, captions: list[str]) -> dict[str, torch.Tensor]:
        out = self.built.tokenizer(captions, padding="longest", truncation=True,
                                   max_length=self.cfg.data.max_tokens, return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    def collate(self, items: list) -> dict[str, torch.Tensor]:
        images, captions, image_ids = zip(*items, strict=True)
        return {"pixel_values": torch.stack(images), **self._tokens(list(captions)),
                "image_ids": torch.as_tensor(image_ids)}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"])
        logits = out.logits_per_image  # logit_scale * normalised image @ text^T
        ids = batch["image_ids"]
        positives = (ids[:, None] == ids[None, :]).to(logits.dtype)
        targets = positives / positives.sum(1, keepdim=True)
        i2t = -(F.log_softmax(logits, dim=1) * targets).sum(1).mean()
        t2i = -(F.log_softmax(logits.t(), dim=1) * targets).sum(1).mean()
        return (i2t + t2i) / 2

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, device: torch.device) -> dict[str, float]:
        ds = self._eval[split]
        limit = self.cfg.data.limit_eval
        n_images = min(limit, len(ds)) if limit else len(ds)
        was_training = model.training
        model.eval()
        bs = self.cfg.train.eval_batch_size
        image_feats = []
        subset = torch.utils.data.Subset(ds, range(n_images))
        for images, _ in DataLoader(subset, batch_size=bs, num_workers=self.cfg.data.num_workers):
            image_feats.append(F.normalize(features(model.get_image_features(pixel_values=images.to(device))), dim=-1))
        text_ids = [t for i in range(n_images) for t in ds.img2txt[i]]
        texts = [ds.texts[t] for t in text_ids]
        text_feats = []
        for start in range(0, len(texts), bs):
            tokens = {k: v.to(device) for k, v in self._tokens(texts[start:start + bs]).items()}
            text_feats.append(F.normalize(features(model.get_text_features(**tokens)), dim=-1))
        model.train(was_training)
        sim = torch.cat(image_feats).float() @ torch.cat(text_feats).float().t()
        position = {t: j for j, t in enumerate(text_ids)}
        img2txt = [[position[t] for t in ds.img2txt[i]] for i in range(n_images)]
        txt2img = [ds.txt2img[t] for t in text_ids]
        return recall_at_k(sim.cpu(), img2txt, txt2img)

    def example_inputs(self, batch_size: int) -> dict[str, Any]:
        length = self.cfg.data.max_tokens
        tokens = self.built.tokenizer(["a"] * batch_size, padding="max_length", max_length=length,
                                      truncation=True, return_tensors="pt")
        size = self.built.image_size
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"],
                "pixel_values": torch.randn(batch_size, 3, size, size)}
