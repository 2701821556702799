"""Text-to-text retrieval with a bi-encoder: any transformers text encoder (AutoModel, e.g. BertModel)
encodes queries and documents alike; a sentence embedding is the mean of the last hidden states over
the attention mask (sentence-transformers' recipe for all-MiniLM-L6-v2; `pooling: cls` takes the
first token), L2-normalised.

Loss: in-batch contrastive (sentence-transformers' MultipleNegativesRankingLoss): cross-entropy of
`scale` x cosine similarities query -> document, plus document -> query when `symmetric` (the mean of
both). Queries of the same document in one batch are all positives (targets row-normalised over
equal document ids). The loss runs the encoder ONCE per step, on the queries and documents
concatenated into one batch (queries first, padded to the longest): knowledge distillation hooks
that single forward call and re-runs a teacher on the same inputs, reading `distill_views`.

Evaluation: every query, every distinct document and every distractor (a candidate document with
no query) of the split encoded; recall@1/5/10 query -> document (`q2d_*`, ranked among the documents
AND the distractors) and document -> query (`d2q_*`, the best-ranked of the document's queries; only
documents with queries are ranked, a distractor has none), `r_mean` their mean. Formats: `text_pairs`
(JSON Lines per split), `emoji_text` (offline, from `emoji`; val/test hold ~all emoji names).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers as tf
from torch import nn
from torch.utils.data import Dataset

from ..data.emoji_text import build_emoji_text
from ..data.text_pairs import SPLITS, TextPairs, text_pair_splits
from ..metrics import recall_at_k
from ..metrics.retrieval import best_ranks, recall_percent
from ..models import hub_tokenizer
from ..runconfig import ConfigError, RunConfig
from .base import Task, evaluating, register_task

POOLINGS = ("mean", "cls")


@dataclass
class TextRetrievalOptions:
    """The `text_retrieval:` section."""

    pooling: str = "mean"  # mean over the attention mask (sentence-transformers), or cls: the first token
    scale: float = 20.0  # fixed similarity scale (MultipleNegativesRankingLoss' default)
    symmetric: bool = True  # also document -> query (MultipleNegativesSymmetricRankingLoss)

    def validate(self) -> None:
        if self.pooling not in POOLINGS:
            raise ConfigError(f"text_retrieval.pooling must be {' or '.join(POOLINGS)}, got {self.pooling!r}")
        if not (isinstance(self.scale, int | float) and 0 < self.scale < float("inf")):
            raise ConfigError(f"text_retrieval.scale must be a finite number > 0, got {self.scale!r}")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str = "mean") -> torch.Tensor:
    """Sentence embeddings (N, D), L2-normalised, from last hidden states (N, L, D)."""
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return F.normalize(pooled.float(), dim=-1)


def pair_loss(logits: torch.Tensor, doc_ids: torch.Tensor, symmetric: bool = True) -> torch.Tensor:
    """In-batch contrastive loss of `logits` (B queries, B documents, already scaled); queries of the
    same document are all positives (targets row-normalised over equal ids)."""
    positives = (doc_ids[:, None] == doc_ids[None, :]).to(logits.dtype)
    targets = positives / positives.sum(1, keepdim=True)
    q2d = -(F.log_softmax(logits, dim=1) * targets).sum(1).mean()
    if not symmetric:
        return q2d
    d2q = -(F.log_softmax(logits.t(), dim=1) * targets).sum(1).mean()  # targets are symmetric
    return (q2d + d2q) / 2


@register_task
class TextRetrievalTask(Task):
    name = "text_retrieval"
    metric = "r_mean"
    formats = ("emoji_text", "text_pairs")
    Options = TextRetrievalOptions
    options: TextRetrievalOptions

    @classmethod
    def load_hub_model(cls, config: Any, source: str, num_labels: int | None, **kwargs: Any) -> tuple[nn.Module, Any]:
        return tf.AutoModel.from_pretrained(source, **kwargs), hub_tokenizer(source, **kwargs)

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        data = cfg.data
        if data.format == "emoji_text":
            root = build_emoji_text(data.root)  # a fixed split: the run's seed does not change the data
            files: dict[str, str | Path] = {s: root / f"{s}.jsonl" for s in SPLITS}
        else:
            files = {s: getattr(data, s) for s in SPLITS}
        self.splits: dict[str, TextPairs] = text_pair_splits(files)  # every file checked before the model
        self.build_model()
        if self.built.tokenizer is None:
            raise ConfigError("the text retrieval model has no tokenizer")
        self._train = self.limited(self.splits["train"], data.limit_train)

    def check_model(self, model: nn.Module) -> None:
        name = type(model).__name__
        if not isinstance(model, tf.PreTrainedModel) or "For" in name or hasattr(model, "get_image_features") \
                or getattr(model, "main_input_name", "") != "input_ids":
            raise ConfigError(f"task text_retrieval needs a text encoder (a transformers AutoModel such as "
                              f"BertModel), got {name}")

    # ---- data ---------------------------------------------------------------------------------------
    def train_dataset(self) -> Dataset:
        return self._train

    def tokens(self, texts: list[str], padding: str = "longest") -> dict[str, torch.Tensor]:
        out = self.built.tokenizer(texts, padding=padding, truncation=True, max_length=self.cfg.data.max_tokens,
                                   return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    def collate(self, items: list) -> dict[str, torch.Tensor]:
        """Queries then documents in one token batch (2B rows), and the B document ids."""
        queries, documents, doc_ids = zip(*items, strict=True)
        return {**self.tokens([*queries, *documents]), "doc_ids": torch.as_tensor(doc_ids)}

    # ---- training -------------------------------------------------------------------------------------
    def distill_views(self, output: Any, inputs: dict[str, Any]) -> dict[str, torch.Tensor]:
        """What a distillation loss compares, from the training forward's output and its kwargs:
        "logits": the (B, B) query -> document logits (scale x cosine), "embeds": the pooled,
        normalised embeddings of all 2B sequences (queries first)."""
        embeds = pool(output.last_hidden_state, inputs["attention_mask"], self.options.pooling)
        b = embeds.shape[0] // 2
        return {"logits": self.options.scale * embeds[:b] @ embeds[b:].t(), "embeds": embeds}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        output = model(**inputs)  # the single forward of the step (see the module docstring)
        return pair_loss(self.distill_views(output, inputs)["logits"], batch["doc_ids"], self.options.symmetric)

    # ---- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, model: nn.Module, texts: list[str], device: torch.device) -> torch.Tensor:
        """Normalised embeddings (N, D) of `texts`, in batches of train.eval_batch_size (model in eval mode)."""
        bs = self.cfg.train.eval_batch_size
        out = []
        for start in range(0, len(texts), bs):
            inputs = {k: v.to(device) for k, v in self.tokens(texts[start:start + bs]).items()}
            out.append(pool(model(**inputs).last_hidden_state, inputs["attention_mask"], self.options.pooling))
        return torch.cat(out)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, device: torch.device) -> dict[str, float]:
        ds = self.splits[split].first_documents(self.cfg.data.limit_eval)
        with evaluating(model):
            queries = self.encode(model, ds.queries, device)
            candidates = self.encode(model, ds.candidates, device)  # documents, then distractors
        return retrieval_recalls(candidates @ queries.t(), ds)

    def example_inputs(self, batch_size: int) -> dict[str, Any]:
        """One encoding of `batch_size` sequences of data.max_tokens tokens (all attended)."""
        return self.tokens([" ".join(["a"] * self.cfg.data.max_tokens)] * batch_size, padding="max_length")


def retrieval_recalls(sim_d2q: torch.Tensor, ds: TextPairs) -> dict[str, float]:
    """recall@1/5/10 (percent) of a (candidates, queries) similarity matrix, candidates = ds.documents
    then ds.distractors: q2d_* (query -> its document, among all candidates), d2q_* (document -> the
    best of its queries, for the documents only), their means and r_mean the mean of both."""
    sim = sim_d2q.detach().float().cpu()
    n_docs = len(ds.documents)
    if sim.shape != (n_docs + len(ds.distractors), len(ds.queries)):
        raise ValueError(f"similarity of shape {tuple(sim.shape)} for {n_docs} documents + "
                         f"{len(ds.distractors)} distractors and {len(ds.queries)} queries")
    # recall_at_k's rows are "images": here documents; txt_* ranks columns for each row (d2q)
    d2q = recall_at_k(sim[:n_docs], ds.queries_of_doc, ds.doc_of_query)
    # query -> document over every candidate (ties: the lower row, i.e. a document before a distractor)
    ranks = best_ranks(sim.t().contiguous(), torch.as_tensor(ds.doc_of_query, dtype=torch.long).view(-1, 1))
    q2d = {k: recall_percent(ranks, k) for k in (1, 5, 10)}
    out = {"q2d_r1": q2d[1], "q2d_r5": q2d[5], "q2d_r10": q2d[10], "q2d_r_mean": sum(q2d.values()) / 3,
           **{"d2q_" + k[4:]: v for k, v in d2q.items() if k.startswith("txt_")}}
    out["r_mean"] = (out["q2d_r_mean"] + out["d2q_r_mean"]) / 2
    return out
