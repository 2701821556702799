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
from .methods import METHODS, Bench  # noqa: E402
from .speed import search_step_cost, speed_profile  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEMO_YAML = Path(upop.__file__).parent / "configs" / "demo.yaml"
FASHION_YAML = ROOT / "examples" / "fashion_mnist.yaml"
TARGETS = (0.5, 0.75)
SPEED_METHODS = ("upop", "torch_pruning")  # compressed models also timed in ONNX Runtime
# Fashion-MNIST model: DeiT-style, 28x28 images in 7x7 patches (16 patches + cls + distillation token)
SMALL_DEIT = dict(width=128, depth=4, heads=4, patch=7)

# Per mode and task: the run-config overrides and the step budget. `steps` is what every method
# trains after the dense model (search + retrain); all phase lengths are multiples of `chunk`.
MODES: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "retrieval": dict(yaml=DEMO_YAML, overrides=[
            "model.preset=tiny-dual", "data.image_size=32", "data.max_tokens=12", "data.limit_train=96",
            "data.limit_eval=32", "train.batch_size=16", "train.eval_batch_size=64", "train.warmup_steps=1",
            "upop.interval=1"], dense_steps=4, steps=4, search_steps=2, chunk=2, seeds=1, repeats=2,
            batches=[1, 32], onnx=["dense"], onnx_batches=[1], search_cost_steps=2, taylor_batches=1,
            tp_bisection=6, retrain_warmup=1),
        "classification": dict(yaml=FASHION_YAML, overrides=[
            "model.preset=tiny-vit", "data.limit_train=128", "data.limit_eval=64", "train.batch_size=16",
            "train.eval_batch_size=64", "train.warmup_steps=1", "upop.interval=1"],
            dense_steps=4, steps=4, search_steps=2, chunk=2, seeds=1, repeats=2, batches=[1, 32],
            onnx=[], onnx_batches=[1], search_cost_steps=2, taylor_batches=1, tp_bisection=6, retrain_warmup=1),
    },
    "quick": {
        "retrieval": dict(yaml=DEMO_YAML, overrides=["train.warmup_steps=10", "upop.interval=5"],
                          dense_steps=40, steps=20, search_steps=10, chunk=10, seeds=1, repeats=5,
                          batches=[1, 32], onnx=["dense", *SPEED_METHODS], onnx_batches=[1, 32],
                          search_cost_steps=6, taylor_batches=2, tp_bisection=8, retrain_warmup=2),
        "classification": dict(yaml=FASHION_YAML, deit=SMALL_DEIT, overrides=[
            "model.preset=tiny-deit", "data.image_size=28", "data.limit_train=6000", "data.limit_eval=2000",
            "train.warmup_steps=10", "upop.interval=5"],
            dense_steps=60, steps=20, search_steps=10, chunk=10, seeds=1, repeats=5, batches=[1, 32],
            onnx=["dense", *SPEED_METHODS], onnx_batches=[1, 32], search_cost_steps=6, taylor_batches=2,
            tp_bisection=8, retrain_warmup=2),
    },
    "full": {
        "retrieval": dict(yaml=DEMO_YAML, overrides=["upop.interval=5"],
                          dense_steps=180, steps=60, search_steps=30, chunk=10, seeds=2, repeats=10,
                          batches=[1, 32], onnx=["dense", *SPEED_METHODS], onnx_batches=[1, 32],
                          search_cost_steps=20, taylor_batches=4, tp_bisection=10, retrain_warmup=6),
        "classification": dict(yaml=FASHION_YAML, deit=SMALL_DEIT, overrides=[
            "model.preset=tiny-deit", "data.image_size=28", "data.limit_train=null", "data.limit_eval=5000",
            "upop.interval=10"],
            dense_steps=600, steps=200, search_steps=100, chunk=20, seeds=2, repeats=10, batches=[1, 32],
            onnx=["dense", *SPEED_METHODS], onnx_batches=[1, 32], search_cost_steps=20, taylor_batches=4,
            tp_bisection=10, retrain_warmup=10),
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
                 extra={"tp_bisection": spec["tp_bisection"], "retrain_warmup": spec["retrain_warmup"]})


def dense_model(bench: Bench, spec: dict[str, Any], cache: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train the dense model once (seed 0) and cache it as safetensors; reload it when cached."""
    key = settings_hash({"config": bench.cfg.to_dict(), "dense_steps": spec["dense_steps"]})
    folder = cache / f"{bench.key}-{key}"
    if (folder / "dense.json").is_file():
        log(f"{bench.key}: dense model from the cache {folder}")
        model = upop.from_pretrained(folder)
        return model, {**json.loads((folder / "dense.json").read_text()), "cached": True}
    bench.set_seed(0)
    model = bench.task.model
    t = bench.cfg.train
    log(f"{bench.key}: training the dense model for {spec['dense_steps']} steps")
    start = time.time()
    wrapped = bench.trainer.wrap(model)
    optimizer = bench.trainer.optimizer(model, t.dense_lr)
    lr_at = cosine(t.dense_lr, t.min_lr, spec["dense_steps"], t.warmup_steps)
    loss = float("nan")
    for epoch in range(spec["dense_steps"] // bench.chunk):
        loss = bench.trainer.epoch(wrapped, optimizer, phase="dense", epoch=epoch, lr_at=lr_at)
    info = {"steps": spec["dense_steps"], "last_loss": loss, "wall_s": time.time() - start, "seed": 0}
    upop.save_pretrained(model, folder)
    write_json(folder / "dense.json", info)
    return model, {**info, "cached": False}


def evaluate(bench: Bench, model: torch.nn.Module) -> dict[str, float]:
    return bench.task.evaluate(model, "test", torch.device("cpu"))


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and spread over seeds per (method, target)."""
    out = []
    for method in METHODS:
        for target in TARGETS:
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
            })
    return out


def run_task(key: str, spec: dict[str, Any], seeds: list[int], out: Path, cache: Path, env: dict,
             mode: str, fresh: bool) -> dict[str, Any]:
    started = time.time()
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in spec.items()}
    path = out / f"{key}.json"
    shash = settings_hash({"settings": settings, "seeds": seeds})
    result: dict[str, Any] | None = None
    if path.is_file() and not fresh:
        previous = json.loads(path.read_text())
        if previous.get("settings_hash") == shash and previous.get("complete") is not True:
            result = previous
            log(f"{key}: continuing {path} ({len(result['rows'])} rows done)")
        elif previous.get("settings_hash") == shash:
            log(f"{key}: {path} is complete for these settings; rerun with --fresh to redo it")
            return previous
    bench = make_bench(key, spec)
    if result is None:
        result = {"task": key, "mode": mode, "metric": bench.task.metric, "settings": settings,
                  "settings_hash": shash, "seeds": seeds, "targets": list(TARGETS),
                  "methods": {m: label for m, (label, _) in METHODS.items()},
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
        for target in TARGETS:
            for method, (label, fn) in METHODS.items():
                if (method, target, seed) in done:
                    continue
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
                       "train_wall_s": train_s}
                if onnx:
                    result["speed"][f"{method}@{target}"] = profile
                result["rows"].append(row)
                wall[f"{method}@{target}"] = wall.get(f"{method}@{target}", 0) + row["wall_s"]
                log(f"{key}: {method} @ {target} seed {seed}: {bench.task.metric} {row['metric']:.2f}, "
                    f"{row['params'] / 1e6:.2f}M params, achieved {row['achieved']:.3f}, {row['wall_s']:.0f}s")
                save()
                del model
    wall["total_this_process"] = time.time() - started
    result["complete"] = True
    save()
    return result


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
    parser.add_argument("--tasks", default="retrieval,classification")
    parser.add_argument("--fresh", action="store_true", help="ignore results of an earlier run with the same settings")
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
    meta = {"mode": mode, "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
            "tasks": tasks, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)), **env,
            "wall_s": {}}
    for key in tasks:
        spec = MODES[mode][key]
        seeds = list(range(args.seeds if args.seeds is not None else spec["seeds"]))
        task_start = time.time()
        run_task(key, spec, seeds, args.out, args.cache, env, mode, args.fresh)
        meta["wall_s"][key] = time.time() - task_start
    meta["wall_s"]["total"] = time.time() - started
    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_json(run_meta_path, meta)
    defaults = render.default_folders(ROOT)
    folders = defaults if args.out.resolve() in [f.resolve() for f in defaults] else [args.out]
    render.render(folders, args.docs, follow_up=render.STEP_BUDGET if folders == defaults else None)
    log(f"done in {meta['wall_s']['total'] / 60:.1f} min; results in {args.out}, report in {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
