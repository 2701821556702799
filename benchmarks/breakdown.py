"""Where a forward pass spends its time, part by part, and why a compressed model's speedup differs
from its FLOPs ratio.

Parts: `attention` (each prunable attention structure: q/k/v projections, the attention matmuls and
softmax, the out-projection), `mlp` (fc1, activation, fc2 of each MLP structure), and the parts UPop
never prunes: `embeddings` (patch / token / position embedding modules), `norms` (LayerNorm and other
norm modules), `head` (poolers, projections, classifiers: every Linear no structure owns) and `other`
= the whole forward minus the timed parts (residual adds, reshapes, dropout calls, the logit matmul of
a dual encoder's top-level forward, Python and per-call overhead).

A thin wrapper around the forward of each assigned module (cheaper than forward hooks) times each call
with time.perf_counter, exclusively: a timed module nested inside another (BertEmbeddings' LayerNorm)
is subtracted from its parent, so nothing is counted twice and the parts plus `other` add up to the
whole forward. hook_overhead in the results is what these wrappers add to the whole forward. Where a family
splits a structure over several modules (HF BERT: BertSelfAttention + the out-projection Linear in
BertSelfOutput; BertIntermediate (fc1 + act) + the fc2 Linear in BertOutput) each piece is timed on
its own and the LayerNorm, dropout and residual add of BertSelfOutput / BertOutput go to `norms` and
`other`. Norms inside a structure's module (timm's qk_norm) count as that structure's.

FLOPs per part come from the same wrappers reading torch's FlopCounterMode, with eager attention
(upop.costs.eager_attention: the counter misses fused SDPA matmuls), so they add up to
upop.costs.count_flops of the whole model.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import upop
from upop.costs import eager_attention, run_model

PARTS = ("attention", "mlp", "embeddings", "norms", "head", "other")
FIXED_PARTS = ("embeddings", "norms", "head", "other")  # never pruned
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORM_TYPES) or type(module).__name__.endswith(("LayerNorm", "RMSNorm", "Norm"))


def _is_embedding(module: nn.Module) -> bool:
    return isinstance(module, (nn.Embedding, nn.modules.conv._ConvNd)) or "Embed" in type(module).__name__


def _is_head(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__.endswith(("Pooler", "Head"))


def _inside(path: str, ancestor: str) -> bool:
    return ancestor == "" or path == ancestor or path.startswith(ancestor + ".")


def assign_parts(model: nn.Module, structures: list[upop.Structure] | None = None,
                 split: bool = True) -> dict[str, dict[str, str]]:
    """The timed modules: module path -> {"part": ..., "owner": structure name or the path itself}.

    A structure is timed on its module and on each of its Linears (wherever they sit: HF BERT's
    out-projection and fc2 lie outside the structure's module); "sub" tells the Linears ("linear") from
    the rest ("rest": attention matmuls, softmax, reshapes; the MLP's activation). Outside the
    structures, the outermost embedding / head modules and every norm module are timed; what is left
    untimed is `other`. split=False times the Linears inside a structure's module only as part of it
    (fewer wrappers; no linear/rest split).
    """
    structures = upop.discover(model) if structures is None else structures
    paths = {id(m): p for p, m in model.named_modules()}
    timed: dict[str, dict[str, str]] = {}
    owned: set[int] = set()
    for s in structures:
        part = "attention" if s.is_attention else "mlp"
        linears = [*s.input_linears(), s.output_linear()]
        owned.update(id(lin) for lin in linears)
        timed[s.name] = {"part": part, "owner": s.name, **({"sub": "rest"} if split else {})}
        for lin in linears:  # timed on their own too, so the Linears split from the rest of the structure
            path = paths[id(lin)]
            if split or not _inside(path, s.name):
                timed[path] = {"part": part, "owner": s.name, **({"sub": "linear"} if split else {})}
    covered = list(timed)  # modules whose inside belongs to a structure or a fixed part already timed
    for path, module in model.named_modules():
        if path == "" or path in timed:
            continue
        inside = next((c for c in covered if _inside(path, c)), None)
        if _is_norm(module):
            if inside is not None and timed[inside]["part"] in ("attention", "mlp"):
                continue  # a norm inside a structure's module (qk_norm) is the structure's
            timed[path] = {"part": "norms", "owner": path}
        elif inside is not None:
            continue
        elif _is_embedding(module):
            timed[path] = {"part": "embeddings", "owner": path}
            covered.append(path)
        elif _is_head(module) and id(module) not in owned:
            timed[path] = {"part": "head", "owner": path}
            covered.append(path)
    return timed


class _Hooks:
    """Exclusive per-module accounting of a clock (time or FLOPs) over one forward.

    Each timed module gets a thin wrapper around its forward (an instance attribute, removed by
    detach): cheaper than forward pre/post hooks, which send every call down nn.Module's slow path."""

    def __init__(self, model: nn.Module, timed: dict[str, dict[str, str]]) -> None:
        self.model, self.timed = model, timed
        self.clock: Callable[[], float] = time.perf_counter
        self.stack: list[float] = []  # per open call: the time its timed children took
        self.acc: dict[str, float] = {}
        self.wrapped: list[nn.Module] = []

    def attach(self) -> None:
        for path in self.timed:
            module = self.model.get_submodule(path)
            if "forward" in module.__dict__:
                self.detach()
                raise RuntimeError(f"{path}: its forward is already replaced on the instance; cannot time it")
            module.forward = self._wrap(path, module.forward)
            self.wrapped.append(module)

    def detach(self) -> None:
        for module in self.wrapped:
            module.__dict__.pop("forward", None)
        self.wrapped.clear()

    def _wrap(self, path: str, forward: Callable[..., Any]) -> Callable[..., Any]:
        acc, stack, clock = self.acc, self.stack, self.clock

        def timed(*args: Any, **kwargs: Any) -> Any:
            stack.append(0.0)
            start = clock()
            try:
                return forward(*args, **kwargs)
            finally:
                spent = clock() - start
                children = stack.pop()
                acc[path] = acc.get(path, 0.0) + spent - children
                if stack:
                    stack[-1] += spent
        return timed

    def run(self, inputs: Any) -> tuple[float, dict[str, float]]:
        """One forward: (whole, per timed path), in clock units."""
        self.stack.clear()
        self.acc.clear()  # cleared, not replaced: the wrappers hold this dict
        start = self.clock()
        run_model(self.model, inputs)
        whole = self.clock() - start
        if self.stack:
            raise RuntimeError(f"unbalanced timing wrappers ({len(self.stack)} calls never returned)")
        return whole, dict(self.acc)


def _parts(timed: dict[str, dict[str, str]], per_path: dict[str, float], whole: float) -> dict[str, float]:
    out = dict.fromkeys(PARTS, 0.0)
    for path, value in per_path.items():
        out[timed[path]["part"]] += value
    out["other"] = whole - sum(out[p] for p in PARTS if p != "other")
    return out


def _split(timed: dict[str, dict[str, str]], per_path: dict[str, float]) -> dict[str, float]:
    """attention / mlp time or FLOPs split into their Linears and the rest: keys like "attention.linear"."""
    out = {f"{p}.{sub}": 0.0 for p in ("attention", "mlp") for sub in ("linear", "rest")}
    for path, value in per_path.items():
        if "sub" in timed[path]:
            out[f"{timed[path]['part']}.{timed[path]['sub']}"] += value
    return out


def _owners(timed: dict[str, dict[str, str]], per_path: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for path, value in per_path.items():
        owner = timed[path]["owner"]
        out[owner] = out.get(owner, 0.0) + value
    return out


@torch.no_grad()
def _flops(model: nn.Module, inputs: Any,
           timed: dict[str, dict[str, str]]) -> tuple[int, dict[str, int], dict[str, int]]:
    hooks = _Hooks(model, timed)
    with eager_attention(model), FlopCounterMode(display=False) as counter:
        hooks.clock = lambda: float(counter.get_total_flops())
        hooks.attach()
        try:
            whole, per_path = hooks.run(inputs)
        finally:
            hooks.detach()
    total = int(counter.get_total_flops())
    parts = {k: int(v) for k, v in _parts(timed, per_path, whole).items()}
    parts.update({k: int(v) for k, v in _split(timed, per_path).items()})
    return total, parts, {k: int(v) for k, v in _owners(timed, per_path).items()}


def _trimmed(runs: list[float]) -> list[int]:
    """Indices of the middle half of the runs (at least one), by value."""
    order = sorted(range(len(runs)), key=runs.__getitem__)
    cut = len(runs) // 4
    return order[cut:len(runs) - cut] or order


class _Timing:
    """Per-run records of one model: whole forward without hooks, with hooks, and per timed path."""

    def __init__(self, model: nn.Module, timed: dict[str, dict[str, str]]) -> None:
        self.model, self.timed = model, timed
        self.hooks = _Hooks(model, timed)
        self.plain: list[float] = []
        self.hooked: list[float] = []
        self.paths: list[dict[str, float]] = []

    def round(self, inputs: Any, record: bool) -> None:
        start = time.perf_counter()
        run_model(self.model, inputs)
        plain = time.perf_counter() - start
        self.hooks.attach()
        try:
            hooked, per_path = self.hooks.run(inputs)
        finally:
            self.hooks.detach()
        if record:
            self.plain.append(plain * 1e3)
            self.hooked.append(hooked * 1e3)
            self.paths.append({k: v * 1e3 for k, v in per_path.items()})

    def summary(self) -> dict[str, Any]:
        keep = _trimmed(self.hooked)
        parts_runs = [_parts(self.timed, self.paths[i], self.hooked[i]) for i in range(len(self.hooked))]
        owner_runs = [_owners(self.timed, p) for p in self.paths]
        split_runs = [_split(self.timed, p) for p in self.paths]
        mean = statistics.fmean
        return {
            "whole_ms": statistics.median(self.plain),
            "hooked_ms": statistics.median(self.hooked),
            "hook_overhead": statistics.median(self.hooked) / statistics.median(self.plain) - 1.0,
            "hooked_trimmed_ms": mean(self.hooked[i] for i in keep),
            "parts_ms": {p: mean(parts_runs[i][p] for i in keep) for p in PARTS},
            "parts_median_ms": {p: statistics.median(r[p] for r in parts_runs) for p in PARTS},
            "split_ms": {k: mean(split_runs[i][k] for i in keep) for k in split_runs[0]},
            "structures_ms": {o: mean(owner_runs[i].get(o, 0.0) for i in keep) for o in owner_runs[0]},
            "runs": len(self.hooked),
            "trimmed_runs": len(keep),
        }


def _check_inputs(model: nn.Module, inputs: Any, repeats: int) -> None:
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _measure(models: dict[str, nn.Module], inputs: Any, repeats: int, warmup: int,
             split: bool = True) -> dict[str, dict[str, Any]]:
    """Time every model interleaved (order reversed every other round, so drifts fall on all alike)."""
    states = {}
    timings = {}
    for name, model in models.items():
        _check_inputs(model, inputs, repeats)
        states[name] = model.training
        model.eval()
        timed = assign_parts(model, split=split)
        timings[name] = _Timing(model, timed)
    try:
        with torch.no_grad():
            names = list(models)
            for r in range(max(0, warmup) + repeats):
                for name in names if r % 2 == 0 else names[::-1]:
                    timings[name].round(inputs, record=r >= warmup)
            out = {}
            for name, timing in timings.items():
                total, flops, owner_flops = _flops(models[name], inputs, timing.timed)
                structures = {}
                ms = timing.summary()
                for owner, value in ms.pop("structures_ms").items():
                    part = timing.timed[owner]["part"] if owner in timing.timed else None
                    structures[owner] = {"part": part, "ms": value, "flops": owner_flops.get(owner, 0)}
                split = {k: flops.pop(k) for k in list(flops) if k not in PARTS}
                out[name] = {**ms, "flops": total, "parts_flops": flops, "split_flops": split, "modules": structures,
                             "threads": torch.get_num_threads()}
    finally:
        for name, model in models.items():
            model.train(states[name])
    return out


def module_breakdown(model: nn.Module, inputs: dict[str, torch.Tensor], repeats: int = 10,
                     warmup: int = 2, split: bool = True) -> dict[str, Any]:
    """Time one forward of `model` on `inputs` part by part (see the module docstring) and count
    FLOPs per part; runs in eval mode under torch.no_grad at the caller's thread count.

    Returns whole_ms (median forward without hooks), hooked_ms (median with the timing hooks) and
    hook_overhead (hooked / whole - 1); parts_ms: per part, the mean over the middle half of the
    runs (ranked by hooked time), so the parts, `other` included, add up to hooked_trimmed_ms;
    parts_median_ms: per-part medians (these need not add up); parts_flops (adding up to flops, the
    whole model's FLOPs under eager attention); shares (parts_ms / hooked_trimmed_ms); split_ms /
    split_flops: attention and mlp split into their Linears and the rest ("attention.linear",
    "attention.rest", "mlp.linear", "mlp.rest"); modules: per structure and per fixed-part module
    its part, ms and FLOPs. split=False: fewer wrappers (less overhead at batch 1), no split (zeros).
    """
    result = _measure({"model": model}, inputs, repeats, warmup, split)["model"]
    result["shares"] = {p: v / result["hooked_trimmed_ms"] for p, v in result["parts_ms"].items()}
    return result


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def compare_breakdown(dense: nn.Module, compressed: nn.Module, inputs: dict[str, torch.Tensor],
                      repeats: int = 10, warmup: int = 2, split: bool = True) -> dict[str, Any]:
    """Break down `dense` and `compressed` on the same inputs (timed interleaved) and set them side
    by side: per part dense/compressed ms, speedup (dense / compressed ms), flops_ratio (dense /
    compressed FLOPs) and share of the dense and of the compressed time; `whole`: the forward's
    speedup (without hooks) against its FLOPs ratio; `split`: the same for the Linears and the rest of
    attention and MLPs; `fixed`: the never-pruned parts together.
    `describe(result)` words it."""
    runs = _measure({"dense": dense, "compressed": compressed}, inputs, repeats, warmup, split)
    d, c = runs["dense"], runs["compressed"]
    parts = {}
    for p in PARTS:
        dm, cm = d["parts_ms"][p], c["parts_ms"][p]
        df, cf = d["parts_flops"][p], c["parts_flops"][p]
        parts[p] = {"dense_ms": dm, "compressed_ms": cm, "speedup": _ratio(dm, cm),
                    "dense_flops": df, "compressed_flops": cf, "flops_ratio": _ratio(df, cf),
                    "dense_share": dm / d["hooked_trimmed_ms"], "compressed_share": cm / c["hooked_trimmed_ms"]}
    split = {}
    for k in d["split_ms"]:
        dm, cm = d["split_ms"][k], c["split_ms"][k]
        df, cf = d["split_flops"][k], c["split_flops"][k]
        split[k] = {"dense_ms": dm, "compressed_ms": cm, "speedup": _ratio(dm, cm), "dense_flops": df,
                    "compressed_flops": cf, "flops_ratio": _ratio(df, cf)}
    fixed_d = sum(d["parts_ms"][p] for p in FIXED_PARTS)
    fixed_c = sum(c["parts_ms"][p] for p in FIXED_PARTS)
    return {
        "parts": parts,
        "split": split,
        "whole": {"dense_ms": d["whole_ms"], "compressed_ms": c["whole_ms"],
                  "speedup": _ratio(d["whole_ms"], c["whole_ms"]),
                  "hooked_speedup": _ratio(d["hooked_trimmed_ms"], c["hooked_trimmed_ms"]),
                  "dense_flops": d["flops"], "compressed_flops": c["flops"],
                  "flops_ratio": _ratio(d["flops"], c["flops"]),
                  "dense_hook_overhead": d["hook_overhead"], "compressed_hook_overhead": c["hook_overhead"]},
        "fixed": {"dense_ms": fixed_d, "compressed_ms": fixed_c,
                  "dense_share": fixed_d / d["hooked_trimmed_ms"],
                  "compressed_share": fixed_c / c["hooked_trimmed_ms"]},
        "dense": d, "compressed": c,
    }


def describe(result: dict[str, Any]) -> str:
    """One sentence from compare_breakdown's result."""
    def pair(p: str) -> str:
        x = result["parts"][p]
        if x["speedup"] is None or x["flops_ratio"] is None:
            return f"{p}: no time or FLOPs left"
        return f"{p} {x['speedup']:.1f}x faster for {x['flops_ratio']:.1f}x fewer FLOPs"
    w, f, sp = result["whole"], result["fixed"], result["split"]

    def times(k: str) -> str:
        return "n/a" if sp[k]["speedup"] is None else f"{sp[k]['speedup']:.1f}x"
    return (f"whole model {w['speedup']:.2f}x faster for {w['flops_ratio']:.2f}x fewer FLOPs; "
            f"{pair('mlp')}, {pair('attention')} (its Linears {times('attention.linear')}, the rest: matmuls, "
            f"softmax, reshapes {times('attention.rest')}); the fixed parts (embeddings, norms, head, other) took "
            f"{100 * f['dense_share']:.0f}% of the dense time and {100 * f['compressed_share']:.0f}% of the "
            "compressed time")


# ---- do odd widths cost more? ----------------------------------------------------------------------
@torch.no_grad()
def mlp_width_timing(structure: upop.Structure, tokens: int, widths: list[int], batch: int = 1,
                     repeats: int = 10, block_ms: float = 20.0) -> dict[int, float]:
    """Median ms of fc1 -> GELU -> fc2 of an MLP structure sliced to each hidden width in `widths`,
    on random (batch, tokens, in_features) inputs at this process's thread count, interleaved round
    by round. Whether round_to would pay off on this CPU: compare a width with the next multiple of 8 / 16."""
    from torch.utils import benchmark

    if structure.is_attention:
        raise ValueError(f"{structure.name} is an attention structure; mlp_width_timing takes an MLP")
    fc1, fc2 = structure.fc1, structure.fc2
    bad = [w for w in widths if not 1 <= w <= fc1.out_features]
    if bad:
        raise ValueError(f"{structure.name}: widths {bad} are outside 1..{fc1.out_features}")
    x = torch.randn(batch, tokens, fc1.in_features)
    timers, numbers = {}, {}
    for w in widths:
        a, b = copy.deepcopy(fc1), copy.deepcopy(fc2)
        a.weight = nn.Parameter(fc1.weight[:w].clone())
        a.bias = None if fc1.bias is None else nn.Parameter(fc1.bias[:w].clone())
        b.weight = nn.Parameter(fc2.weight[:, :w].clone().contiguous())
        a.out_features, b.in_features = w, w
        timers[w] = benchmark.Timer(stmt="b(torch.nn.functional.gelu(a(x)))", num_threads=torch.get_num_threads(),
                                    globals={"a": a, "b": b, "x": x, "torch": torch})
        first = timers[w].timeit(2).median * 1e3
        numbers[w] = max(1, int(block_ms / max(first, 1e-4)))
    times: dict[int, list[float]] = {w: [] for w in widths}
    for r in range(repeats):
        for w in widths if r % 2 == 0 else widths[::-1]:
            times[w].append(timers[w].timeit(numbers[w]).median * 1e3)
    return {w: statistics.median(t) for w, t in times.items()}
