"""Side-by-side benchmarks: UPop against its ablations, global magnitude and Torch-Pruning.

    python -m benchmarks.run [--quick | --tiny] [--seeds N] [--out DIR] [--docs FILE]

(full run: 2 seeds, results in benchmarks/results/; the Fashion-MNIST half took 11 minutes on one
thread, the retrieval half is estimated at 20-40 minutes. --quick: one seed, short training, results
in benchmarks/results/quick/, 8 minutes from a cold cache. --tiny: the test's smoke settings.
--threads 1 on a machine shared with other jobs.)

One process, this machine's CPU cores. For each task (OpenMoji retrieval with the demo dual
encoder, Fashion-MNIST classification with a small ViT) a dense model is trained once and
cached under benchmarks/cache/; every method then compresses it at 2x and 4x (target 0.5
and 0.75 of the prunable params) with the same number of training steps. Results go to
`<out>/<task>.json` and `<out>/run.json` (written after every row, so a stopped run keeps what
it finished and a rerun with the same settings continues); docs/BENCHMARKS.md and its plots
are then rendered from those JSON files only (benchmarks/render.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

import upop  # noqa: E402
from upop.files import write_json  # noqa: E402
from upop.optim import cosine  # noqa: E402
from upop.runconfig import load_run_config  # noqa: E402
from upop.tasks import make_task  # noqa: E402
from upop.training import Dist, Trainer  # noqa: E402

from . import render  # noqa: E402
from .breakdown import compare_breakdown  # noqa: E402
from .memory import search_memory  # noqa: E402
from .methods import EQUAL_COMPUTE, METHODS, Bench, train_flops  # noqa: E402
from .speed import search_step_cost, speed_profile  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEMO_YAML = Path(upop.__file__).parent / "configs" / "demo.yaml"
FASHION_YAML = ROOT / "examples" / "fashion_mnist.yaml"
TEXT_YAML = ROOT / "examples" / "minilm_text_retrieval.yaml"
TARGETS = (0.5, 0.75)
SPEED_METHODS = ("upop", "torch_pruning", "upop_latency")  # compressed models also timed in ONNX Runtime
# Fashion-MNIST model: DeiT-style, 28x28 images in 7x7 patches (16 patches + cls + distillation token)
SMALL_DEIT = dict(width=128, depth=4, heads=4, patch=7)

HARNESS = 2  # run.json of an earlier harness version is replaced, not merged
BASE_METHODS = ["upop", "upop_oneshot", "upop_uniform", "magnitude", "torch_pruning"]
ALL_METHODS = [*BASE_METHODS, "upop_kd", "torch_pruning_kd", "upop_latency", "torch_pruning_ec", "magnitude_ec"]
# what a row's result does not depend on (a run with more methods or targets continues an earlier one)
ROW_INDEPENDENT = ("methods", "targets", "skip", "rows", "breakdown", "memory", "onnx", "seeds")

# Per mode and task: the run-config overrides and the step budget. `steps` is what every method
# trains after the dense model (search + retrain); all phase lengths are multiples of `chunk`.
MODES: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "retrieval": dict(yaml=DEMO_YAML, overrides=[
            "model.preset=tiny-dual", "data.image_size=32", "data.max_tokens=12", "data.limit_train=96",
            "data.limit_eval=32", "train.batch_size=16", "train.eval_batch_size=64", "train.warmup_steps=1",
            "upop.interval=1"], dense_max_steps=4, dense_eval_every=2, dense_patience=1,
            steps=4, search_steps=2, chunk=2, seeds=1, repeats=2,
            batches=[1, 32], onnx=["dense"], onnx_batches=[1], search_cost_steps=2, taylor_batches=1,
            tp_bisection=6, retrain_warmup=1, methods=ALL_METHODS, breakdown=["upop"], memory=True,
            latency_batch=1),
        "classification": dict(yaml=FASHION_YAML, overrides=[
            "model.preset=tiny-vit", "data.limit_train=128", "data.limit_eval=64", "train.batch_size=16",
            "train.eval_batch_size=64", "train.warmup_steps=1", "upop.interval=1"],
            dense_max_steps=4, dense_eval_every=2, dense_patience=1,
            steps=4, search_steps=2, chunk=2, seeds=1, repeats=2, batches=[1, 32],
            onnx=[], onnx_batches=[1], search_cost_steps=2, taylor_batches=1, tp_bisection=6, retrain_warmup=1,
            methods=BASE_METHODS, latency_batch=1),
        "text": dict(yaml=TEXT_YAML, overrides=[
            "model.preset=tiny-text", "data.limit_train=64", "data.limit_eval=32", "train.batch_size=16",
            "train.eval_batch_size=64", "train.warmup_steps=1", "upop.interval=1"],
            dense_max_steps=4, dense_eval_every=2, dense_patience=1,
            steps=4, search_steps=2, chunk=2, seeds=1, repeats=2, batches=[1, 32],
            onnx=[], onnx_batches=[1], search_cost_steps=2, taylor_batches=1, tp_bisection=6, retrain_warmup=1,
            methods=["upop", "upop_kd", "torch_pruning", "torch_pruning_ec"], latency_batch=1),
    },
    "quick": {
        "retrieval": dict(yaml=DEMO_YAML, overrides=["train.warmup_steps=10", "upop.interval=5"],
                          dense_max_steps=40, dense_eval_every=20, dense_patience=1,
                          steps=20, search_steps=10, chunk=10, seeds=1, repeats=5,
                          batches=[1, 32], onnx=["dense", *SPEED_METHODS], onnx_batches=[1, 32],
                          search_cost_steps=6, taylor_batches=2, tp_bisection=8, retrain_warmup=2),
        "classification": dict(yaml=FASHION_YAML, deit=SMALL_DEIT, overrides=[
            "model.preset=tiny-deit", "data.image_size=28", "data.limit_train=6000", "data.limit_eval=2000",
            "train.warmup_steps=10", "upop.interval=5"],
            dense_max_steps=60, dense_eval_every=20, dense_patience=1,
            steps=20, search_steps=10, chunk=10, seeds=1, repeats=5, batches=[1, 32],
            onnx=["dense", *SPEED_METHODS], onnx_batches=[1, 32], search_cost_steps=6, taylor_batches=2,
            tp_bisection=8, retrain_warmup=2),
        "text": dict(yaml=TEXT_YAML, overrides=["upop.interval=5", "train.warmup_steps=5"],
                     dense_max_steps=40, dense_eval_every=20, dense_patience=1,
                     steps=20, search_steps=10, chunk=10, seeds=1, repeats=5, batches=[1, 32],
                     onnx=["dense"], onnx_batches=[1, 32], search_cost_steps=6, taylor_batches=2,
                     tp_bisection=8, retrain_warmup=2),
    },
    "full": {
        "retrieval": dict(yaml=DEMO_YAML, overrides=["upop.interval=5"],
                          dense_max_steps=900, dense_eval_every=60, dense_patience=3,
                          steps=300, search_steps=150, chunk=10, seeds=1, repeats=10,
                          batches=[1, 32], onnx=["dense", *SPEED_METHODS], onnx_batches=[1, 32],
                          search_cost_steps=20, taylor_batches=4, tp_bisection=10, retrain_warmup=6,
                          # 9.5 minutes a row on one core: the ablations are in the other two tasks
                          methods=["upop", "torch_pruning", "upop_kd", "upop_latency", "torch_pruning_ec"],
                          rows=[["upop", 0.5], ["torch_pruning", 0.5], ["upop_latency", 0.75], ["upop", 0.75],
                                ["upop_kd", 0.5], ["upop_latency", 0.5], ["torch_pruning", 0.75],
                                ["torch_pruning_ec", 0.5]],
                          breakdown=["upop", "upop_latency"], memory=True, latency_batch=32),
        "classification": dict(yaml=FASHION_YAML, deit=SMALL_DEIT, overrides=[
            "model.preset=tiny-deit", "data.image_size=28", "data.limit_train=null", "data.limit_eval=5000",
            "upop.interval=10"],
            dense_max_steps=6000, dense_eval_every=200, dense_patience=3,
            steps=200, search_steps=100, chunk=20, seeds=2, repeats=10, batches=[1, 32],
            onnx=["dense", *SPEED_METHODS], onnx_batches=[1, 32], search_cost_steps=20, taylor_batches=4,
            tp_bisection=10, retrain_warmup=10, methods=ALL_METHODS, breakdown=["upop", "upop_latency"], memory=True,
            latency_batch=32),
        # the pretrained MiniLM fine-tuned on 802 alias -> name pairs (12 batches of 64 a pass)
        "text": dict(yaml=TEXT_YAML, overrides=["upop.interval=5", "train.warmup_steps=10"],
                     dense_max_steps=300, dense_eval_every=20, dense_patience=3,
                     steps=60, search_steps=30, chunk=10, seeds=1, repeats=10, batches=[1, 32],
                     onnx=["dense", *SPEED_METHODS], onnx_batches=[1, 32], search_cost_steps=20, taylor_batches=4,
                     tp_bisection=10, retrain_warmup=10, methods=ALL_METHODS, breakdown=["upop", "upop_latency"],
                     memory=True, latency_batch=32,
                     rows=[[m, t] for group in (("upop", "torch_pruning"), ("upop_kd", "torch_pruning_kd"),
                                                ("upop_latency", "torch_pruning_ec"),
                                                ("upop_oneshot", "upop_uniform", "magnitude", "magnitude_ec"))
                           for t in TARGETS for m in group]),
    },
}


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} [bench] {msg}", flush=True)


def environment() -> dict[str, Any]:
    import onnxruntime
    import torch_pruning
    import transformers

    try:
        from importlib.metadata import version
        tp_version = version("torch-pruning")
    except Exception:
        tp_version = getattr(torch_pruning, "__version__", "?")
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "machine": {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "python": platform.python_version()},
        "versions": {"upop": upop.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "onnxruntime": onnxruntime.__version__, "torch_pruning": tp_version},
    }


def settings_hash(data: Any) -> str:
    return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def small_deit(image_size: int, num_labels: int, width: int, depth: int, heads: int, patch: int) -> torch.nn.Module:
    """A DeiT-style classifier smaller than the `demo-vit` preset (which takes ~3 s per step of 128
    images on 2 cores): cls + distillation tokens, MLP 4x wide."""
    import transformers as tf

    config = tf.DeiTConfig(image_size=image_size, patch_size=patch, num_channels=3, hidden_size=width,
                           num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=4 * width,
                           num_labels=num_labels)
    return tf.DeiTForImageClassification(config)


def make_bench(key: str, spec: dict[str, Any]) -> Bench:
    cfg = load_run_config(spec["yaml"], [*spec["overrides"], f"train.max_steps_per_epoch={spec['chunk']}"])
    torch.manual_seed(0)  # the dense model's initial weights
    task = make_task(cfg)
    if spec.get("deit"):  # swap in the smaller DeiT; transforms already follow data.image_size
        task.built.model = small_deit(cfg.data.image_size, len(task.classes), **spec["deit"])
    trainer = Trainer(cfg, task, Dist())
    if trainer.steps_per_epoch != spec["chunk"]:
        raise ValueError(f"{key}: the training set gives only {trainer.steps_per_epoch} batches per pass, "
                         f"fewer than the chunk of {spec['chunk']} steps")
    return Bench(key=key, cfg=cfg, task=task, trainer=trainer, steps=spec["steps"], search_steps=spec["search_steps"],
                 chunk=spec["chunk"], taylor_batches=spec["taylor_batches"],
                 extra={"tp_bisection": spec["tp_bisection"], "retrain_warmup": spec["retrain_warmup"],
                        "latency_batch": spec.get("latency_batch", 32), "distill": spec.get("distill", {})})


def dense_settings(spec: dict[str, Any]) -> dict[str, int]:
    return {k: spec[k] for k in ("dense_max_steps", "dense_eval_every", "dense_patience")}


def dense_cache_key(bench: Bench, spec: dict[str, Any]) -> str:
    """What the dense model depends on: model, data, training settings, seed and the stopping rule
    (not the upop / distill / log sections, so adding a method never retrains it)."""
    cfg = bench.cfg.to_dict()
    later = ("lr", "search_lr", "search_epochs", "retrain_epochs", "dense_epochs")  # phases after the dense one
    train = {k: v for k, v in cfg.get("train", {}).items() if k not in later}
    return settings_hash({"config": {**{k: cfg.get(k) for k in ("task", "model", "data")}, "train": train},
                          "deit": spec.get("deit"), **dense_settings(spec)})


def cache_folder(bench: Bench, spec: dict[str, Any], cache: Path) -> Path:
    return cache / f"{bench.key}-{dense_cache_key(bench, spec)}"


def dense_model(bench: Bench, spec: dict[str, Any], cache: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train the dense model to convergence once (seed 0) and cache it as safetensors; reload it when cached.

    Convergence: cosine schedule over `dense_max_steps`, the validation metric measured every
    `dense_eval_every` steps, training stops when it has not improved for `dense_patience`
    evaluations in a row (or at the cap), and the best weights are kept. The curve, the step
    of the best weights and why it stopped are recorded (dense.json)."""
    folder = cache_folder(bench, spec, cache)
    if (folder / "dense.json").is_file():
        log(f"{bench.key}: dense model from the cache {folder}")
        model = upop.from_pretrained(folder)
        return model, {**json.loads((folder / "dense.json").read_text()), "cached": True}
    settings = dense_settings(spec)
    cap, every, patience = settings["dense_max_steps"], settings["dense_eval_every"], settings["dense_patience"]
    if cap % bench.chunk or every % bench.chunk:
        raise ValueError(f"{bench.key}: dense_max_steps and dense_eval_every must be multiples of {bench.chunk}")
    bench.set_seed(0)
    model = bench.task.model
    t = bench.cfg.train
    log(f"{bench.key}: training the dense model until {bench.task.metric} on val stops improving "
        f"(every {every} steps, patience {patience}, at most {cap} steps)")
    start = time.time()
    wrapped = bench.trainer.wrap(model)
    optimizer = bench.trainer.optimizer(model, t.dense_lr)
    lr_at = cosine(t.dense_lr, t.min_lr, cap, t.warmup_steps)
    loss, curve, best, best_step, best_state, stale, stopped = float("nan"), [], float("-inf"), 0, None, 0, "cap"
    for epoch in range(cap // bench.chunk):
        loss = bench.trainer.epoch(wrapped, optimizer, phase="dense", epoch=epoch, lr_at=lr_at)
        step = (epoch + 1) * bench.chunk
        if step % every:
            continue
        value = float(bench.task.evaluate(model, "val", torch.device("cpu"))[bench.task.metric])
        curve.append({"step": step, "val": value, "loss": loss, "wall_s": time.time() - start})
        log(f"{bench.key}: dense step {step}: val {bench.task.metric} {value:.2f} (loss {loss:.4f})")
        if value > best:
            best, best_step, stale = value, step, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= patience:
                stopped = "patience"
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    steps_run = curve[-1]["step"] if curve else cap
    info = {"steps": best_step, "steps_run": steps_run, "stopped": stopped, "best_val": best, "curve": curve,
            "last_loss": loss, "wall_s": time.time() - start, "seed": 0, **settings}
    upop.save_pretrained(model, folder)
    write_json(folder / "dense.json", info)
    return model, {**info, "cached": False}


def evaluate(bench: Bench, model: torch.nn.Module) -> dict[str, float]:
    return bench.task.evaluate(model, "test", torch.device("cpu"))


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread over seeds per (method, target)."""
    out = []
    for method in METHODS:
        for target in sorted({r["target"] for r in rows}):
            sel = [r for r in rows if r["method"] == method and r["target"] == target]
            if not sel:
                continue
            metrics = [r["metric"] for r in sel]
            out.append({
                "method": method, "label": METHODS[method][0], "target": target, "seeds": [r["seed"] for r in sel],
                "metric_mean": statistics.mean(metrics),
                "metric_std": statistics.stdev(metrics) if len(metrics) > 1 else 0.0,
                "metric_min": min(metrics), "metric_max": max(metrics),
                "params": statistics.mean(r["params"] for r in sel),
                "flops": statistics.mean(r["flops"] for r in sel),
                "achieved": statistics.mean(r["achieved"] for r in sel),
                "latency_ms": {k: statistics.median(r["latency_ms"][k] for r in sel) for k in sel[0]["latency_ms"]},
                "train_flops": statistics.mean(r.get("train_flops", 0.0) for r in sel),
                "steps": statistics.mean(r.get("steps", 0) for r in sel),
            })
    return out


def planned_rows(spec: dict[str, Any]) -> list[tuple[str, float]]:
    """(method, target) in the order they run: spec["rows"] when given (the most telling rows first,
    so a run stopped for time keeps them), else every method at every target minus spec["skip"]."""
    if spec.get("rows"):
        return [(m, t) for m, t in spec["rows"]]
    return [(m, t) for t in spec.get("targets", TARGETS) for m in spec.get("methods", list(METHODS))
            if [m, t] not in spec.get("skip", [])]


def run_task(key: str, spec: dict[str, Any], seeds: list[int], out: Path, cache: Path, env: dict,
             mode: str, fresh: bool) -> dict[str, Any]:
    started = time.time()
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in spec.items()}
    path = out / f"{key}.json"
    shash = settings_hash({k: v for k, v in settings.items() if k not in ROW_INDEPENDENT})
    result: dict[str, Any] | None = None
    if path.is_file() and not fresh:
        previous = json.loads(path.read_text())
        if previous.get("settings_hash") == shash:  # rows already there are kept, missing ones run
            result = previous
            result.update(settings=settings, seeds=sorted({*result["seeds"], *seeds}), complete=False,
                          methods={**result["methods"], **{m: METHODS[m][0] for m in spec.get("methods", METHODS)}})
            log(f"{key}: continuing {path} ({len(result['rows'])} rows done)")
    bench = make_bench(key, spec)
    if result is None:
        result = {"task": key, "mode": mode, "metric": bench.task.metric, "settings": settings,
                  "settings_hash": shash, "seeds": seeds, "targets": list(spec.get("targets", TARGETS)),
                  "methods": {m: METHODS[m][0] for m in spec.get("methods", list(METHODS))},
                  "run_config": bench.cfg.to_dict(), **env, "rows": [], "speed": {}, "wall_s": {},
                  "complete": False}
    wall = result["wall_s"]

    def save() -> None:
        result["summary"] = summarise(result["rows"])
        write_json(path, result)

    phase = time.time()
    dense, dense_info = dense_model(bench, spec, cache)
    wall["dense_train_or_load"] = wall.get("dense_train_or_load", 0) + time.time() - phase
    if "dense" not in result:
        phase = time.time()
        metrics = evaluate(bench, dense)
        profile = speed_profile(bench, dense, spec["batches"], spec["repeats"], onnx="dense" in spec["onnx"],
                                onnx_batches=spec["onnx_batches"])
        result["dense"] = {"metric": metrics[bench.task.metric], "metrics": metrics, "params": profile["params"],
                           "flops": profile["flops"], "latency_ms": profile["torch_ms"], "train": dense_info,
                           "prunable_params": sum(s.unit_params("head_dim") * s.num_units("head_dim")
                                                  for s in upop.discover(dense))}
        result["speed"]["dense"] = profile
        wall["dense_measure"] = time.time() - phase
        log(f"{key}: dense {bench.task.metric} {result['dense']['metric']:.2f}, "
            f"{profile['params'] / 1e6:.2f}M params, {profile['flops'] / 1e9:.3f} GFLOPs")
        save()
    if "search_cost" not in result:
        phase = time.time()
        result["search_cost"] = search_step_cost(bench, dense, spec["search_cost_steps"])
        wall["search_cost"] = time.time() - phase
        log(f"{key}: search step / plain step = {result['search_cost']['ratio_median']:.3f} (median)")
        save()

    done = {(r["method"], r["target"], r["seed"]) for r in result["rows"]}
    for seed in seeds:
        for method, target in planned_rows(spec):
            label, fn = METHODS[method]
            if (method, target, seed) in done:
                continue
            if method in EQUAL_COMPUTE:  # UPop's training compute at this target and seed
                upop_rows = [r for r in result["rows"] if r["method"] == "upop" and r["target"] == target
                             and r["seed"] == seed]
                if not upop_rows:
                    log(f"{key}: {method} at {target}, seed {seed} skipped: no upop row to match")
                    continue
                bench.extra["compute_goal"] = upop_rows[0]["train_flops"]
            log(f"{key}: {method} at target {target}, seed {seed}")
            bench.set_seed(seed)
            phase = time.time()
            model, info = fn(bench, dense, target)
            train_s = time.time() - phase
            metrics = evaluate(bench, model)
            onnx = method in spec["onnx"] and seed == seeds[0]
            profile = speed_profile(bench, model, spec["batches"], spec["repeats"], onnx=onnx,
                                    onnx_batches=spec["onnx_batches"])
            row = {"method": method, "label": label, "target": target, "seed": seed,
                   "metric": metrics[bench.task.metric], "metrics": metrics, "params": profile["params"],
                   "flops": profile["flops"], "latency_ms": profile["torch_ms"],
                   "achieved": info["achieved"], "info": info, "wall_s": time.time() - phase,
                   "train_wall_s": train_s, "train_flops": train_flops(info),
                   "steps": sum(info.get(k, {}).get("steps", 0) for k in ("search", "retrain"))}
            if onnx:
                result["speed"][f"{method}@{target}"] = profile
            if seed == seeds[0] and method in spec.get("breakdown", ()):  # where the time goes, part by part
                result.setdefault("breakdown", {})[f"{method}@{target}"] = {
                    f"batch{b}": compare_breakdown(dense, model, bench.task.example_inputs(b),
                                                   repeats=spec["repeats"])
                    for b in spec["batches"]}
            result["rows"].append(row)
            wall[f"{method}@{target}"] = wall.get(f"{method}@{target}", 0) + row["wall_s"]
            log(f"{key}: {method} @ {target} seed {seed}: {bench.task.metric} {row['metric']:.2f}, "
                f"{row['params'] / 1e6:.2f}M params, achieved {row['achieved']:.3f}, "
                f"{row['train_flops'] / 1e12:.2f} TFLOP, {row['wall_s']:.0f}s")
            save()
            del model
    if "memory" not in result and spec.get("memory"):
        phase = time.time()
        result["memory"] = search_memory(key, cache_folder(bench, spec, cache), mode_set=mode)
        wall["memory"] = time.time() - phase
        save()
    wall["total_this_process"] = time.time() - started
    result["complete"] = True
    save()
    return result


def merged_meta(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """One run.json per results folder: a run of other tasks in the same mode (e.g. two processes,
    one per core) adds its command, tasks and wall times to what is there."""
    if not path.is_file():
        return meta
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return meta
    if old.get("mode") != meta["mode"] or old.get("harness") != HARNESS:  # another harness's run: replaced
        return meta
    commands = [c for c in old.get("command", "").split(" ; ") if c and c != meta["command"]]
    tasks = [t for t in old.get("tasks", []) if t not in meta["tasks"]] + meta["tasks"]
    wall = {k: v for k, v in old.get("wall_s", {}).items() if k != "total"}
    for k, v in meta["wall_s"].items():  # a task run again (more seeds) adds its time
        if k != "total":
            wall[k] = wall.get(k, 0) + v
    wall["total"] = old.get("wall_s", {}).get("total", 0) + meta["wall_s"]["total"]  # process time, summed
    return {**meta, "command": " ; ".join([*commands, meta["command"]]), "tasks": tasks, "wall_s": wall,
            "started": min(old.get("started", meta["started"]), meta["started"]),
            "finished": max(old.get("finished", meta["finished"]), meta["finished"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="short run (< 10 minutes on 2 CPU cores)")
    size.add_argument("--tiny", action="store_true", help="tiny models and a handful of steps (the test)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per method (default: 2 full, 1 quick/tiny)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default benchmarks/results, or benchmarks/results/<quick|tiny>)")
    parser.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / "cache")
    parser.add_argument("--docs", type=Path, default=None,
                        help="the report render writes (default docs/BENCHMARKS.md; <out>/BENCHMARKS.md for --tiny)")
    parser.add_argument("--tasks", default="retrieval,classification,text")
    parser.add_argument("--fresh", action="store_true", help="ignore results of an earlier run with the same settings")
    parser.add_argument("--methods", default=None,
                        help="run only these methods' rows (comma-separated), e.g. another seed of two of them")
    parser.add_argument("--targets", default=None, help="run only the rows at these targets (comma-separated)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch (and ONNX Runtime) threads for training and timing (default: all cores). "
                             "On a machine shared with other jobs 1 avoids OpenMP oversubscription")
    args = parser.parse_args(argv)
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    if args.out is None:
        args.out = ROOT / "benchmarks" / "results" / ("" if mode == "full" else mode)
    if args.docs is None:
        args.docs = args.out / "BENCHMARKS.md" if mode == "tiny" else ROOT / "docs" / "BENCHMARKS.md"
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment()
    started = time.time()
    run_meta_path = args.out / "run.json"
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for key in tasks:
        if key not in MODES[mode]:
            parser.error(f"unknown task {key!r}; tasks: {', '.join(MODES[mode])}")
    meta = {"harness": HARNESS,
            "mode": mode, "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
            "tasks": tasks, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)), **env,
            "wall_s": {}}
    only = [m.strip() for m in args.methods.split(",")] if args.methods else None
    if only and (unknown := [m for m in only if m not in METHODS]):
        parser.error(f"unknown method(s) {unknown}; methods: {', '.join(METHODS)}")
    for key in tasks:
        spec = MODES[mode][key]
        if only or args.targets:
            targets = [float(t) for t in args.targets.split(",")] if args.targets else None
            spec = {**spec, "rows": [[m, t] for m, t in planned_rows(spec)
                                     if (not only or m in only) and (not targets or t in targets)]}
        seeds = list(range(args.seeds if args.seeds is not None else spec["seeds"]))
        task_start = time.time()
        run_task(key, spec, seeds, args.out, args.cache, env, mode, args.fresh)
        meta["wall_s"][key] = time.time() - task_start
    meta["wall_s"]["total"] = time.time() - started
    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_json(run_meta_path, merged_meta(run_meta_path, meta))
    defaults = render.default_folders(ROOT)
    folders = defaults if args.out.resolve() in [f.resolve() for f in defaults] else [args.out]
    render.render(folders, args.docs, follow_up=render.STEP_BUDGET if folders == defaults else None)
    log(f"done in {meta['wall_s']['total'] / 60:.1f} min; results in {args.out}, report in {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
