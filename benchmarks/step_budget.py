"""A follow-up of the full retrieval benchmark: does UPop's deficit there come from the step budget?

Same cached dense model, data and settings as `MODES["full"]["retrieval"]`, but `--steps` steps per
method (half search, half retraining for UPop; all retraining for Torch-Pruning) instead of 60, at one
target and seed. Each (steps, target, seed) run is kept in benchmarks/results/step_budget/retrieval.json
(a rerun replaces only the rows of the methods it runs); `python -m benchmarks.render` tabulates it.

    python -m benchmarks.step_budget --steps 160 --seed 0 --threads 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from upop import count_flops, count_params
from upop.files import write_json

from .methods import METHODS
from .run import MODES, ROOT, dense_model, environment, evaluate, log, make_bench

OUT = ROOT / "benchmarks" / "results" / "step_budget" / "retrieval.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default="upop,torch_pruning")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    if unknown := [m for m in methods if m not in METHODS]:
        parser.error(f"unknown method(s) {unknown}; known: {sorted(METHODS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = dict(MODES["full"]["retrieval"])
    if args.steps % (2 * spec["chunk"]):
        parser.error(f"--steps must be a multiple of {2 * spec['chunk']}")
    spec.update(steps=args.steps, search_steps=args.steps // 2)
    bench = make_bench("retrieval", spec)
    dense, dense_info = dense_model(bench, spec, ROOT / "benchmarks" / "cache")
    dense_metric = evaluate(bench, dense)[bench.task.metric]
    data = json.loads(args.out.read_text()) if args.out.exists() else {}
    if data.get("dense", {}).get("metric") not in (None, dense_metric):
        parser.error(f"{args.out} was measured from another dense model (r_mean {data['dense']['metric']:.2f}, "
                     f"now {dense_metric:.2f}); move it away first")
    data.update(task="retrieval", what="UPop vs Torch-Pruning with more training steps than the full run",
                **environment(), dense={"metric": dense_metric, "info": dense_info})
    key = {"steps": args.steps, "search_steps": args.steps // 2, "target": args.target, "seed": args.seed}
    runs = data.setdefault("runs", [])
    run = next((r for r in runs if all(r.get(k) == v for k, v in key.items())), None)
    if run is None:
        run = {"command": f"python -m benchmarks.step_budget --steps {args.steps} --target {args.target} "
                          f"--seed {args.seed}", **key, "rows": []}
        runs.append(run)
    for method in methods:
        label, fn = METHODS[method]
        log(f"{method} at target {args.target}, {args.steps} steps, seed {args.seed}")
        bench.set_seed(args.seed)
        start = time.time()
        model, info = fn(bench, dense, args.target)
        metrics = evaluate(bench, model)
        row = {"method": method, "label": label, "metric": metrics[bench.task.metric], "metrics": metrics,
               "params": count_params(model), "flops": count_flops(model, bench.task.example_inputs(1)),
               "info": info, "wall_s": time.time() - start}
        run["rows"] = [r for r in run["rows"] if r["method"] != method] + [row]
        log(f"{method}: {bench.task.metric} {row['metric']:.2f}")
        write_json(args.out, data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
