"""Image-text retrieval with a dual encoder (CLIPModel, VisionTextDualEncoderModel) or with BLIP
(BlipForImageTextRetrieval, see blip_retrieval.py).

Dual encoders: contrastive loss (ITC) where captions of the same image are all positives (targets
are row-normalised), as in the paper's ITC without the momentum queue; evaluation ranks by cosine
similarity. BLIP: ITC + ITM with hard negatives; evaluation re-ranks the ITC top `eval.k_test`
candidates with the ITM head. Metric: recall@1/5/10 in both directions and their mean `r_mean`,
the paper's selection metric.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data import DataError, recall_at_k
from ..models import build_model
from ..runconfig import ConfigError, RunConfig
from .base import Task, karpathy_splits
from .blip_retrieval import (
    blip_retrieval_loss,
    encoder_ids,
    image_embeddings,
    is_blip_retrieval,
    rerank_scores,
    text_features,
)


def features(output: Any) -> torch.Tensor:
    """transformers 5 returns a model output whose pooler_output holds the projected features."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class RetrievalTask(Task):
    name = "retrieval"
    metric = "r_mean"

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        data = cfg.data
        # every annotation file is parsed and checked before the model is built
        self._train, self._eval = karpathy_splits(data, "retrieval")
        self.built = build_model(cfg.model, "retrieval", data.image_size)
        if self.built.tokenizer is None:
            raise DataError("the retrieval model has no tokenizer")
        self.blip = is_blip_retrieval(self.built.model)
        self.enc_token_id: int | None = getattr(self.built.tokenizer, "enc_token_id", None)
        if self.blip and self.enc_token_id is None:
            raise ConfigError("a BLIP retrieval model needs BLIP's tokenizer, with its [ENC] token (ITM input)")
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
        if self.blip:
            return blip_retrieval_loss(model, batch, self.enc_token_id)
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
        if is_blip_retrieval(model):
            return self._evaluate_blip(model, split, device)
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

    @torch.no_grad()
    def _evaluate_blip(self, model: nn.Module, split: str, device: torch.device) -> dict[str, float]:
        """BLIP's evaluation: ITC similarities, top eval.k_test candidates re-scored with ITM."""
        ds = self._eval[split]
        limit = self.cfg.data.limit_eval
        n_images = min(limit, len(ds)) if limit else len(ds)
        was_training = model.training
        model.eval()
        bs = self.cfg.train.eval_batch_size
        image_embeds, image_feats = [], []
        subset = torch.utils.data.Subset(ds, range(n_images))
        for images, _ in DataLoader(subset, batch_size=bs, num_workers=self.cfg.data.num_workers):
            embeds, feats = image_embeddings(model, images.to(device))
            image_embeds.append(embeds)
            image_feats.append(feats)
        text_ids = [t for i in range(n_images) for t in ds.img2txt[i]]
        tokens = {k: v.to(device) for k, v in self._tokens([ds.texts[t] for t in text_ids]).items()}
        text_feats = [text_features(model, tokens["input_ids"][s:s + bs], tokens["attention_mask"][s:s + bs])
                      for s in range(0, len(text_ids), bs)]
        sim = torch.cat(image_feats).float() @ torch.cat(text_feats).float().t()
        i2t, t2i = rerank_scores(model, torch.cat(image_embeds), sim,
                                 encoder_ids(tokens["input_ids"], self.enc_token_id), tokens["attention_mask"],
                                 self.cfg.eval.k_test, bs)
        model.train(was_training)
        position = {t: j for j, t in enumerate(text_ids)}
        img2txt = [[position[t] for t in ds.img2txt[i]] for i in range(n_images)]
        txt2img = [ds.txt2img[t] for t in text_ids]
        # two score matrices: image->text recalls from i2t's rows, text->image ones from t2i's rows
        out = {k: v for k, v in recall_at_k(i2t.cpu(), img2txt, txt2img).items() if k.startswith("txt_")}
        out.update({k: v for k, v in recall_at_k(t2i.t().cpu(), img2txt, txt2img).items() if k.startswith("img_")})
        out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
        return out

    def example_inputs(self, batch_size: int) -> dict[str, Any]:
        """Dual encoders: both towers; BLIP: the ITM forward of one (image, caption) pair per example
        (vision + cross-attending text encoder), the cost of re-ranking one candidate."""
        length = self.cfg.data.max_tokens
        tokens = self.built.tokenizer(["a"] * batch_size, padding="max_length", max_length=length,
                                      truncation=True, return_tensors="pt")
        input_ids = tokens["input_ids"]
        if self.blip:
            input_ids = encoder_ids(input_ids, self.enc_token_id)
        size = self.built.image_size
        return {"input_ids": input_ids, "attention_mask": tokens["attention_mask"],
                "pixel_values": torch.randn(batch_size, 3, size, size)}
