"""Retrieval recall@K (image->text and text->image), as the BLIP / UPop evaluation computes it."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def best_ranks(scores: torch.Tensor, gt: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Best (lowest) 0-based position of any ground-truth column in each row's descending sort.

    `gt` is (rows, max_gt) with -1 padding. Rows are processed in chunks to bound memory
    (a full position matrix for COCO 5k x 25k would be 1 GB). Ties: the lower column index ranks first.
    """
    n_rows, n_cols = scores.shape
    out = torch.empty(n_rows, dtype=torch.long)
    cols = torch.arange(n_cols).expand(min(chunk, n_rows), n_cols)
    for start in range(0, n_rows, chunk):
        block = scores[start:start + chunk]
        order = torch.argsort(block, dim=1, descending=True, stable=True)
        position = torch.empty_like(order).scatter_(1, order, cols[: block.shape[0]])
        g = gt[start:start + chunk]
        pos = position.gather(1, g.clamp(min=0)).masked_fill(g < 0, n_cols)
        out[start:start + chunk] = pos.min(dim=1).values
    return out


def recall_percent(ranks: torch.Tensor, k: int) -> float:
    """Percent of the rows whose best 0-based rank (`best_ranks`) is below k."""
    return 100.0 * (ranks < k).float().mean().item()


def recall_at_k(sim_i2t: torch.Tensor, img2txt: Sequence[Sequence[int]], txt2img: Sequence[int]) -> dict[str, float]:
    """Retrieval recall@1/5/10 in percent, as in the BLIP/UPop evaluation.

    Image->text rank of an image: best position among its ground-truth captions in its row of
    `sim_i2t` (n_images x n_texts) sorted descending; text->image rank: position of its image in
    the text's row of `sim_i2t.T`. Returns txt_r1/5/10 (image->text), img_r1/5/10 (text->image),
    their means txt_r_mean / img_r_mean, and r_mean (mean of both).
    """
    sim = torch.as_tensor(sim_i2t).detach().float().cpu()
    if sim.dim() != 2:
        raise ValueError(f"sim_i2t must be 2-D (n_images, n_texts), got shape {tuple(sim.shape)}")
    n_img, n_txt = sim.shape
    if len(img2txt) != n_img or len(txt2img) != n_txt:
        raise ValueError(f"sim_i2t has shape {(n_img, n_txt)} but img2txt has {len(img2txt)} images "
                         f"and txt2img {len(txt2img)} texts")
    if n_img == 0 or n_txt == 0:
        raise ValueError("recall_at_k needs at least one image and one text")
    if torch.isnan(sim).any():
        raise ValueError("sim_i2t contains NaN")
    width = max(len(t) for t in img2txt)
    if min(len(t) for t in img2txt) == 0:
        raise ValueError("every image needs at least one ground-truth text in img2txt")
    gt_i2t = torch.full((n_img, width), -1, dtype=torch.long)
    for i, texts in enumerate(img2txt):
        ids = torch.as_tensor(list(texts), dtype=torch.long)
        if ids.min() < 0 or ids.max() >= n_txt:
            raise ValueError(f"img2txt[{i}] holds a text index outside 0..{n_txt - 1}")
        gt_i2t[i, : len(ids)] = ids
    gt_t2i = torch.as_tensor(list(txt2img), dtype=torch.long).view(-1, 1)
    if gt_t2i.min() < 0 or gt_t2i.max() >= n_img:
        raise ValueError(f"txt2img holds an image index outside 0..{n_img - 1}")
    rank_i2t = best_ranks(sim, gt_i2t)
    rank_t2i = best_ranks(sim.t().contiguous(), gt_t2i)

    out: dict[str, float] = {}
    for prefix, ranks in (("txt", rank_i2t), ("img", rank_t2i)):
        recalls = [recall_percent(ranks, k) for k in (1, 5, 10)]
        out.update({f"{prefix}_r1": recalls[0], f"{prefix}_r5": recalls[1], f"{prefix}_r10": recalls[2],
                    f"{prefix}_r_mean": sum(recalls) / 3})
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return out
