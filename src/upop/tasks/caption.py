"""Image captioning with BLIP's image-grounded text decoder (BlipForConditionalGeneration).

Settings: the `caption:` section (`CaptionOptions`: prompt, num_beams, max_new_tokens,
min_new_tokens). Training (the paper's recipe): the text is `prompt + caption` ("a picture of " + caption), its
first token [CLS] replaced by [DEC] (BLIP's decoder bos), and the LM loss with label smoothing is
taken on the caption tokens only: the bos, the prompt tokens and the padding carry label -100.
Generation feeds the same `[DEC] prompt` prefix (HF's generate() also swaps [CLS] for [DEC] and
drops the trailing [SEP]), so training and inference see identical prefixes; beam search stops at
[SEP], and the prompt is stripped from the decoded text.

Caption length: the paper (BLIP's generate, max_length 20 / min_length 5) passes lengths that count
the decoder's whole input, `[DEC] a picture of` = 4 tokens with BLIP's BERT tokenizer, so [SEP] may
end a caption from its 2nd token on (1 word at least) and a caption has 16 new tokens at most
([SEP] included). Here the limits count new tokens only (prompt-independent): the defaults 1 / 16 are
exactly the paper's lengths for its prompt.

Evaluation: COCO caption metrics (pycocoevalcap) in percent; CIDEr selects checkpoints. The
generated captions of each evaluated split are written in COCO result format
([{"image_id", "caption"}]) to `<output_dir>/captions_<split>.json` (the latest evaluation) and
`<output_dir>/captions/<split>-<params>.json` (one file per model size: dense, compressed).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data import DataError, KarpathyEval
from ..files import write_text
from ..metrics import caption_scores
from ..models import hub_tokenizer, require_model_type
from ..models.blip import BLIP_CLASSES
from ..runconfig import ConfigError, RunConfig
from ._recipe import Recipe
from .base import Task, evaluating, karpathy_splits, register_task

# COCO_val2014_000000391895.jpg -> 391895 (COCO's ids); Flickr30K 1000092795.jpg -> 1000092795
_NUMERIC_ID = re.compile(r"(?:^|_)(\d+)$")


def image_id(path: Path) -> int | str:
    """The image id of a Karpathy image file: its trailing number (COCO, Flickr30K), else its stem."""
    match = _NUMERIC_ID.search(path.stem)
    return int(match.group(1)) if match else path.stem


@dataclass
class CaptionOptions:
    """The `caption:` section."""

    prompt: str = "a picture of "  # the decoder prompt, excluded from the loss (BLIP)
    num_beams: int = 3  # beam search (paper: 3 beams)
    max_new_tokens: int = 16  # caption tokens at most, [SEP] included (paper: max_length 20 - 4 prefix tokens)
    min_new_tokens: int = 1  # caption tokens before [SEP] may end it (paper: min_length 5 - 4 prefix tokens)

    def validate(self) -> None:
        for key in ("num_beams", "max_new_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"caption.{key} must be >= 1")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ConfigError("caption.min_new_tokens must be in [0, caption.max_new_tokens]")


@register_task
class CaptionTask(Recipe, Task):
    name = "caption"
    metric = "CIDEr"
    formats = ("openmoji", "karpathy")
    Options = CaptionOptions
    options: CaptionOptions

    @classmethod
    def load_hub_model(cls, config: Any, source: str, num_labels: int | None, **kwargs: Any) -> tuple[nn.Module, Any]:
        require_model_type(cls.name, config, source, "blip", "BLIP")
        return BLIP_CLASSES["caption"].from_pretrained(source, **kwargs), hub_tokenizer(source, **kwargs)

    def check_model(self, model: nn.Module) -> None:
        if not hasattr(model, "generate") or not hasattr(model, "text_decoder"):
            raise ConfigError(f"task caption needs a BLIP captioner (text decoder), got {type(model).__name__}")

    def __init__(self, cfg: RunConfig) -> None:
        super().__init__(cfg)
        data = cfg.data
        # every annotation file is parsed and checked before the model is built
        self._train, self._eval = karpathy_splits(data)
        self.build_model()
        tok = self.built.tokenizer
        if tok is None or tok.sep_token_id is None:
            raise DataError("the caption model has no BERT-style tokenizer with a [SEP] token")
        # HF's generate() writes the decoder config's bos ([DEC]) over the first token: train with the same id
        self.bos_token_id = self.built.model.config.text_config.bos_token_id
        if self.bos_token_id is None:
            raise DataError("the caption model's text_config has no bos_token_id (BLIP's [DEC])")
        self.prompt = self.options.prompt
        # [CLS] + prompt tokens, without the [SEP] the tokenizer appends: BLIP's prompt_length
        self.prompt_ids = tok(self.prompt, return_tensors="pt")["input_ids"][:, :-1]
        self.prompt_length = self.prompt_ids.shape[1]
        if self.prompt_length + 2 > data.max_tokens:
            raise DataError(f"caption.prompt {self.prompt!r} takes {self.prompt_length} tokens: data.max_tokens "
                            f"{data.max_tokens} leaves no room for a caption")
        self._train.transform = self.train_transform()
        for ds in self._eval.values():
            ds.transform = self.eval_transform()
        self._train = self.limited(self._train, data.limit_train)

    def train_dataset(self) -> Dataset:
        return self._train

    def tokens(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Decoder inputs and labels of `prompt + caption`: [DEC] prompt caption [SEP] [PAD]..."""
        out = self.built.tokenizer([self.prompt + c for c in captions], padding="longest", truncation=True,
                                   max_length=self.cfg.data.max_tokens, return_tensors="pt")
        input_ids, attention_mask = out["input_ids"], out["attention_mask"]
        input_ids[:, 0] = self.bos_token_id
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :self.prompt_length] = -100  # no loss on [DEC] and the prompt
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def collate(self, items: list) -> dict[str, torch.Tensor]:
        images, captions, _ = zip(*items, strict=True)
        return {"pixel_values": torch.stack(images), **self.tokens(list(captions))}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # Position t predicts token t+1. Only the positions whose next token is a caption token get
        # logits (a boolean logits_to_keep flattens them): the 30k-word projection of the prompt
        # and padding positions would cost as much as the whole decoder. HF's own loss is not used:
        # it has no label-smoothing argument.
        labels = batch["labels"]
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != -100
        logits = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                       attention_mask=batch["attention_mask"], logits_to_keep=keep).logits  # (kept, vocab)
        return F.cross_entropy(logits.float(), labels[:, 1:][keep[:, :-1]],
                               label_smoothing=self.cfg.train.label_smoothing)

    @torch.no_grad()
    def generate_ids(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """Beam search: the token ids `[DEC] prompt caption [SEP] [PAD]...` of a batch of images."""
        e = self.options
        # [CLS] prompt [SEP]: BLIP's generate() swaps [CLS] for [DEC] and drops the last token
        sep = torch.full((1, 1), self.built.tokenizer.sep_token_id)
        input_ids = torch.cat([self.prompt_ids, sep], 1).repeat(pixel_values.shape[0], 1)
        # min/max_new_tokens skip the prompt: [SEP] is barred until min_new_tokens tokens are written
        return model.generate(pixel_values=pixel_values, input_ids=input_ids.to(pixel_values.device),
                              num_beams=e.num_beams, max_new_tokens=e.max_new_tokens,
                              min_new_tokens=e.min_new_tokens, do_sample=False)

    def generate(self, model: nn.Module, pixel_values: torch.Tensor) -> list[str]:
        """Beam-search captions of a batch of images, prompt stripped."""
        out = self.generate_ids(model, pixel_values)
        texts = self.built.tokenizer.batch_decode(out[:, self.prompt_length:], skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str, device: torch.device) -> dict[str, float]:
        ds = self._eval[split]
        subset = self.limited(ds, self.cfg.data.limit_eval)
        n_images = len(subset)
        predictions: dict[int, str] = {}
        with evaluating(model):
            for images, index in DataLoader(subset, batch_size=self.cfg.train.eval_batch_size,
                                            num_workers=self.cfg.data.num_workers):
                predictions.update(zip(index.tolist(), self.generate(model, images.to(device)), strict=True))
        references = {i: [ds.texts[t] for t in ds.img2txt[i]] for i in range(n_images)}
        self._write_results(ds, predictions, split, sum(p.numel() for p in model.parameters()))
        return caption_scores(references, predictions)

    def _write_results(self, ds: KarpathyEval, predictions: dict[int, str], split: str, params: int) -> None:
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        out = Path(self.cfg.output_dir).expanduser()
        results = [{"image_id": image_id(ds.images[i]), "caption": c} for i, c in sorted(predictions.items())]
        text = json.dumps(results, indent=1)
        for path in (out / f"captions_{split}.json", out / "captions" / f"{split}-{params}.json"):
            write_text(path, text)

    def example_inputs(self, batch_size: int) -> dict[str, Any]:
        """One image and a full-length caption: a teacher-forced forward, as the paper counts FLOPs."""
        tok = self.built.tokenizer
        tokens = tok(["a"] * batch_size, padding="max_length", max_length=self.cfg.data.max_tokens,
                     truncation=True, return_tensors="pt")
        tokens["input_ids"][:, 0] = self.bos_token_id
        size = self.built.image_size
        return {"pixel_values": torch.randn(batch_size, 3, size, size), "input_ids": tokens["input_ids"],
                "attention_mask": tokens["attention_mask"]}
