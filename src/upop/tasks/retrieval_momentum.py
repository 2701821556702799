"""The paper's momentum distillation for the retrieval ITC (BLIP and CLIP, spec section 5), and the
collectives its recipe needs. Not a task: the retrieval task (retrieval.py) owns one `Momentum`
when `retrieval.momentum_distill` is on.

- The momentum copy: an EMA (m = 0.995) of the whole retrieval model (both towers, their
  projections; BLIP's unused ITM head and cross-attention come along, as in BLIP's own
  `text_encoder_m`). It is held by the task, OUTSIDE the model's module tree: the search never
  finds or masks it, the optimizer never sees it, and the saved model does not contain it. It
  is made lazily from the online model at its first loss (UPop's mask hooks stripped off the
  copy: the teacher stays full during the search), updated after every optimiser step, and
  sliced with the search's plan after compression (then, as the paper's `copy_params()` does,
  reset to the compressed online weights unless `momentum_after_compress: slice`).
- The queue: the last `queue_size` momentum image / text features and their image ids,
  gathered from every process (the paper's 57,600). Only filled entries take part: the paper
  starts it with random unit vectors of id -100, which act as extra negatives until they are
  overwritten; here an empty queue is empty.
- The loss: online features against [momentum batch features; queue]; targets
  alpha * softmax(momentum similarities) + (1 - alpha) * same-image-id positives (rows
  normalised); mean of the image->text and text->image soft cross-entropies.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..augment import DropPathHook
from ..compress import apply_plan
from ..plan import PlanError, PruningPlan, StructurePlan

log = logging.getLogger("upop")

PREFIX = "momentum."  # keys of Momentum.state_dict(): momentum.model.<name>, momentum.queue.<part>


# ---- collectives ------------------------------------------------------------------------------------
def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """The rank-ordered concatenation of every process's `tensor` along dim 0 (no gradient)."""
    _, world = rank_and_world()
    if world == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradients of every process and returns this process's
    slice (the paper's `all_gather_with_grad`): what another rank's loss asks of our examples
    reaches our parameters."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        rank, world = rank_and_world()
        ctx.rank, ctx.size = rank, tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.size:(ctx.rank + 1) * ctx.size]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if rank_and_world()[1] == 1 else _AllGatherWithGrad.apply(tensor)


def gather_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(local ids, local mask, every process's ids, every process's mask), all padded on the right
    to the longest batch of any process (captions are padded to their own batch's longest)."""
    length = torch.tensor([input_ids.shape[1]], device=input_ids.device)
    if rank_and_world()[1] > 1:
        dist.all_reduce(length, op=dist.ReduceOp.MAX)
    pad = int(length) - input_ids.shape[1]
    if pad:  # padded positions are masked out: the [CLS] / [ENC] state does not change
        input_ids = F.pad(input_ids, (0, pad), value=0)
        attention_mask = F.pad(attention_mask, (0, pad), value=0)
    return input_ids, attention_mask, concat_all_gather(input_ids), concat_all_gather(attention_mask)


# ---- the loss ---------------------------------------------------------------------------------------
def distillation_itc(image_feat: torch.Tensor, text_feat: torch.Tensor, image_feat_m: torch.Tensor,
                     text_feat_m: torch.Tensor, image_ids: torch.Tensor, queue_image: torch.Tensor,
                     queue_text: torch.Tensor, queue_ids: torch.Tensor, scale: torch.Tensor | float,
                     alpha: float) -> torch.Tensor:
    """ITC with momentum distillation. Features (B, D) L2-normalised (online, momentum), queue
    (Q, D) and ids (Q,); scale: 1 / temperature (BLIP) or exp(logit_scale) (CLIP)."""
    image_all = torch.cat([image_feat_m, queue_image.to(image_feat_m.dtype)])  # (B + Q, D)
    text_all = torch.cat([text_feat_m, queue_text.to(text_feat_m.dtype)])
    ids_all = torch.cat([image_ids, queue_ids.to(image_ids.device)])
    positives = (image_ids[:, None] == ids_all[None, :]).float()
    targets = positives / positives.sum(1, keepdim=True)
    with torch.no_grad():
        s = scale.detach() if isinstance(scale, torch.Tensor) else scale
        i2t_targets = alpha * F.softmax(s * image_feat_m @ text_all.t(), dim=1).float() + (1 - alpha) * targets
        t2i_targets = alpha * F.softmax(s * text_feat_m @ image_all.t(), dim=1).float() + (1 - alpha) * targets
    i2t = -(F.log_softmax((scale * image_feat @ text_all.t()).float(), dim=1) * i2t_targets).sum(1).mean()
    t2i = -(F.log_softmax((scale * text_feat @ image_all.t()).float(), dim=1) * t2i_targets).sum(1).mean()
    return (i2t + t2i) / 2


def ramped_alpha(alpha: float, epoch: int, step: int, steps_per_epoch: int) -> float:
    """alpha * min(1, step / steps_per_epoch) in a phase's first epoch, alpha afterwards (the paper)."""
    return alpha * min(1.0, step / max(1, steps_per_epoch)) if epoch == 0 else alpha


# ---- the queue --------------------------------------------------------------------------------------
class FeatureQueue:
    """A ring of `size` (image feature, text feature, image id) entries, filled from index 0."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.image: torch.Tensor | None = None  # (size, D) float32
        self.text: torch.Tensor | None = None
        self.ids: torch.Tensor | None = None  # (size,) int64
        self.pointer = 0  # where the next entry goes
        self.count = 0  # entries filled so far (at most size)

    def entries(self, device: torch.device, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The filled entries, on `device` (empty tensors before the first enqueue)."""
        if self.image is None or self.count == 0:
            empty = torch.zeros(0, dim, device=device)
            return empty, empty, torch.zeros(0, dtype=torch.long, device=device)
        if self.image.device != device:
            self.image, self.text, self.ids = (t.to(device) for t in (self.image, self.text, self.ids))
        n = self.count
        return self.image[:n], self.text[:n], self.ids[:n]

    @torch.no_grad()
    def enqueue(self, image: torch.Tensor, text: torch.Tensor, ids: torch.Tensor) -> None:
        if self.size == 0:
            return
        if self.image is None:
            self.image = torch.zeros(self.size, image.shape[1], device=image.device)
            self.text = torch.zeros(self.size, text.shape[1], device=image.device)
            self.ids = torch.full((self.size,), -100, dtype=torch.long, device=image.device)
        image, text, ids = image[-self.size:], text[-self.size:], ids[-self.size:]  # a batch above the size
        at = (self.pointer + torch.arange(len(ids), device=self.image.device)) % self.size
        self.image[at] = image.float().to(self.image.device)
        self.text[at] = text.float().to(self.image.device)
        self.ids[at] = ids.to(self.image.device)
        self.pointer = (self.pointer + len(ids)) % self.size
        self.count = min(self.size, self.count + len(ids))

    def state_dict(self) -> dict[str, torch.Tensor]:
        if self.image is None:
            return {}
        return {"image": self.image.cpu(), "text": self.text.cpu(), "ids": self.ids.cpu(),
                "pointer": torch.tensor([self.pointer, self.count], dtype=torch.long)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if not state:
            return
        missing = {"image", "text", "ids", "pointer"} - set(state)
        if missing:
            raise ValueError(f"momentum queue state lacks {sorted(missing)}")
        if state["image"].shape[0] != self.size:
            raise ValueError(f"the saved momentum queue holds {state['image'].shape[0]} entries, "
                             f"retrieval.queue_size is {self.size}")
        self.image, self.text = state["image"].float(), state["text"].float()
        self.ids = state["ids"].long()
        self.pointer, self.count = (int(v) for v in state["pointer"])


# ---- the momentum copy --------------------------------------------------------------------------------
def _strip_hooks(model: nn.Module) -> None:
    """Remove UPop's output-multiply mask hooks (a deep copy shares the search's hook functions;
    folded masks need nothing: a copy's folded forward is inactive, upop.masks) and drop-path
    (the paper's momentum towers have none)."""
    for module in model.modules():
        for key, hook in list(module._forward_hooks.items()):
            if getattr(hook, "upop_mask", False) or isinstance(hook, DropPathHook):
                del module._forward_hooks[key]
                module._forward_hooks_with_kwargs.pop(key, None)
                module._forward_hooks_always_called.pop(key, None)


def relative_plan(base: PruningPlan, plan: PruningPlan) -> PruningPlan:
    """`plan` (on the base model) re-expressed on the model `base` produced: the inverse of
    plan.compose, for slicing a copy that was already compressed by `base`."""
    entries = {}
    for name, sp in plan.structures.items():
        b = base.structures.get(name)
        if b is None or len(b.kept) == b.total:
            entries[name] = sp
            continue
        position = {k: i for i, k in enumerate(b.kept)}
        if any(k not in position for k in sp.kept):
            raise PlanError(f"{name}: the plan keeps units the earlier plan removed")
        entries[name] = StructurePlan(kind=sp.kind, unit=sp.unit, total=len(b.kept),
                                      kept=[position[k] for k in sp.kept], num_heads=sp.num_heads,
                                      head_dim=sp.head_dim, hidden=sp.hidden)
    return PruningPlan(structures=entries, model_class=plan.model_class, stats=plan.stats)


class Momentum:
    """The momentum copy of a retrieval model and its feature queue (see the module docstring)."""

    def __init__(self, momentum: float, queue_size: int) -> None:
        self.m = momentum
        self.model: nn.Module | None = None
        self.queue = FeatureQueue(queue_size)
        self._pending: dict[str, torch.Tensor] | None = None  # loaded weights awaiting the model

    def ensure(self, online: nn.Module) -> nn.Module:
        """The momentum copy, made from `online` (unwrapped) on first use."""
        if self.model is None:
            model = copy.deepcopy(online)
            _strip_hooks(model)
            for p in model.parameters():
                p.requires_grad_(False)
                p.grad = None
            if self._pending is not None:
                self._load_weights(model, self._pending)
                self._pending = None
            self.model = model
        self.model.train(online.training)  # the paper's copy is a submodule: it follows the mode
        return self.model

    @staticmethod
    def _load_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
        own = model.state_dict()
        if set(own) != set(weights):
            raise ValueError("the saved momentum copy does not fit the model "
                             f"(keys differ: {sorted(set(own) ^ set(weights))[:3]})")
        for name, tensor in own.items():
            if tensor.shape != weights[name].shape:
                raise ValueError(f"the saved momentum copy does not fit the model: {name} has shape "
                                 f"{tuple(weights[name].shape)}, the model {tuple(tensor.shape)}")
        model.load_state_dict(weights)

    def _pairs(self, online: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        assert self.model is not None
        params = dict(online.named_parameters())
        own, theirs = [], []
        for name, p_m in self.model.named_parameters():
            p = params.get(name)
            if p is None or p.shape != p_m.shape:
                raise RuntimeError(f"the momentum copy no longer fits the model at {name} "
                                   "(compressed without Task.after_compress?)")
            own.append(p_m)
            theirs.append(p.detach())
        return own, theirs

    @torch.no_grad()
    def update(self, online: nn.Module) -> None:
        """param_m = m * param_m + (1 - m) * param, for every parameter (after an optimiser step)."""
        if self.model is None:
            return
        own, theirs = self._pairs(online)
        torch._foreach_mul_(own, self.m)
        torch._foreach_add_(own, theirs, alpha=1 - self.m)

    @torch.no_grad()
    def after_compress(self, online: nn.Module, plan: PruningPlan, reset: bool) -> None:
        """Slice the copy with the search's plan (the same structure names); with `reset`, then
        copy the compressed online weights into it (the paper's copy_params() after compression)."""
        if self.model is None:
            if self._pending is not None:  # weights of the uncompressed copy, never materialised
                log.warning("momentum copy restarted from the compressed model (its saved weights predate "
                            "compression)")
                self._pending = None
            return
        base = getattr(self.model, "upop_plan", None)
        apply_plan(self.model, relative_plan(base, plan) if isinstance(base, PruningPlan) else plan)
        if reset:
            self.model.load_state_dict(online.state_dict())

    # ---- resuming ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (safetensors): momentum.model.<name> and momentum.queue.<part>."""
        out: dict[str, torch.Tensor] = {}
        weights = self.model.state_dict() if self.model is not None else self._pending or {}
        out.update({f"{PREFIX}model.{k}": v.detach().cpu().contiguous() for k, v in weights.items()})
        out.update({f"{PREFIX}queue.{k}": v for k, v in self.queue.state_dict().items()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        weights = {k[len(PREFIX) + 6:]: v for k, v in state.items() if k.startswith(PREFIX + "model.")}
        queue = {k[len(PREFIX) + 6:]: v for k, v in state.items() if k.startswith(PREFIX + "queue.")}
        self.queue.load_state_dict(queue)
        if not weights:
            return
        if self.model is not None:
            self._load_weights(self.model, weights)
        else:
            self._pending = weights
