"""Image-text retrieval with a dual encoder (CLIPModel, VisionTextDualEncoderModel) or with BLIP
(BlipForImageTextRetrieval, its losses and re-ranking in blip_itm.py).

Dual encoders: contrastive loss (ITC) where captions of the same image are all positives (targets
are row-normalised), as in the paper's ITC without the momentum queue; evaluation ranks by cosine
similarity. BLIP: ITC + ITM with hard negatives; evaluation re-ranks the ITC top `retrieval.k_test`
candidates with the ITM head. Metric: recall@1/5/10 in both directions and their mean `r_mean`,
the paper's selection metric.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import transformers as tf
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data import DataError
from ..metrics import recall_at_k
from ..models import hub_tokenizer
from ..runconfig import ConfigError, RunConfig
from .base import Task, evaluating, karpathy_splits, register_task
from .blip_itm import (
    blip_retrieval_loss,
    contrastive_loss,
    encoder_ids,
    image_embeddings,
    is_blip_retrieval,
    rerank_scores,
    text_features,
)


@dataclass
class RetrievalOptions:
    """The `retrieval:` section."""

    k_test: int = 128  # BLIP: ITC top-k candidates re-ranked by ITM (paper: 256 COCO, 128 Flickr)

    def validate(self) -> None:
        if self.k_test < 1:
            raise ConfigError("retrieval.k_test must be >= 1")


def features(output: Any) -> torch.Tensor:
    """transformers 5 returns a model output whose pooler_output holds the projected features."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@register_task
class RetrievalTask(Task):
    name = "retrieval"
    metric = "r_mean"
    formats = ("openmoji", "karpathy")
    Options = RetrievalOptions
    options: RetrievalOptions

    @classmethod
    def load_hub_model(cls, config: Any, source: str, num_labels: int | None, **kwargs: Any) -> tuple[nn.Module, Any]:
        if getattr(config, "model_type", "") == "blip":  # BLIP retrieval: ITC + ITM heads
            return tf.BlipForImageTextRetrieval.from_pretrained(source, **kwargs), hub_tokenizer(source, **kwargs)
        return tf.AutoModel.from_pretrained(source, **kwargs), hub_tokenizer(source, **kwargs)

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        data = cfg.data
        # every annotation file is parsed and checked before the model is built
        self._train, self._eval = karpathy_splits(data)
        self.build_model()
        if self.built.tokenizer is None:
            raise DataError("the retrieval model has no tokenizer")
        self.blip = is_blip_retrieval(self.built.model)
        self.enc_token_id: int | None = getattr(self.built.tokenizer, "enc_token_id", None)
        if self.blip and self.enc_token_id is None:
            raise ConfigError("a BLIP retrieval model needs BLIP's tokenizer, with its [ENC] token (ITM input)")
        self._train.transform = self.train_transform()
        for ds in self._eval.values():
            ds.transform = self.eval_transform()
        self._train = self.limited(self._train, data.limit_train)

    def check_model(self, model: nn.Module) -> None:
        dual = all(hasattr(model, m) for m in ("get_image_features", "get_text_features"))
        if not (dual or is_blip_retrieval(model)):
            raise ConfigError(f"task retrieval needs a dual encoder or BlipForImageTextRetrieval, "
                              f"got {type(model).__name__}")

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
        # logits_per_image: logit_scale * normalised image @ text^T
        return contrastive_loss(out.logits_per_image, batch["image_ids"])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, device: torch.device) -> dict[str, float]:
        if is_blip_retrieval(model):
            return self._evaluate_blip(model, split, device)
        ds = self._eval[split]
        subset = self.limited(ds, self.cfg.data.limit_eval)
        n_images = len(subset)
        bs = self.cfg.train.eval_batch_size
        image_feats = []
        text_ids = [t for i in range(n_images) for t in ds.img2txt[i]]
        texts = [ds.texts[t] for t in text_ids]
        text_feats = []
        with evaluating(model):
            for images, _ in DataLoader(subset, batch_size=bs, num_workers=self.cfg.data.num_workers):
                image_feats.append(F.normalize(features(model.get_image_features(pixel_values=images.to(device))),
                                               dim=-1))
            for start in range(0, len(texts), bs):
                tokens = {k: v.to(device) for k, v in self._tokens(texts[start:start + bs]).items()}
                text_feats.append(F.normalize(features(model.get_text_features(**tokens)), dim=-1))
        sim = torch.cat(image_feats).float() @ torch.cat(text_feats).float().t()
        position = {t: j for j, t in enumerate(text_ids)}
        img2txt = [[position[t] for t in ds.img2txt[i]] for i in range(n_images)]
        txt2img = [ds.txt2img[t] for t in text_ids]
        return recall_at_k(sim.cpu(), img2txt, txt2img)

    @torch.no_grad()
    def _evaluate_blip(self, model: nn.Module, split: str, device: torch.device) -> dict[str, float]:
        """BLIP's evaluation: ITC similarities, top retrieval.k_test candidates re-scored with ITM."""
        ds = self._eval[split]
        subset = self.limited(ds, self.cfg.data.limit_eval)
        n_images = len(subset)
        bs = self.cfg.train.eval_batch_size
        image_embeds, image_feats = [], []
        text_ids = [t for i in range(n_images) for t in ds.img2txt[i]]
        tokens = {k: v.to(device) for k, v in self._tokens([ds.texts[t] for t in text_ids]).items()}
        with evaluating(model):
            for images, _ in DataLoader(subset, batch_size=bs, num_workers=self.cfg.data.num_workers):
                embeds, feats = image_embeddings(model, images.to(device))
                image_embeds.append(embeds)
                image_feats.append(feats)
            text_feats = [text_features(model, tokens["input_ids"][s:s + bs], tokens["attention_mask"][s:s + bs])
                          for s in range(0, len(text_ids), bs)]
            sim = torch.cat(image_feats).float() @ torch.cat(text_feats).float().t()
            i2t, t2i = rerank_scores(model, torch.cat(image_embeds), sim,
                                     encoder_ids(tokens["input_ids"], self.enc_token_id), tokens["attention_mask"],
                                     self.options.k_test, bs)
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
