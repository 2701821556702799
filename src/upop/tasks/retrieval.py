"""Image-text retrieval with a dual encoder (CLIPModel, VisionTextDualEncoderModel) or with BLIP
(BlipForImageTextRetrieval, its losses and re-ranking in blip_itm.py).

Dual encoders: contrastive loss (ITC) where captions of the same image are all positives (targets
are row-normalised); evaluation ranks by cosine similarity. BLIP: ITC + ITM with hard negatives;
evaluation re-ranks the ITC top `retrieval.k_test` candidates with the ITM head. Metric:
recall@1/5/10 in both directions and their mean `r_mean`, the paper's selection metric.

The paper's recipe is a set of options of the `retrieval:` section, off by default (the offline
demos' numbers were measured without them), on in examples/paper:
- `momentum_distill`: ITC against a momentum (EMA, `momentum`) copy and a queue of `queue_size`
  momentum features, targets mixed with the momentum similarities by `alpha` (ramped over the
  first epoch of each phase); see retrieval_momentum.py;
- `learn_temperature`: BLIP learns its ITC temperature (`temp`, saved with the model, clamped to
  [0.001, 0.5]); a dual encoder's `logit_scale` (always learned) is clamped to [0, ln 100];
- `negative_all_rank`: BLIP's ITM hard negatives are drawn from every process's batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import transformers as tf
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data import DataError
from ..data.hf_datasets import retrieval_splits
from ..distill import refusal
from ..metrics import recall_at_k
from ..models import BuiltModel, hub_tokenizer
from ..models.blip import BlipForRetrievalWithTemp, with_learned_temperature
from ..plan import PruningPlan
from ..runconfig import ConfigError, RunConfig
from ._recipe import Recipe
from .base import Task, evaluating, karpathy_splits, loss_in_forward, register_task, unwrap
from .blip_itm import (
    ItcLoss,
    blip_retrieval_loss,
    contrastive_loss,
    encoder_ids,
    image_embeddings,
    is_blip_retrieval,
    rerank_scores,
    text_features,
)
from .retrieval_momentum import Momentum, concat_all_gather, distillation_itc, ramped_alpha

LOGIT_SCALE_MAX = math.log(100)  # CLIP's cap on exp(logit_scale), 4.6052
MOMENTUM_AFTER_COMPRESS = ("copy", "slice")


@dataclass
class RetrievalOptions:
    """The `retrieval:` section (the paper's values in comments; see the module docstring)."""

    k_test: int = 128  # BLIP: ITC top-k candidates re-ranked by ITM (paper: 256 COCO, 128 Flickr)
    momentum_distill: bool = False  # paper: true
    momentum: float = 0.995  # EMA rate of the momentum copy
    queue_size: int = 57600  # momentum features kept (all processes together)
    alpha: float = 0.4  # weight of the momentum similarities in the ITC targets
    # after compression the momentum copy is sliced with the plan, then "copy": reset to the
    # compressed online weights (the paper's copy_params()), or "slice": keeps its sliced EMA
    momentum_after_compress: str = "copy"
    learn_temperature: bool = False  # paper: true
    negative_all_rank: bool = False  # paper: true

    def validate(self) -> None:
        if self.k_test < 1:
            raise ConfigError("retrieval.k_test must be >= 1")
        if not 0 <= self.momentum < 1:
            raise ConfigError(f"retrieval.momentum must be in [0, 1), got {self.momentum}")
        if self.queue_size < 0:
            raise ConfigError(f"retrieval.queue_size must be >= 0, got {self.queue_size}")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"retrieval.alpha must be in [0, 1], got {self.alpha}")
        if self.momentum_after_compress not in MOMENTUM_AFTER_COMPRESS:
            raise ConfigError(f"retrieval.momentum_after_compress must be copy or slice, "
                              f"got {self.momentum_after_compress!r}")


def features(output: Any) -> torch.Tensor:
    """transformers 5 returns a model output whose pooler_output holds the projected features."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@register_task
class RetrievalTask(Recipe, Task):
    name = "retrieval"
    metric = "r_mean"
    formats = ("openmoji", "karpathy", "hf_datasets")
    Options = RetrievalOptions
    options: RetrievalOptions

    @classmethod
    def load_hub_model(cls, config: Any, source: str, num_labels: int | None, **kwargs: Any) -> tuple[nn.Module, Any]:
        if getattr(config, "model_type", "") == "blip":  # BLIP retrieval: ITC + ITM heads
            learned = BlipForRetrievalWithTemp.__name__ in (getattr(config, "architectures", None) or [])
            blip = BlipForRetrievalWithTemp if learned else tf.BlipForImageTextRetrieval  # a saved temp is kept
            return blip.from_pretrained(source, **kwargs), hub_tokenizer(source, **kwargs)
        return tf.AutoModel.from_pretrained(source, **kwargs), hub_tokenizer(source, **kwargs)

    def build_model(self) -> BuiltModel:
        built = super().build_model()
        built.model = self._with_options(built.model)
        return built

    def build_fresh_model(self) -> nn.Module:
        return self._with_options(super().build_fresh_model())

    def _with_options(self, model: nn.Module) -> nn.Module:
        """learn_temperature: a plain BLIP retrieval model becomes a BlipForRetrievalWithTemp."""
        if self.options.learn_temperature and isinstance(model, tf.BlipForImageTextRetrieval):
            return with_learned_temperature(model)
        return model

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        data = cfg.data
        # every annotation file is parsed and checked before the model is built
        self._train, self._eval = retrieval_splits(data) if data.format == "hf_datasets" else karpathy_splits(data)
        self.build_model()
        if self.built.tokenizer is None:
            raise DataError("the retrieval model has no tokenizer")
        self.blip = is_blip_retrieval(self.built.model)
        self.enc_token_id: int | None = getattr(self.built.tokenizer, "enc_token_id", None)
        if self.blip and self.enc_token_id is None:
            raise ConfigError("a BLIP retrieval model needs BLIP's tokenizer, with its [ENC] token (ITM input)")
        self._train.transform = self.train_transform()  # the user's own (data.*_transform) or the recipe's
        eval_tf = self.eval_transform()
        for ds in self._eval.values():
            ds.transform = eval_tf
        self._train = self.limited(self._train, data.limit_train)
        o = self.options
        self.momentum = Momentum(o.momentum, o.queue_size) if o.momentum_distill else None
        self.alpha = o.alpha  # ramped by before_step over each phase's first epoch

    def check_distillation(self) -> None:
        # the dual encoder's ITC calls the model's forward once; BLIP's ITC + ITM calls its towers
        # and heads, and momentum distillation already has a teacher of its own
        if self.blip:
            raise refusal(self.name, "with a BLIP model: its ITC + ITM loss calls the model's sub-modules, "
                          "not its forward")
        if self.momentum is not None:
            raise refusal(self.name, "with retrieval.momentum_distill: true, which has a teacher of its own, "
                          "the momentum copy")

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
        o = self.options
        if self.blip:
            itc = self._blip_distillation if self.momentum is not None else None
            return blip_retrieval_loss(model, batch, self.enc_token_id, itc=itc,
                                       negative_all_rank=o.negative_all_rank)
        if self.momentum is not None:
            keys = ("pixel_values", "input_ids", "attention_mask", "image_ids")
            return loss_in_forward(model, self._dual_distillation_loss, {k: batch[k] for k in keys})
        self._clamp_logit_scale(unwrap(model))
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"])
        # logits_per_image: logit_scale * normalised image @ text^T
        return contrastive_loss(out.logits_per_image, batch["image_ids"])

    # ---- the paper's momentum distillation ---------------------------------------------------------
    def _distill(self, image_feat: torch.Tensor, text_feat: torch.Tensor, image_feat_m: torch.Tensor,
                 text_feat_m: torch.Tensor, image_ids: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
        """The distilled ITC against the batch's momentum features and the queue; then the
        momentum features of every process join the queue (BLIP's order: the loss sees the queue
        before this batch enters it). CLIP's code enqueues its online features; here both
        models enqueue momentum features, as BLIP does."""
        assert self.momentum is not None
        queue = self.momentum.queue.entries(image_feat.device, image_feat.shape[1])
        loss = distillation_itc(image_feat, text_feat, image_feat_m, text_feat_m, image_ids, *queue, scale,
                                self.alpha)
        self.momentum.queue.enqueue(concat_all_gather(image_feat_m), concat_all_gather(text_feat_m),
                                    concat_all_gather(image_ids))
        return loss

    def _blip_distillation(self, core: nn.Module, batch: dict[str, torch.Tensor]) -> ItcLoss:
        assert self.momentum is not None
        teacher = self.momentum.ensure(core)

        def itc(image_feat: torch.Tensor, text_feat: torch.Tensor, temp: torch.Tensor | float) -> torch.Tensor:
            with torch.no_grad():
                _, image_feat_m = image_embeddings(teacher, batch["pixel_values"])
                text_feat_m = text_features(teacher, batch["input_ids"], batch["attention_mask"])
            return self._distill(image_feat, text_feat, image_feat_m, text_feat_m, batch["image_ids"], 1 / temp)
        return itc

    def _dual_distillation_loss(self, core: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        assert self.momentum is not None
        self._clamp_logit_scale(core)
        teacher = self.momentum.ensure(core)

        def encode(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
            image = features(m.get_image_features(pixel_values=batch["pixel_values"]))
            text = features(m.get_text_features(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]))
            return F.normalize(image, dim=-1), F.normalize(text, dim=-1)

        image_feat, text_feat = encode(core)
        with torch.no_grad():
            image_feat_m, text_feat_m = encode(teacher)
        return self._distill(image_feat, text_feat, image_feat_m, text_feat_m, batch["image_ids"],
                             core.logit_scale.exp())

    @torch.no_grad()
    def _clamp_logit_scale(self, model: nn.Module) -> None:
        """learn_temperature: exp(logit_scale) at most 100, as CLIP (and the paper's code) clamps it."""
        scale = getattr(model, "logit_scale", None)
        if self.options.learn_temperature and isinstance(scale, torch.Tensor):
            scale.clamp_(0, LOGIT_SCALE_MAX)

    # ---- hooks of the training loop -----------------------------------------------------------------
    def before_step(self, phase: str, epoch: int, step: int, steps_per_epoch: int) -> None:
        self.alpha = ramped_alpha(self.options.alpha, epoch, step, steps_per_epoch)

    def after_optimizer_step(self, model: nn.Module) -> None:
        core = unwrap(model)
        if self.options.learn_temperature:
            if isinstance(core, BlipForRetrievalWithTemp):
                core.clamp_temperature()
            self._clamp_logit_scale(core)
        if self.momentum is not None:
            self.momentum.update(core)

    def after_compress(self, model: nn.Module, plan: PruningPlan) -> None:
        if self.momentum is not None:
            self.momentum.after_compress(unwrap(model), plan, reset=self.options.momentum_after_compress == "copy")

    def extra_state(self) -> dict[str, torch.Tensor]:
        return self.momentum.state_dict() if self.momentum is not None else {}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.momentum is not None:
            self.momentum.load_state_dict(state)

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
