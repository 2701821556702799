"""BLIP's image-text matching pieces for the retrieval task (transformers.BlipForImageTextRetrieval):
the ITC + ITM training loss and the ITM re-ranking of evaluation, paper section 5. Not a task: the
retrieval task (retrieval.py) uses it for BLIP models; `contrastive_loss` serves both model kinds.

Training loss = ITC + ITM:
- ITC: L2-normalised projections of the image and text [CLS] states, similarities divided by the
  temperature: the model's own learnable `temp` (BlipForRetrievalWithTemp, clamped to
  [0.001, 0.5] before use, as BLIP does) or, for a plain BlipForImageTextRetrieval, which has no
  parameter to hold it, the fixed `ITC_TEMPERATURE` 0.07 (BLIP's initial value). Targets: every
  caption of the same image is a positive (rows normalised). With `itc=` the caller supplies the
  ITC term instead (the paper's momentum distillation, retrieval_momentum.py).
- ITM: the caption with [CLS] replaced by [ENC] cross-attends to the image; for each image one
  hard negative caption and for each caption one hard negative image are drawn with probability
  softmax(sim / temperature), pairs of the same image masked out, from this process's batch or,
  with `negative_all_rank`, from the batches of every process (image states gathered with their
  gradient, as the paper's all_gather_with_grad); 2-way cross-entropy over the B positives and
  2B negatives.

Evaluation: the ITC similarity matrix, then for each image (resp. caption) its top `k_test`
candidates re-scored with ITM logit[1] + ITC similarity; every other entry is -100
(`retrieval.k_test`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .base import loss_in_forward, unwrap
from .retrieval_momentum import all_gather_with_grad, concat_all_gather, gather_tokens, rank_and_world

ITC_TEMPERATURE = 0.07  # for models without a learnable temperature: see the module docstring
OTHER_SCORE = -100.0  # entries outside the top-k_test candidates (BLIP's value)


def is_blip_retrieval(model: nn.Module) -> bool:
    """True for BlipForImageTextRetrieval, bare or wrapped in DistributedDataParallel."""
    from transformers import BlipForImageTextRetrieval

    return isinstance(unwrap(model), BlipForImageTextRetrieval)


def encoder_ids(input_ids: torch.Tensor, enc_token_id: int) -> torch.Tensor:
    """(B, L) token ids with the first token ([CLS]) replaced by [ENC], the ITM encoder's first token."""
    ids = input_ids.clone()
    ids[:, 0] = enc_token_id
    return ids


def _image_mask(image_embeds: torch.Tensor) -> torch.Tensor:
    return torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)


def image_embeddings(model: nn.Module, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, Dv) vision states and (B, P) normalised projected [CLS] features."""
    embeds = model.vision_model(pixel_values=pixel_values).last_hidden_state
    return embeds, F.normalize(model.vision_proj(embeds[:, 0, :]), dim=-1)


def text_features(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, P) normalised projected [CLS] features of the unimodal text encoder (no cross-attention)."""
    states = model.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return F.normalize(model.text_proj(states[:, 0, :]), dim=-1)


def itm_logits(model: nn.Module, enc_input_ids: torch.Tensor, attention_mask: torch.Tensor,
               image_embeds: torch.Tensor) -> torch.Tensor:
    """(B, 2) match / no-match logits of B (caption, image) pairs; captions start with [ENC]."""
    states = model.text_encoder(input_ids=enc_input_ids, attention_mask=attention_mask,
                                encoder_hidden_states=image_embeds,
                                encoder_attention_mask=_image_mask(image_embeds)).last_hidden_state
    return model.itm_head(states[:, 0, :])


def contrastive_loss(sim: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
    """ITC: mean of the image->text and text->image soft cross-entropies; `sim` (B images, B
    captions) already scaled by the temperature; captions of the same image are all positives
    (targets are row-normalised)."""
    positives = (image_ids[:, None] == image_ids[None, :]).to(sim.dtype)
    targets = positives / positives.sum(1, keepdim=True)
    i2t = -(F.log_softmax(sim, dim=1) * targets).sum(1).mean()
    t2i = -(F.log_softmax(sim.t(), dim=1) * targets).sum(1).mean()
    return (i2t + t2i) / 2


def temperature(model: nn.Module) -> torch.Tensor | float:
    """The ITC temperature: the model's learnable `temp`, clamped to BLIP's range, or the fixed 0.07."""
    temp = getattr(model, "temp", None)
    if isinstance(temp, nn.Parameter):
        model.clamp_temperature()
        return temp
    return ITC_TEMPERATURE


# (image features, text features, temperature) -> the ITC loss, features L2-normalised (B, P)
ItcLoss = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | float"], torch.Tensor]


def sample_hard_negatives(sim: torch.Tensor, image_ids: torch.Tensor, generator: torch.Generator | None = None,
                          column_ids: torch.Tensor | None = None, offset: int = 0) -> torch.Tensor:
    """For each row of `sim` (B, N, already divided by the temperature) one column drawn with
    probability softmax(row), columns of the same image excluded. Columns are the rows' own
    examples (N = B, ids `image_ids`) or those of every process (ids `column_ids`, row i's own
    column at `offset + i`). A row whose only columns are of its own image (every example shows
    one image) draws uniformly among the other columns."""
    with torch.no_grad():
        columns = image_ids if column_ids is None else column_ids
        same = image_ids[:, None] == columns[None, :]
        weights = F.softmax(sim.float(), dim=1).masked_fill(same, 0.0)
        empty = weights.sum(1) <= 0
        if empty.any():  # no other image among the columns: any other example, or itself when N == 1
            fallback = torch.ones_like(weights[empty])
            if sim.shape[1] > 1:
                rows = torch.nonzero(empty).squeeze(1)
                fallback[torch.arange(len(rows)), rows + offset] = 0.0
            weights[empty] = fallback
        return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def itc_itm_losses(model: nn.Module, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor, image_ids: torch.Tensor, enc_token_id: int,
                   itc: ItcLoss | None = None, negative_all_rank: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(ITC loss, ITM loss) of a batch of B (image, caption) pairs; row b of every tensor is one pair.
    itc: the ITC term from the features (default: in-batch contrastive); negative_all_rank: ITM
    negatives drawn from every process's batch (a no-op in one process)."""
    temp = temperature(model)
    image_embeds, image_feat = image_embeddings(model, pixel_values)
    text_feat = text_features(model, input_ids, attention_mask)
    sim = image_feat @ text_feat.t() / temp  # (B images, B captions)
    loss_itc = contrastive_loss(sim, image_ids) if itc is None else itc(image_feat, text_feat, temp)

    enc = encoder_ids(input_ids, enc_token_id)
    rank, world = rank_and_world()
    if negative_all_rank and world > 1:
        with torch.no_grad():  # local rows against every process's columns
            ids_world = concat_all_gather(image_ids)
            sim_i2t = image_feat @ concat_all_gather(text_feat).t() / temp
            sim_t2i = text_feat @ concat_all_gather(image_feat).t() / temp
        offset = rank * len(image_ids)
        neg_text = sample_hard_negatives(sim_i2t, image_ids, column_ids=ids_world, offset=offset)
        neg_image = sample_hard_negatives(sim_t2i, image_ids, column_ids=ids_world, offset=offset)
        enc, attention_mask, enc_world, mask_world = gather_tokens(enc, attention_mask)
        images_world = all_gather_with_grad(image_embeds)
    else:
        neg_text = sample_hard_negatives(sim.detach(), image_ids)  # (B,): a wrong caption per image
        neg_image = sample_hard_negatives(sim.detach().t(), image_ids)  # (B,): a wrong image per caption
        enc_world, mask_world, images_world = enc, attention_mask, image_embeds
    # one pass over 3B pairs: B positives, B (caption, wrong image), B (wrong caption, image)
    all_ids = torch.cat([enc, enc, enc_world[neg_text]])
    all_mask = torch.cat([attention_mask, attention_mask, mask_world[neg_text]])
    all_images = torch.cat([image_embeds, images_world[neg_image], image_embeds])
    logits = itm_logits(model, all_ids, all_mask, all_images)
    batch = input_ids.shape[0]
    labels = torch.cat([torch.ones(batch, dtype=torch.long), torch.zeros(2 * batch, dtype=torch.long)])
    loss_itm = F.cross_entropy(logits.float(), labels.to(logits.device))
    return loss_itc, loss_itm


def blip_retrieval_loss(model: nn.Module, batch: dict[str, torch.Tensor], enc_token_id: int,
                        itc: Callable[[nn.Module, dict[str, torch.Tensor]], ItcLoss] | None = None,
                        negative_all_rank: bool = False) -> torch.Tensor:
    """ITC + ITM of a training batch (pixel_values, input_ids, attention_mask, image_ids); `itc`
    makes the ITC term of the unwrapped model and the batch (momentum distillation)."""
    def step(core: nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        loss_itc, loss_itm = itc_itm_losses(core, b["pixel_values"], b["input_ids"], b["attention_mask"],
                                            b["image_ids"], enc_token_id, itc=None if itc is None else itc(core, b),
                                            negative_all_rank=negative_all_rank)
        return loss_itc + loss_itm

    keys = ("pixel_values", "input_ids", "attention_mask", "image_ids")
    return loss_in_forward(model, step, {k: batch[k] for k in keys})


@torch.no_grad()
def rerank_scores(model: nn.Module, image_embeds: torch.Tensor, sim: torch.Tensor, enc_ids: torch.Tensor,
                  attention_mask: torch.Tensor, k_test: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """BLIP's evaluation scores (n_images, n_texts) in both directions.

    image_embeds (n_images, N, Dv) vision states; sim (n_images, n_texts) ITC cosine similarities;
    enc_ids / attention_mask (n_texts, L) captions starting with [ENC]. Image->text: for each image
    its top-k_test captions by `sim` get ITM logit[1] + sim, all others OTHER_SCORE; text->image
    likewise over images. Pairs are scored in batches of `batch_size`.
    """
    n_images, n_texts = sim.shape

    def score(pairs_image: torch.Tensor, pairs_text: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, len(pairs_image), batch_size):
            img, txt = pairs_image[start:start + batch_size], pairs_text[start:start + batch_size]
            mask = attention_mask[txt]
            length = int(mask.sum(1).max())  # trailing padding changes nothing: trim it
            logits = itm_logits(model, enc_ids[txt, :length], mask[:, :length], image_embeds[img])
            out.append(logits[:, 1].float())
        return torch.cat(out)

    device = sim.device
    i2t = torch.full((n_images, n_texts), OTHER_SCORE, device=device)
    k = min(k_test, n_texts)
    top_sim, top_txt = sim.topk(k, dim=1)  # (n_images, k)
    rows = torch.arange(n_images, device=device).repeat_interleave(k)
    itm = score(rows, top_txt.reshape(-1)).view(n_images, k)
    i2t.scatter_(1, top_txt, itm + top_sim.float())

    t2i = torch.full((n_texts, n_images), OTHER_SCORE, device=device)
    k = min(k_test, n_images)
    top_sim, top_img = sim.t().topk(k, dim=1)  # (n_texts, k)
    rows = torch.arange(n_texts, device=device).repeat_interleave(k)
    itm = score(top_img.reshape(-1), rows).view(n_texts, k)
    t2i.scatter_(1, top_img, itm + top_sim.float())
    return i2t, t2i
