"""Visual question answering with BLIP (transformers.BlipForQuestionAnswering), the paper's VQAv2 recipe.

The question encoder (first token [ENC]) cross-attends to the image patches; the answer decoder
([DEC] first) cross-attends to the question states. Training loss: per answer, the LM loss with
label smoothing summed over its tokens, weighted by the fraction of annotators who gave that
answer, summed and divided by the number of questions. HF's forward has no per-answer weights, so
the loss is computed here from the model's three submodules.

Settings: the `vqa:` section (`VQAOptions`: answer_list, k_answers, vg_root, select). data.train may
list several files read as one training set (VQAv2 train + val questions and BLIP's vg_qa.json,
as the paper; Visual Genome images under vqa.vg_root, answers weighted 0.2). `vqa.select: last`
keeps the last retraining epoch instead of the best on validation (the paper: its val questions
are training data; test-dev is scored by the server). Inference is the paper's
"rank" mode: the top `vqa.k_answers` of the answer list by the
probability of their first token, re-ranked by the log-likelihood of the whole answer. The metric
is the VQAv2 accuracy (percent), computed locally; each evaluated split also leaves the result file
the official server takes, `<output_dir>/vqa_result_<split>.json` ([{"question_id", "answer"}]).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data import DataError
from ..data.openmoji_vqa import IMAGE_PATTERN, annotations_file, build_openmoji_vqa, questions_file
from ..data.vqav2 import ANSWER_TYPES, VQAv2Dataset, image_pattern, read_answer_list, split_files
from ..files import write_text
from ..metrics import vqa_accuracy
from ..models import hub_tokenizer, require_model_type
from ..models.blip import BLIP_CLASSES
from ..runconfig import ConfigError, RunConfig
from ._recipe import Recipe
from .base import Task, evaluating, loss_in_forward, openmoji_source, register_task

_LOGIT_BUDGET = 1 << 24  # vocabulary logits materialised at once while re-ranking (64 MB in fp32)


@dataclass
class VQAOptions:
    """The `vqa:` section."""

    answer_list: str | None = None  # JSON list of candidate answers (default: the training answers)
    k_answers: int = 128  # answers ranked by first-token probability, re-ranked by likelihood
    vg_root: str | None = None  # Visual Genome image root, for "vg" entries of BLIP-style training files
    select: str = "best"  # retraining keeps the best epoch on validation, or the "last" (the paper)

    def validate(self) -> None:
        if self.k_answers < 1:
            raise ConfigError("vqa.k_answers must be >= 1")
        if self.select not in ("best", "last"):
            raise ConfigError(f"vqa.select must be best or last, got {self.select!r}")


@register_task
class VQATask(Recipe, Task):
    name = "vqa"
    metric = "accuracy"
    formats = ("openmoji", "vqav2")
    Options = VQAOptions
    options: VQAOptions
    supports_distillation = False  # the loss calls the encoder and the answer decoder, never the forward

    @classmethod
    def load_hub_model(cls, config: Any, source: str, num_labels: int | None, **kwargs: Any) -> tuple[nn.Module, Any]:
        require_model_type(cls.name, config, source, "blip", "BLIP")
        return BLIP_CLASSES["vqa"].from_pretrained(source, **kwargs), hub_tokenizer(source, **kwargs)

    def check_model(self, model: nn.Module) -> None:
        if not all(hasattr(model, m) for m in ("vision_model", "text_encoder", "text_decoder")):
            raise ConfigError(f"task vqa needs a BLIP VQA model (question encoder + answer decoder), "
                              f"got {type(model).__name__}")

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        data = cfg.data
        if data.format == "openmoji":
            source = openmoji_source(data)
            root = build_openmoji_vqa(source.with_name(source.name + "-vqa"), source,
                                      image_size=max(data.image_size, 64))
            files = {s: (questions_file(root, s), annotations_file(root, s)) for s in ("train", "val", "test")}
            pattern = str(root / IMAGE_PATTERN)
        else:
            files = {s: split_files(getattr(data, s)) for s in ("val", "test")}
            files["train"] = (data.train, None) if isinstance(data.train, list) else split_files(data.train)
            pattern = image_pattern(data.root)
        bad = data.on_bad_input
        # every file is parsed and checked before the model is built
        folder = data.format == "vqav2" and data.root and "{image_id" not in data.root
        vqa_root = Path(data.root).expanduser() if folder else None
        vg_root = Path(self.options.vg_root).expanduser() if self.options.vg_root else None
        self._train = VQAv2Dataset(files["train"][0], pattern, files["train"][1], on_bad_input=bad, train=True,
                                   vqa_root=vqa_root, vg_root=vg_root)
        self._eval = {s: VQAv2Dataset(files[s][0], pattern, files[s][1], on_bad_input=bad, train=False,
                                      require_answers=s == "val") for s in ("val", "test")}
        self.answer_list = (read_answer_list(self.options.answer_list) if self.options.answer_list
                            else self._train.training_answers())
        self.build_model()
        tok = self.built.tokenizer
        if tok is None or getattr(tok, "enc_token_id", None) is None or tok.bos_token_id is None:
            raise DataError("task vqa needs BLIP's tokenizer (with the [ENC] and [DEC] tokens)")
        self._train.transform = self.train_transform()
        for ds in self._eval.values():
            ds.transform = self.eval_transform()
        self._train_view: Dataset = self.limited(self._train, data.limit_train)
        answers = self._tokens(self.answer_list, tok.bos_token_id)
        self._answer_ids, self._answer_mask = answers["input_ids"], answers["attention_mask"]

    def train_dataset(self) -> Dataset:
        return self._train_view

    def select_on_validation(self) -> bool:
        return self.options.select == "best"

    # ---- batches --------------------------------------------------------------------------------
    def _tokens(self, texts: list[str], first: int) -> dict[str, torch.Tensor]:
        """Tokenised texts whose first token ([CLS]) is replaced: [ENC] for questions, [DEC] for answers."""
        out = self.built.tokenizer(texts, padding="longest", truncation=True, max_length=self.cfg.data.max_tokens,
                                   return_tensors="pt")
        ids = out["input_ids"].clone()
        ids[:, 0] = first
        return {"input_ids": ids, "attention_mask": out["attention_mask"]}

    def collate(self, items: list) -> dict[str, torch.Tensor]:
        """Questions (B) and their unique answers flattened (A >= B): answer k belongs to question
        answer_question[k] and carries answer_weights[k]."""
        images, questions, answers, weights = zip(*items, strict=True)
        tok = self.built.tokenizer
        q = self._tokens(list(questions), tok.enc_token_id)
        a = self._tokens([x for per in answers for x in per], tok.bos_token_id)
        owner = [i for i, per in enumerate(answers) for _ in per]
        return {"pixel_values": torch.stack(images), "input_ids": q["input_ids"],
                "attention_mask": q["attention_mask"], "answer_ids": a["input_ids"],
                "answer_mask": a["attention_mask"],
                "answer_weights": torch.tensor([w for per in weights for w in per], dtype=torch.float32),
                "answer_question": torch.tensor(owner, dtype=torch.long)}

    # ---- model pieces ---------------------------------------------------------------------------
    @staticmethod
    def _question_states(model: nn.Module, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                         attention_mask: torch.Tensor) -> torch.Tensor:
        image = model.vision_model(pixel_values=pixel_values).last_hidden_state  # (B, 1+patches, Dv)
        image_mask = torch.ones(image.shape[:-1], dtype=torch.long, device=image.device)
        return model.text_encoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image,
                                  encoder_attention_mask=image_mask).last_hidden_state  # (B, Lq, D)

    @staticmethod
    def _answer_logits(model: nn.Module, answer_ids: torch.Tensor, answer_mask: torch.Tensor,
                       states: torch.Tensor, states_mask: torch.Tensor) -> torch.Tensor:
        """Next-token logits (A, La-1, V) of answers given question states, each row its own question."""
        out = model.text_decoder(input_ids=answer_ids, attention_mask=answer_mask, encoder_hidden_states=states,
                                 encoder_attention_mask=states_mask)
        return out.logits[:, :-1]

    def _weighted_loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        states = self._question_states(model, batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
        owner = batch["answer_question"]
        logits = self._answer_logits(model, batch["answer_ids"], batch["answer_mask"], states[owner],
                                     batch["attention_mask"][owner])
        targets = batch["answer_ids"][:, 1:].masked_fill(batch["answer_mask"][:, 1:] == 0, -100)
        per_token = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                                    reduction="none", label_smoothing=self.cfg.train.label_smoothing)
        per_answer = per_token.view(targets.shape).sum(1)  # summed over tokens, as BLIP's VQA loss
        return (batch["answer_weights"] * per_answer).sum() / batch["pixel_values"].shape[0]

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return loss_in_forward(model, self._weighted_loss, batch)

    # ---- evaluation -----------------------------------------------------------------------------
    @torch.no_grad()
    def rank_answers(self, model: nn.Module, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                     attention_mask: torch.Tensor, k: int) -> torch.Tensor:
        """Index into `answer_list` of each question's answer (B,): the top k answers by first-token
        probability, re-ranked by the log-likelihood of the whole answer."""
        device = pixel_values.device
        states = self._question_states(model, pixel_values, input_ids, attention_mask)
        bsz = states.shape[0]
        answer_ids, answer_mask = self._answer_ids.to(device), self._answer_mask.to(device)
        start = answer_ids[:1, :1].expand(bsz, 1)  # [DEC]
        first = model.text_decoder(input_ids=start, attention_mask=torch.ones_like(start),
                                   encoder_hidden_states=states, encoder_attention_mask=attention_mask).logits[:, 0]
        first_prob = first.float().softmax(-1)[:, answer_ids[:, 1]]  # (B, N)
        k = min(k, len(self.answer_list))
        top = first_prob.topk(k, dim=1).indices  # (B, k)
        rows = top.flatten()  # question b's candidates are rows b*k .. b*k+k-1
        owner = torch.arange(bsz, device=device).repeat_interleave(k)
        ids, mask = answer_ids[rows], answer_mask[rows]
        # drop padding columns shared by all candidates, then score in chunks to bound the logits' memory
        width = int(mask.sum(1).max())
        ids, mask = ids[:, :width], mask[:, :width]
        chunk = max(1, _LOGIT_BUDGET // max(1, width * first.shape[-1]))
        scores = torch.empty(rows.numel(), device=device)
        for s in range(0, rows.numel(), chunk):
            sl = slice(s, s + chunk)
            logits = self._answer_logits(model, ids[sl], mask[sl], states[owner[sl]], attention_mask[owner[sl]])
            logp = logits.float().log_softmax(-1).gather(-1, ids[sl, 1:, None]).squeeze(-1)
            scores[sl] = (logp * mask[sl, 1:]).sum(1)
        best = scores.view(bsz, k).argmax(1)
        return top.gather(1, best[:, None]).squeeze(1)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, device: torch.device) -> dict[str, float]:
        ds = self._eval[split]
        subset = self.limited(ds, self.cfg.data.limit_eval)
        n = len(subset)
        predictions: list[str] = []
        tok = self.built.tokenizer
        loader = DataLoader(subset, batch_size=self.cfg.train.eval_batch_size,
                            num_workers=self.cfg.data.num_workers, collate_fn=_eval_collate)
        with evaluating(model):
            for images, index in loader:
                q = self._tokens([ds.items[i].question for i in index.tolist()], tok.enc_token_id)
                best = self.rank_answers(model, images.to(device), q["input_ids"].to(device),
                                         q["attention_mask"].to(device), self.options.k_answers)
                predictions += [self.answer_list[j] for j in best.tolist()]
        self._write_results(split, [(ds.items[i].question_id, a) for i, a in enumerate(predictions)])
        if not ds.has_answers:  # a test split without annotations: only the result file counts
            return {"accuracy": math.nan, "questions": float(n)}
        scores = [vqa_accuracy(p, ds.items[i].answers) for i, p in enumerate(predictions)]
        out = {"accuracy": 100.0 * sum(scores) / n, "questions": float(n)}
        for kind in ANSWER_TYPES:
            picked = [s for i, s in enumerate(scores) if ds.items[i].answer_type == kind]
            if picked:
                out[f"accuracy_{kind.replace('/', '_')}"] = 100.0 * sum(picked) / len(picked)
        return out

    def _write_results(self, split: str, results: list[tuple[int, str]]) -> None:
        """The file the official evaluation server takes, written atomically by the main process."""
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        path = Path(self.cfg.output_dir).expanduser() / f"vqa_result_{split}.json"
        write_text(path, json.dumps([{"question_id": q, "answer": a} for q, a in results]))

    def example_inputs(self, batch_size: int) -> dict[str, Any]:
        """One question of max_tokens tokens and a 3-token answer per image (HF's forward)."""
        tok = self.built.tokenizer
        q = tok(["a"] * batch_size, padding="max_length", max_length=self.cfg.data.max_tokens, return_tensors="pt")
        question = {"input_ids": q["input_ids"].clone(), "attention_mask": q["attention_mask"]}
        question["input_ids"][:, 0] = tok.enc_token_id
        answer = self._tokens(["yes"] * batch_size, tok.bos_token_id)["input_ids"]
        size = self.built.image_size
        return {**question, "decoder_input_ids": answer, "pixel_values": torch.randn(batch_size, 3, size, size)}


def _eval_collate(items: list) -> tuple[torch.Tensor, torch.Tensor]:
    images, index = zip(*items, strict=True)
    return torch.stack(images), torch.tensor(index)
