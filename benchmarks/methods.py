"""The compared methods: each takes the cached dense model and returns a compressed copy.

Every method gets the same number of training steps after the dense model (`Bench.steps`):
the UPop variants split them into a search phase and a retraining phase, the one-shot
baselines (magnitude, Torch-Pruning) prune first and retrain for all of them.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import upop
from upop.costs import count_flops, eager_attention
from upop.measure import budget_latency_model, latency_budget
from upop.optim import cosine
from upop.runconfig import RunConfig
from upop.tasks import Task
from upop.training import Trainer


@dataclass
class Bench:
    """One benchmark task: its run config, task (data + model builder) and trainer.

    steps: training steps every method gets after the dense model (search + retrain);
    search_steps: the part of them the UPop variants spend searching;
    chunk: Trainer epochs are capped at this many steps, so a phase of n steps is n / chunk
    Trainer epochs (every phase length is a multiple of chunk).
    """

    key: str
    cfg: RunConfig
    task: Task
    trainer: Trainer
    steps: int
    search_steps: int
    chunk: int
    taylor_batches: int = 4
    extra: dict[str, Any] = field(default_factory=dict)

    def set_seed(self, seed: int) -> None:
        self.cfg.seed = seed  # Trainer.epoch reseeds from (cfg.seed, phase, epoch)
        self.trainer.sampler.seed = seed
        torch.manual_seed(seed)


def forward_flops(bench: Bench, model: nn.Module) -> float:
    """FLOPs of one forward pass over one training batch, counted at the task's example shape
    (images at data.image_size, text at data.max_tokens) by upop's FLOP counter."""
    return float(count_flops(model, bench.task.example_inputs(1))) * bench.cfg.train.batch_size


def dense_forward_flops(bench: Bench, dense: nn.Module) -> float:
    if "dense_forward_flops" not in bench.extra:
        bench.extra["dense_forward_flops"] = forward_flops(bench, dense)
    return bench.extra["dense_forward_flops"]


def distiller_for(bench: Bench, dense: nn.Module) -> Any:
    """The benchmark's distillation: the dense model as a frozen teacher, its logits (KL, T=1,
    weight 1; for contrastive models the image-text similarity logits of the batch)."""
    from upop.distill import Distiller, DistillOptions

    return Distiller(dense, DistillOptions(enabled=True, **bench.extra.get("distill", {})), bench.task)


def run_phase(bench: Bench, model: nn.Module, steps: int, *, phase: str, lr: float, schedule: str,
              search: upop.UPopSearch | None = None, warmup: int = 0, distiller: Any = None,
              step_flops: float | None = None) -> dict[str, float]:
    """`steps` optimisation steps of `model` through training.Trainer.epoch; returns loss, wall time
    and the training compute spent: steps x (3 x the forward FLOPs of a batch (forward + backward)
    + one teacher forward when distilling). `step_flops` gives the forward FLOPs of a batch where the
    model's own count would be wrong (a masked model computes at full width)."""
    if steps % bench.chunk:
        raise ValueError(f"{phase}: {steps} steps is not a multiple of the chunk {bench.chunk}")
    trainer = bench.trainer
    forward = step_flops if step_flops is not None else forward_flops(bench, model)
    per_step = 3 * forward + (bench.extra["dense_forward_flops"] if distiller is not None else 0.0)
    wrapped = trainer.wrap(model)
    optimizer = trainer.optimizer(model, lr)
    lr_at = (lambda _: lr) if schedule == "constant" else cosine(lr, bench.cfg.train.min_lr, steps, warmup)
    start, loss = time.time(), float("nan")
    extra = {"distiller": distiller} if distiller is not None else {}
    for epoch in range(steps // bench.chunk):
        loss = trainer.epoch(wrapped, optimizer, phase=phase, epoch=epoch, lr_at=lr_at, search=search, **extra)
    return {"steps": steps, "last_loss": loss, "wall_s": time.time() - start, "train_flops": per_step * steps}


def retrain(bench: Bench, model: nn.Module, steps: int, distiller: Any = None) -> dict[str, float]:
    t = bench.cfg.train
    warmup = min(bench.extra.get("retrain_warmup", 0), steps // 4)
    return run_phase(bench, model, steps, phase="retrain", lr=t.lr, schedule="cosine", warmup=warmup,
                     distiller=distiller)


def train_flops(info: dict[str, Any]) -> float:
    """Training compute of a method after the dense model: its phases and any importance passes."""
    return sum(info.get(k, {}).get("train_flops", 0.0) for k in ("search", "retrain")) + info.get("prune_flops", 0.0)


def equal_compute_steps(bench: Bench, model: nn.Module, budget: float, spent: float) -> int:
    """Retraining steps of `model` (a multiple of the chunk, at least one chunk) that spend
    `budget` - `spent` FLOPs."""
    per_step = 3 * forward_flops(bench, model)
    steps = round((budget - spent) / per_step / bench.chunk) * bench.chunk
    return max(bench.chunk, steps)


def _evaluate(bench: Bench, model: nn.Module) -> float:
    return float(bench.task.evaluate(model, "test", torch.device("cpu"))[bench.task.metric])


# ---- UPop and its ablations ----------------------------------------------------------------------
def upop_search(bench: Bench, dense: nn.Module, target: float, *, progressive: bool = True,
                ranking: str = "global", distill: bool = False,
                **overrides: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Search for `bench.search_steps` steps, compress, retrain for the rest (`distill`: with the
    dense model as teacher in both phases; `overrides`: other UPopConfig fields, e.g. the budget)."""
    model = copy.deepcopy(dense)
    t = bench.cfg.train
    settings = {k: v for k, v in bench.cfg.upop.items() if k not in ("target", "progressive", "ranking")}
    cfg = upop.UPopConfig(**{**settings, "target": target, "total_steps": bench.search_steps,
                             "progressive": progressive, "ranking": ranking, **overrides})
    latency = None
    if cfg.budget == "latency":  # the tables of this machine, built before the masks attach (cached on disk)
        start = time.time()
        latency = budget_latency_model(bench.task, model, upop.discover(model), cfg)
        latency_build_s = time.time() - start
    search = upop.UPopSearch(model, cfg, latency=latency)
    distiller = distiller_for(bench, dense) if distill else None
    searched = run_phase(bench, model, bench.search_steps, phase="search", lr=t.search_lr, schedule="constant",
                         search=search, distiller=distiller, step_flops=dense_forward_flops(bench, dense))
    plan = search.plan()
    search.compress()
    info = {"config": cfg.to_dict(), "search": searched, "achieved": plan.stats["achieved"],
            "prunable_params": plan.stats["prunable_params"], "pruned_params": plan.stats["pruned_params"],
            "metric_before_retrain": _evaluate(bench, model), "distill": distill}
    if latency is not None:
        report = latency_budget(latency, plan, target, bench.task, model)
        # the goal: the fixed part untouched, the prunable part's measured latency cut by `target`
        report["goal_ms"] = report["fixed_ms"] + (1 - target) * report["prunable_ms"]
        report["measured_over_goal"] = report["measured_ms"] / report["goal_ms"]
        info["latency_budget"] = {**report, "build_s": latency_build_s}
    info["retrain"] = retrain(bench, model, bench.steps - bench.search_steps, distiller=distiller)
    return model, info


def upop_full(bench, dense, target):
    return upop_search(bench, dense, target, progressive=True, ranking="global")


def upop_oneshot(bench, dense, target):
    return upop_search(bench, dense, target, progressive=False, ranking="global")


def upop_uniform(bench, dense, target):
    return upop_search(bench, dense, target, progressive=True, ranking="per_structure")


def upop_kd(bench, dense, target):
    return upop_search(bench, dense, target, distill=True)


def upop_latency(bench, dense, target):
    """budget latency: `target` of the prunable part's measured latency (PyTorch, this CPU, at the
    batch of bench.extra["latency_batch"]), widths rounded where the tables favour it."""
    return upop_search(bench, dense, target, budget="latency", round_to="auto",
                       latency_batch=bench.extra.get("latency_batch", 32))


# ---- one-shot global magnitude (L1) --------------------------------------------------------------
@torch.no_grad()
def unit_l1(structure: upop.Structure) -> torch.Tensor:
    """Mean |w| of everything one unit owns: for a head_dim unit j the rows h*head_dim+j of q, k, v
    (or of the fused qkv) in every head, with their biases, and the same columns of the out-projection;
    for an MLP neuron its fc1 row (and bias) and fc2 column. The mean (not the sum) makes units of
    towers with different widths comparable."""
    s = structure
    if not s.is_attention:
        total = s.fc1.weight.abs().sum(1) + s.fc2.weight.abs().sum(0)
        count = s.fc1.in_features + s.fc2.out_features
        if s.fc1.bias is not None:
            total, count = total + s.fc1.bias.abs(), count + 1
        return (total / count).double()
    values = []
    for j in range(s.head_dim):
        rows = s.kept_rows([j], "head_dim")
        total, count = 0.0, 0
        for lin in s.input_linears():
            parts = [rows + p * s.num_heads * s.head_dim for p in range(3)] if lin is s.qkv else [rows]
            for r in parts:
                total += float(lin.weight[r].abs().sum())
                count += lin.weight[r].numel()
                if lin.bias is not None:
                    total += float(lin.bias[r].abs().sum())
                    count += r.numel()
        total += float(s.out.weight[:, rows].abs().sum())
        count += s.out.weight[:, rows].numel()
        values.append(total / count)
    return torch.tensor(values, dtype=torch.float64)


def magnitude_plan(model: nn.Module, target: float, min_units: int = 1) -> upop.PruningPlan:
    """Rank every head_dim unit and MLP neuron by its L1 magnitude (standardised per structure
    type, as UPop's scores) and cut the smallest at `target` of the prunable params."""
    structures = upop.discover(model)
    scores = {s.name: -unit_l1(s) for s in structures}  # select_units prunes the highest first
    costs = {s.name: s.unit_params("head_dim") for s in structures}
    groups = {s.name: s.score_group for s in structures}
    selected = upop.select_units(scores, costs, groups, target, min_units=min_units)
    entries = {}
    for s in structures:
        kept = torch.nonzero(~selected[s.name]).flatten().tolist()
        entries[s.name] = upop.StructurePlan(kind=s.kind, unit=s.unit("head_dim"), total=s.num_units("head_dim"),
                                             kept=kept, num_heads=s.num_heads, head_dim=s.head_dim, hidden=s.hidden)
    prunable = sum(costs[s.name] * s.num_units("head_dim") for s in structures)
    pruned = sum(costs[n] * int(sel.sum()) for n, sel in selected.items())
    stats = {"target": target, "budget": "params", "granularity": "head_dim", "achieved": pruned / prunable,
             "prunable_params": prunable, "pruned_params": pruned, "method": "global L1 magnitude"}
    return upop.PruningPlan(structures=entries, model_class=type(model).__name__, stats=stats)


def magnitude(bench: Bench, dense: nn.Module, target: float, *, equal_compute: bool = False
              ) -> tuple[nn.Module, dict[str, Any]]:
    model = copy.deepcopy(dense)
    plan = magnitude_plan(model, target, min_units=int(bench.cfg.upop.get("min_units", 1)))
    upop.apply_plan(model, plan)
    info = {"achieved": plan.stats["achieved"], "prunable_params": plan.stats["prunable_params"],
            "pruned_params": plan.stats["pruned_params"], "metric_before_retrain": _evaluate(bench, model)}
    steps = bench.steps
    if equal_compute:
        steps = equal_compute_steps(bench, model, bench.extra["compute_goal"], 0.0)
        info["compute_goal"] = bench.extra["compute_goal"]
    info["retrain"] = retrain(bench, model, steps)
    return model, info


def magnitude_ec(bench, dense, target):
    return magnitude(bench, dense, target, equal_compute=True)


# ---- Torch-Pruning: global Taylor importance -----------------------------------------------------
def _output_tensor(output: Any) -> torch.Tensor:
    for name in ("logits_per_image", "logits", "last_hidden_state"):
        value = getattr(output, name, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"no logits in {type(output).__name__}")


def _taylor_gradients(bench: Bench, model: nn.Module) -> None:
    """Accumulate the task loss gradients of `bench.taylor_batches` training batches (no update)."""
    model.train()
    model.zero_grad(set_to_none=True)
    bench.trainer.sampler.set_epoch(0)  # the same batches for a given seed
    batches = iter(bench.trainer.loader)
    for _ in range(bench.taylor_batches):
        bench.task.loss(model, next(batches)).backward()


def _keep_one_taylor():
    """TaylorImportance that never ranks the best unit of a group below the cut.

    Torch-Pruning's global threshold can select every channel of a layer; such a group is then
    refused by `check_pruning_group` and left whole, so the pruned size stops growing with the
    ratio (measured: 17.2M params at ratio 0.74, 17.5M at 0.87 on the dual encoder) and 4x cannot be
    reached. Keeping the top unit of each group (UPop's min_units=1) makes the size monotone."""
    import torch_pruning as tp

    class KeepOneTaylor(tp.importance.TaylorImportance):
        def __call__(self, group):
            imp = super().__call__(group)
            if imp is None or imp.numel() == 0:
                return imp
            imp = imp.clone()
            imp[torch.argmax(imp)] = float("inf")
            return imp

    return KeepOneTaylor()


def tp_prune(model: nn.Module, example: dict[str, torch.Tensor], ratio: float) -> nn.Module:
    """Prune head dims (shared by all heads, q/k/v/out together) and MLP neurons of `model` in place
    with torch_pruning's MetaPruner, global Taylor importance. The residual width is untouched."""
    import torch_pruning as tp

    structures = upop.discover(model)
    allowed, num_heads = set(), {}
    for s in structures:
        if s.is_attention:
            if s.qkv is not None:
                raise NotImplementedError("fused qkv is not handled in this benchmark's Torch-Pruning set-up")
            for lin in (s.q, s.k, s.v):
                allowed.add(lin)
                num_heads[lin] = s.num_heads
        else:
            allowed.add(s.fc1)
    ignored = [m for m in model.modules()
               if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)) and m not in allowed]
    with warnings.catch_warnings(), eager_attention(model):
        warnings.simplefilter("ignore")  # "unwrapped parameters": position tables, in the untouched residual group
        pruner = tp.pruner.MetaPruner(
            model, example, importance=_keep_one_taylor(), global_pruning=True,
            pruning_ratio=ratio, num_heads=num_heads, prune_head_dims=True, prune_num_heads=False,
            ignored_layers=ignored, output_transform=_output_tensor)
        pruner.step()
    for s in structures:  # write the new head width into the modules' attributes
        if s.is_attention:
            width = s.q.out_features // s.num_heads
            if not (s.k.out_features == s.v.out_features == s.out.in_features == width * s.num_heads):
                raise RuntimeError(f"{s.name}: Torch-Pruning left q/k/v/out with different widths")
            s.set_shape(s.num_heads, width)
    return model


def torch_pruning_taylor(bench: Bench, dense: nn.Module, target: float, *, distill: bool = False,
                         equal_compute: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Torch-Pruning at the parameter count UPop reaches: dense params - target * prunable params.

    pruning_ratio counts channels, not params, so it is found by bisection (each try prunes a
    fresh copy carrying the same Taylor gradients). `distill`: the dense model as teacher during
    the retraining; `equal_compute`: as many retraining steps as spend UPop's training compute
    (bench.extra["compute_goal"]) minus the Taylor passes."""
    start = time.time()
    structures = upop.discover(dense)
    prunable = sum(s.unit_params("head_dim") * s.num_units("head_dim") for s in structures)
    goal = upop.count_params(dense) - target * prunable
    source = copy.deepcopy(dense)
    _taylor_gradients(bench, source)
    grads = [None if p.grad is None else p.grad.clone() for p in source.parameters()]
    example = {k: v for k, v in bench.task.example_inputs(2).items()}

    def attempt(ratio: float) -> nn.Module:
        model = copy.deepcopy(source)
        for p, g in zip(model.parameters(), grads, strict=True):
            p.grad = None if g is None else g.clone()
        tp_prune(model, example, ratio)
        model.zero_grad(set_to_none=True)
        return model

    lo, hi, best, tries = 0.0, 0.99, None, []
    for _ in range(bench.extra.get("tp_bisection", 9)):
        mid = (lo + hi) / 2
        model = attempt(mid)
        params = upop.count_params(model)
        tries.append({"ratio": mid, "params": params})
        if best is None or abs(params - goal) < abs(best[1] - goal):
            best = (model, params, mid)
        if params > goal:
            lo = mid
        else:
            hi = mid
    model, params, ratio = best
    info = {"pruning_ratio": ratio, "goal_params": goal, "achieved_params": params,
            "params_gap": params - goal, "achieved": (upop.count_params(dense) - params) / prunable,
            "prunable_params": prunable, "pruned_params": upop.count_params(dense) - params,
            "bisection": tries, "taylor_batches": bench.taylor_batches, "prune_wall_s": time.time() - start,
            "note": "head_dim (the same dims in every head, q/k/v/out together) + MLP neurons; "
                    "residual width untouched"}
    info["metric_before_retrain"] = _evaluate(bench, model)
    # the Taylor passes: forward + backward of the dense model, no update
    info["prune_flops"] = 3 * dense_forward_flops(bench, dense) * bench.taylor_batches
    steps = bench.steps
    if equal_compute:
        steps = equal_compute_steps(bench, model, bench.extra["compute_goal"], info["prune_flops"])
        info["compute_goal"] = bench.extra["compute_goal"]
    info["retrain"] = retrain(bench, model, steps, distiller=distiller_for(bench, dense) if distill else None)
    return model, info


def torch_pruning_kd(bench, dense, target):
    return torch_pruning_taylor(bench, dense, target, distill=True)


def torch_pruning_ec(bench, dense, target):
    return torch_pruning_taylor(bench, dense, target, equal_compute=True)


METHODS = {
    "upop": ("UPop (unified + progressive)", upop_full),
    "upop_oneshot": ("UPop without progressive pruning (mask-based, one-shot)", upop_oneshot),
    "upop_uniform": ("per-layer uniform ratio, same score (no unified search)", upop_uniform),
    "magnitude": ("one-shot global L1 magnitude + retrain", magnitude),
    "torch_pruning": ("Torch-Pruning global Taylor (head_dim + MLP) + retrain", torch_pruning_taylor),
    "upop_kd": ("UPop + distillation from the dense model", upop_kd),
    "torch_pruning_kd": ("Torch-Pruning + the same distillation", torch_pruning_kd),
    "upop_latency": ("UPop, budget latency (measured tables, round_to auto)", upop_latency),
    "torch_pruning_ec": ("Torch-Pruning, retrained at UPop's training compute", torch_pruning_ec),
    "magnitude_ec": ("global L1 magnitude, retrained at UPop's training compute", magnitude_ec),
}
# methods whose step count follows the compute UPop spent at the same target and seed
EQUAL_COMPUTE = ("torch_pruning_ec", "magnitude_ec")
