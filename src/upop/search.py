"""UPopSearch: unified and progressive search over every attention and MLP structure.

Per step: the mask gradients are added to an explicit score buffer (unscaled under AMP,
non-finite steps skipped). On interval boundaries and at the last step the scores are
standardised per structure type (all attention units together, all MLP units together,
across every modality and layer), ranked globally, and the highest-ranked units whose
exact cost sums to pi_t of the total are selected; their masks are set to 1 - pi_t / p.
pi_t = p * sin(pi * (t + 1) / (2 T)) reaches p at the last step, where the masks become
exactly binary.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .adapters import discover
from .compress import apply_plan
from .config import UPopConfig
from .latency import (
    LatencyModel,
    LatencySettings,
    auto_round_to,
    build_latency_model,
    selection_widths,
    widen_to_faster,
)
from .masks import MaskSet, is_masked
from .plan import PruningPlan, StructurePlan, check_composable, compose
from .structures import Structure


class NonFiniteError(RuntimeError):
    """Too many search steps had a non-finite loss or gradient."""


def ratio_at(step: int, total_steps: int, target: float) -> float:
    """The paper's schedule pi_t = p * sin(pi * (t + 1) / (2 T)); exactly p at t = T - 1."""
    if step >= total_steps - 1:
        return float(target)
    return float(target) * math.sin(math.pi * (step + 1) / (2 * total_steps))


def standardise(scores: dict[str, torch.Tensor], groups: dict[str, str]) -> dict[str, torch.Tensor]:
    """z = (g - mean) / std with one mean and std per group over all its units."""
    out = {}
    for group in sorted(set(groups.values())):
        names = [n for n in scores if groups[n] == group]
        flat = torch.cat([scores[n].double().flatten() for n in names])
        mean = flat.mean()
        std = flat.std() if flat.numel() > 1 else flat.new_tensor(0.0)
        std = std if torch.isfinite(std) and std > 0 else flat.new_tensor(1.0)
        for n in names:
            out[n] = (scores[n].double() - mean) / std
    return out


@dataclass
class _Block:
    name: str
    order: int  # position inside its structure, in descending score order
    units: torch.Tensor
    score: float
    cost: float


def _blocks(name: str, z: torch.Tensor, cost: float, min_units: int, round_to: int) -> list[_Block]:
    """Prunable blocks of one structure, best candidates first.

    Units are sorted by descending score and grouped so that pruning any prefix of blocks
    leaves a width that is a multiple of round_to (the first block takes the remainder);
    the lowest-scoring units that min_units protects form no block.
    """
    n = z.numel()
    order = torch.argsort(z, descending=True, stable=True)
    protected = max(min_units, 1)
    protected = min(n, math.ceil(protected / round_to) * round_to)
    prunable = n - protected
    first = prunable % round_to
    sizes = ([first] if first else []) + [round_to] * (prunable // round_to)
    blocks, start = [], 0
    for i, size in enumerate(sizes):
        units = order[start:start + size]
        blocks.append(_Block(name, i, units, float(z[units].mean()), cost * size))
        start += size
    return blocks


def select_units(
    scores: dict[str, torch.Tensor],
    costs: dict[str, float],
    groups: dict[str, str],
    ratio: float,
    min_units: int = 1,
    round_to: int | dict[str, int] = 1,
    ranking: str = "global",
) -> dict[str, torch.Tensor]:
    """Boolean "selected for pruning" per structure.

    scores: raw accumulated scores per structure (higher = pruned first, as in the paper);
    costs: exact cost of one unit of each structure; groups: standardisation group.
    The cut is where the cumulative cost of the selected blocks comes closest to
    ratio * (total cost of all units). round_to: kept units are a multiple of it (one value, or
    one per structure).
    """
    steps = round_to if isinstance(round_to, dict) else dict.fromkeys(scores, round_to)
    z = standardise(scores, groups)
    selected = {n: torch.zeros(s.numel(), dtype=torch.bool) for n, s in scores.items()}
    pools = [list(scores)] if ranking == "global" else [[n] for n in scores]
    for names in pools:
        total = sum(costs[n] * scores[n].numel() for n in names)
        blocks = [b for n in names for b in _blocks(n, z[n].cpu(), costs[n], min_units, steps[n])]
        blocks.sort(key=lambda b: -b.score)  # stable: ties keep structure order
        chosen = _cut(blocks, ratio * total)
        count: dict[str, int] = {}
        for b in chosen:
            count[b.name] = count.get(b.name, 0) + 1
        # Within a structure always prune a prefix of its blocks (the best-ranked ones).
        per_structure = {}
        for b in blocks:
            per_structure.setdefault(b.name, []).append(b)
        for name, n_blocks in count.items():
            for b in sorted(per_structure[name], key=lambda b: b.order)[:n_blocks]:
                selected[name][b.units] = True
    return selected


def _cut(blocks: list[_Block], budget: float) -> list[_Block]:
    """Take blocks in rank order while they fit the budget; a block that would overshoot is
    passed over for later (cheaper) ones, and at the end the one passed-over block that
    brings the total closest to the budget is added if it does. The result lies within the
    smallest block cost of the budget instead of the largest."""
    chosen, spent, passed = [], 0.0, []
    for b in blocks:
        if spent + b.cost <= budget:
            chosen.append(b)
            spent += b.cost
        else:
            passed.append(b)
    if passed:
        best = min(passed, key=lambda b: abs(spent + b.cost - budget))
        if abs(spent + best.cost - budget) < abs(spent - budget):
            chosen.append(best)
    return chosen


class UPopSearch:
    """Attach masks to every prunable structure of `model` and run the UPop search.

    Call `step()` once per optimisation step, after `loss.backward()`. After
    `config.total_steps` steps the masks are binary; `plan()` and `compress()` follow.
    """

    def __init__(self, model: nn.Module, config: UPopConfig, structures: list[Structure] | None = None,
                 latency: LatencyModel | None = None) -> None:
        if not isinstance(config, UPopConfig):
            raise TypeError(f"config must be a upop.UPopConfig, got {type(config).__name__}")
        if is_masked(model):
            raise RuntimeError("this model already has a UPop search attached; call remove() or compress() "
                               "on that search before starting another")
        config.validate()
        base = getattr(model, "upop_plan", None)
        self.base_plan = base if isinstance(base, PruningPlan) else None
        if self.base_plan is not None:
            check_composable(self.base_plan, config.granularity)
        config.freeze()  # the caller's object: changing it mid-search raises
        self.config = dataclasses.replace(config)  # the search's own copy, frozen too
        self.config.freeze()
        self.model = model
        self.structures = structures if structures is not None else discover(model)
        for s in self.structures:
            s.check_granularity(config.granularity)
        _check_prunable(self.structures, config)
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
        self.masks = MaskSet(self.structures, config.granularity, device)
        self.masks.attach()
        self.scores = {s.name: torch.zeros(s.num_units(config.granularity), dtype=torch.float64)
                       for s in self.structures}
        self.latency = latency  # built from the first forward's tokens when budget="latency"
        self._reach_checked = False
        self._round_to: int | None = None
        self.step_count = 0
        self.skipped_steps = 0
        self.current_ratio = 0.0
        self._selected: dict[str, torch.Tensor] = {}
        self._compressed = False
        self._final_plan: PruningPlan | None = None

    # ---- the loop --------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.step_count >= self.config.total_steps

    def sparsity_loss(self) -> torch.Tensor:
        """w_attn * sum|zeta_attn| + w_mlp * sum|zeta_mlp| (see UPopConfig on its effect)."""
        cfg = self.config
        terms = []
        for s in self.structures:
            weight = cfg.sparsity_weight_attn if s.is_attention else cfg.sparsity_weight_mlp
            terms.append(weight * self.masks.values[s.name].abs().sum())
        return torch.stack(terms).sum()

    def step(self, grad_scale: float | None = None, skip: bool = False) -> None:
        """Accumulate this step's mask gradients and, on interval boundaries, update the masks.

        grad_scale: the AMP loss scale (e.g. `scaler.get_scale()`); gradients are divided
        by it. A step whose mask gradients are not finite adds nothing to the scores, nor does
        one the caller marks `skip=True` (its loss was not finite); the schedule still advances.
        """
        if grad_scale is not None and (isinstance(grad_scale, bool) or not isinstance(grad_scale, (int, float))
                                       or not math.isfinite(grad_scale) or grad_scale <= 0):
            raise ValueError(f"step(grad_scale=...) must be a finite number > 0 (the AMP loss scale), "
                             f"got {grad_scale!r}")
        if self.finished:
            raise RuntimeError(
                f"the search already ran its {self.config.total_steps} steps; call plan()/compress()"
            )
        grads = self.masks.grads()
        if not skip and all(g is None for g in grads.values()):
            warnings.warn("upop: step() found no mask gradients; call it after loss.backward()",
                          stacklevel=2)
        # unscaled first, then checked: a tiny (denormal) grad_scale turns finite gradients infinite
        unscaled = {name: g.detach().double().cpu() / (grad_scale or 1.0)
                    for name, g in grads.items() if g is not None}
        finite = all(bool(torch.isfinite(g).all()) for g in unscaled.values())
        if finite and not skip:
            for name, g in unscaled.items():
                self.scores[name] += g
        else:
            self._skip()
        self.masks.zero_grad()
        t = self.step_count
        last = t == self.config.total_steps - 1
        if last or (self.config.progressive and t % self.config.interval == 0):
            self._update(t)
        self.step_count += 1

    def _skip(self) -> None:
        self.skipped_steps += 1
        limit = self.config.max_skipped_fraction * self.config.total_steps
        if self.skipped_steps > max(limit, 1):
            raise NonFiniteError(
                f"upop: {self.skipped_steps} of {self.step_count + 1} search steps had a non-finite loss or "
                f"mask gradient (limit {self.config.max_skipped_fraction:.0%} of {self.config.total_steps}); "
                "lower the learning rate or use bf16/fp32")
        warnings.warn(f"upop: non-finite loss or mask gradient at step {self.step_count}; step skipped "
                      f"({self.skipped_steps} so far)", stacklevel=3)

    # ---- the progressive update ---------------------------------------------------------------
    def unit_costs(self) -> dict[str, float]:
        """Exact cost of one unit of every structure under the configured budget."""
        g = self.config.granularity
        if self.config.budget == "params":
            return {s.name: s.unit_params(g) for s in self.structures}
        if self.config.budget == "latency":
            return self.latency_model().unit_costs()
        tokens = self._reduced_tokens()
        if any(q == 0 for q, _ in tokens.values()):
            raise RuntimeError('budget="flops" needs at least one forward pass before the first step()')
        return {s.name: s.unit_flops(g, *tokens[s.name]) for s in self.structures}

    def latency_model(self) -> LatencyModel:
        """The measured latency tables (cached on disk), built once from the tokens seen so far."""
        if self.latency is None:
            tokens = self._reduced_tokens()
            if any(q == 0 for q, _ in tokens.values()):
                raise RuntimeError('budget="latency" needs at least one forward pass before the first step()')
            settings = LatencySettings(runtime=self.config.latency_runtime, batch=self.config.latency_batch)
            built = [None]
            if _world_size() <= 1 or dist.get_rank() == 0:  # timings differ per rank: rank 0 decides
                built[0] = build_latency_model(self.structures, self.config.granularity, tokens, settings).to_dict()
            if _world_size() > 1:
                dist.broadcast_object_list(built, src=0)
            self.latency = LatencyModel.from_dict(built[0])
        if not self._reach_checked:
            self._reach_checked = True
            reachable = self.latency.reachable()
            if self.config.target > reachable:
                warnings.warn(f"upop: budget latency: target {self.config.target:.3f} is more than cutting widths "
                              f"can remove ({reachable:.3f} of the prunable part's measured latency; the rest is "
                              "per-call overhead); the search cuts every unit it can", stacklevel=2)
        return self.latency

    def round_to(self) -> int:
        """config.round_to, or the multiple the latency tables favour for "auto" (fixed once read)."""
        if self._round_to is None:
            auto = self.config.round_to == "auto"
            self._round_to = auto_round_to(self.latency_model()) if auto else self.config.round_to
        return self._round_to

    def _reduced_tokens(self) -> dict[str, tuple[float, float]]:
        tokens = {n: t.mean() for n, t in self.masks.tokens.items()}
        if _world_size() > 1:  # every rank must rank with the same costs
            flat = _all_reduce_mean(torch.tensor([v for n in self.scores for v in tokens[n]],
                                                 dtype=torch.float64))
            tokens = {n: (float(flat[2 * i]), float(flat[2 * i + 1])) for i, n in enumerate(self.scores)}
        return tokens

    def reduced_scores(self) -> dict[str, torch.Tensor]:
        """The accumulated scores averaged over all ranks (identical on every rank)."""
        if _world_size() <= 1:
            return {n: s.clone() for n, s in self.scores.items()}
        flat = _all_reduce_mean(torch.cat([s for s in self.scores.values()]))
        out, start = {}, 0
        for n, s in self.scores.items():
            out[n] = flat[start:start + s.numel()]
            start += s.numel()
        return out

    def _update(self, t: int) -> None:
        cfg = self.config
        ratio = ratio_at(t, cfg.total_steps, cfg.target)
        self.current_ratio = ratio
        scores = self.reduced_scores()
        cut = ratio
        if cfg.budget == "latency":  # `target` of the measured latency: overhead does not shrink
            cut = self.latency_model().linear_target(ratio)
        self._selected = select_units(
            scores,
            self.unit_costs(),
            {s.name: s.score_group for s in self.structures},
            cut,
            cfg.min_units,
            {s.name: s.unit_step(cfg.granularity, self.round_to()) for s in self.structures},
            cfg.ranking,
        )
        if cfg.budget == "latency":  # keep a wider width wherever it measures faster
            self._selected = widen_to_faster(self._selected, scores, self.latency_model())
        value = 1.0 - ratio / cfg.target
        for name, sel in self._selected.items():
            mask = torch.ones(sel.numel(), dtype=torch.float32)
            mask[sel] = value
            self.masks.set(name, mask)

    # ---- results ----------------------------------------------------------------------------
    def mask_values(self) -> dict[str, torch.Tensor]:
        return {n: m.detach().clone() for n, m in self.masks.values.items()}

    def plan(self) -> PruningPlan:
        """The kept units of every structure (requires a finished search: binary masks).

        On a model that was already compressed, the kept indices refer to the base model (this
        search's choice composed onto the earlier plan), so `apply_plan` on a fresh base model
        and `from_pretrained` rebuild the twice-compressed model."""
        if self._compressed:  # the structures now have their sliced shapes: the plan made then
            return self._final_plan
        plan = self._relative_plan()
        return compose(self.base_plan, plan) if self.base_plan is not None else plan

    def _relative_plan(self) -> PruningPlan:
        """The kept units of the model as it is now (what compress() slices)."""
        if not self.finished:
            raise RuntimeError(
                f"the search has run {self.step_count} of {self.config.total_steps} steps; "
                "the plan exists once the masks are binary at the last step"
            )
        g = self.config.granularity
        entries = {}
        for s in self.structures:
            kept = torch.nonzero(~self._selected[s.name]).flatten().tolist()
            entries[s.name] = StructurePlan(
                kind=s.kind, unit=s.unit(g), total=s.num_units(g), kept=kept,
                num_heads=s.num_heads, head_dim=s.head_dim, hidden=s.hidden,
            )
        costs = self.unit_costs()
        total = sum(costs[s.name] * s.num_units(g) for s in self.structures)
        removed = sum(costs[n] * int(sel.sum()) for n, sel in self._selected.items())
        params = {s.name: s.unit_params(g) for s in self.structures}
        stats = {
            "target": self.config.target,
            "budget": self.config.budget,
            "granularity": g,
            "achieved": removed / total if total else 0.0,
            "prunable_params": sum(params[s.name] * s.num_units(g) for s in self.structures),
            "pruned_params": sum(params[n] * int(sel.sum()) for n, sel in self._selected.items()),
            "skipped_steps": self.skipped_steps,
            "round_to": self.round_to(),
            "config": self.config.to_dict(),
        }
        if self.config.budget == "latency":
            stats["latency"] = self.latency_model().report(selection_widths(self._selected), self.config.target)
            stats["achieved"] = stats["latency"]["removed_measured"]  # what the target means: measured latency
        return PruningPlan(structures=entries, model_class=type(self.model).__name__, stats=stats)

    def remove(self) -> None:
        """Detach the masks (hooks) from the model, leaving it as it was."""
        self.masks.remove()

    def compress(self) -> nn.Module:
        """Remove the masks and slice the model in place; returns the same model object."""
        if self._compressed:
            raise RuntimeError("this search has already compressed its model")
        relative = self._relative_plan()
        self.remove()
        apply_plan(self.model, relative, structures=self.structures)
        self._final_plan = compose(self.base_plan, relative) if self.base_plan is not None else relative
        self.model.upop_plan = self._final_plan
        self._compressed = True
        return self.model

    # ---- resuming ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"score.{n}": s for n, s in self.scores.items()}
        state.update({f"mask.{n}": m.detach().cpu() for n, m in self.masks.values.items()})
        state.update({f"selected.{n}": s for n, s in self._selected.items()})
        for n, t in self.masks.tokens.items():
            state[f"tokens.{n}"] = torch.tensor(t.sums + t.count, dtype=torch.float64)
        state["counters"] = torch.tensor([self.step_count, self.skipped_steps, self.current_ratio],
                                         dtype=torch.float64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = {f"score.{n}" for n in self.scores}
        missing = sorted(expected - set(state))
        if missing or "counters" not in state:
            raise ValueError(f"search state does not match this model's structures (missing {missing[:3]})")
        for n, s in self.scores.items():
            if state[f"score.{n}"].shape != s.shape:
                raise ValueError(f"search state for {n} has shape {tuple(state[f'score.{n}'].shape)}, "
                                 f"expected {tuple(s.shape)}")
        for n in self.scores:
            self.scores[n] = state[f"score.{n}"].double().clone()
            self.masks.set(n, state[f"mask.{n}"])
            if f"selected.{n}" in state:
                self._selected[n] = state[f"selected.{n}"].bool().clone()
            t = state[f"tokens.{n}"].tolist()
            self.masks.tokens[n].sums = t[:2]
            self.masks.tokens[n].count = [int(c) for c in t[2:]]
        step, skipped, ratio = state["counters"].tolist()
        self.step_count, self.skipped_steps, self.current_ratio = int(step), int(skipped), ratio


def _check_prunable(structures: list[Structure], config: UPopConfig) -> None:
    """Refuse min_units / round_to that protect every unit of every structure: the search would
    run its steps and end with nothing pruned (achieved 0) instead of the target."""
    if config.round_to == "auto" or not structures:  # "auto" is known once the latency tables exist
        return
    g = config.granularity
    for s in structures:
        n, step = s.num_units(g), s.unit_step(g, config.round_to)
        if n - min(n, math.ceil(max(config.min_units, 1) / step) * step) > 0:
            return
    widest = max(s.num_units(g) for s in structures)
    raise ValueError(f"UPopConfig: min_units={config.min_units} and round_to={config.round_to} leave no unit "
                     f"of any structure prunable (the widest has {widest} {g} units); lower them")


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce_mean(flat: torch.Tensor) -> torch.Tensor:
    """Mean over ranks; NCCL needs the tensor on this rank's GPU."""
    if dist.get_backend() == "nccl":
        reduced = flat.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(reduced)
        return (reduced / _world_size()).cpu()
    reduced = flat.clone()
    dist.all_reduce(reduced)
    return reduced / _world_size()
