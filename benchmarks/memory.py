"""Memory of the search: peak memory of training steps with the UPop search attached against plain
training steps, each in a fresh process (peak RSS is per process and never goes down).

    python -m benchmarks.memory --task retrieval|classification --mode plain|search [--steps 3]
        [--model-folder DIR] [--mode-set full|quick|tiny] [--device cpu|cuda]

builds the benchmark's task (benchmarks.run.make_bench with MODES[mode-set][task]), loads the dense
model (upop.from_pretrained(DIR), else the task's freshly initialised model), takes one training
batch, builds the optimizer (and, for --mode search, attaches upop.UPopSearch at target 0.5), then runs
--steps training steps on that batch: forward, loss (+ the search's sparsity loss), backward,
optimizer step, search.step(). It prints one JSON line: peak RSS (bytes), RSS right before the first
step, their difference (growth), the step times, the bytes autograd saved for backward in the first
step's forward (parameters aside; exact, unlike RSS) and, on CUDA, the peak and base allocated memory.
Right before the steps the kernel's peak-RSS mark is reset (`5` into /proc/self/clear_refs, Linux),
so the peak is that of the steps, not of building the data set (which can be higher); peak_reset
says whether that worked (if not, peak is the whole process's and peak_before_steps flags a build
peak that masks the steps). `search_memory` runs both modes twice, alternating, and compares them.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODES_RUN = ("plain", "search")


def rss_bytes() -> int:
    """Resident set size now (Linux /proc/self/statm: pages)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark of this process (ru_maxrss and VmHWM); False where not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def measure(task: str, mode: str, steps: int = 3, model_folder: Path | None = None, mode_set: str = "full",
            device: str = "cpu") -> dict[str, Any]:
    """Build, then run `steps` training steps on one batch in this process; returns the numbers."""
    import upop

    from .run import MODES, make_bench

    if mode not in MODES_RUN:
        raise ValueError(f"--mode must be one of {MODES_RUN}, got {mode!r}")
    if mode_set not in MODES:
        raise ValueError(f"--mode-set must be one of {sorted(MODES)}, got {mode_set!r}")
    if task not in MODES[mode_set]:
        raise ValueError(f"--task must be one of {sorted(MODES[mode_set])} (benchmarks.run.MODES[{mode_set!r}]), "
                         f"got {task!r}")
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if model_folder is not None and not Path(model_folder).is_dir():
        raise FileNotFoundError(f"--model-folder {model_folder}: no such folder")
    dev = torch.device(device)
    bench = make_bench(task, MODES[mode_set][task])
    model = upop.from_pretrained(model_folder) if model_folder is not None else bench.task.model
    model.to(dev).train()
    batch = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in next(iter(bench.trainer.loader)).items()}
    t = bench.cfg.train
    optimizer = bench.trainer.optimizer(model, t.search_lr)
    search = None
    if mode == "search":  # the benchmark's search settings, at target 0.5, ending with these steps
        settings = {k: v for k, v in bench.cfg.upop.items() if k not in ("target", "total_steps")}
        search = upop.UPopSearch(model, upop.UPopConfig(**{**settings, "target": 0.5, "total_steps": steps}))
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    gc.collect()
    peak_build = peak_rss_bytes()
    reset = reset_peak_rss()
    base, peak_before = rss_bytes(), peak_rss_bytes()
    cuda_base = torch.cuda.memory_allocated(dev) if cuda else None
    times, losses = [], []
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:  # what autograd keeps for backward, parameters aside
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    for i in range(steps):
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if i == 0 else contextlib.nullcontext():
            loss = bench.task.loss(model, batch)
            total = loss + search.sparsity_loss() if search is not None else loss
        total.backward()
        optimizer.step()
        bench.task.after_optimizer_step(model)
        optimizer.zero_grad(set_to_none=True)
        if search is not None:
            search.step()
        if cuda:
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    peak = peak_rss_bytes()
    out = {
        "task": task, "mode": mode, "mode_set": mode_set, "steps": steps, "device": str(dev),
        "model": str(model_folder) if model_folder is not None else "fresh", "batch_size": t.batch_size,
        "threads": torch.get_num_threads(), "params": upop.count_params(model),
        "peak_rss": peak, "base_rss": base, "growth": peak - base, "peak_reset": reset,
        "peak_rss_build": peak_build, "peak_rss_before_steps": peak_before,
        # the peak was reached before the steps (building, when the reset failed): growth says nothing then
        "peak_before_steps": peak_before >= peak, "step_s": times, "losses": losses,
        # bytes of the tensors (not parameters) autograd saved in the first step's forward: allocator-independent
        "saved_for_backward": sum(saved.values()),
    }
    if cuda:
        out["cuda_peak_allocated"] = torch.cuda.max_memory_allocated(dev)
        out["cuda_base_allocated"] = cuda_base
    return out


def _run_child(task: str, mode: str, steps: int, model_folder: Path | None, mode_set: str, device: str,
               timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.memory", "--task", task, "--mode", mode, "--steps", str(steps),
           "--mode-set", mode_set, "--device", device]
    if model_folder is not None:
        cmd += ["--model-folder", str(model_folder)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"benchmarks.memory --task {task} --mode {mode} failed (exit {proc.returncode}): {tail}")
    return json.loads(lines[-1])


def search_memory(task: str, model_folder: Path | None, steps: int = 3, *, mode_set: str = "full",
                  device: str = "cpu", runs: int = 2, timeout: float = 1800.0) -> dict[str, Any]:
    """Run plain and search `runs` times each in fresh processes, alternating, and keep the smaller
    peak of each mode (less of whatever else the allocator did by chance). Returns both results,
    peak_ratio = search_peak / plain_peak and growth_ratio = (search_peak - base) / (plain_peak - base)
    with each run's own base (RSS before its first step), saved_ratio (bytes saved for backward, search /
    plain: exact); on CUDA also cuda_peak_ratio."""
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES_RUN}
    for i in range(runs):
        for mode in MODES_RUN if i % 2 == 0 else MODES_RUN[::-1]:
            results[mode].append(_run_child(task, mode, steps, model_folder, mode_set, device, timeout))
    best = {m: min(rs, key=lambda r: r["peak_rss"]) for m, rs in results.items()}
    plain, search = best["plain"], best["search"]
    out = {
        "task": task, "steps": steps, "mode_set": mode_set, "runs": runs, "plain": plain, "search": search,
        "all_peaks": {m: [r["peak_rss"] for r in rs] for m, rs in results.items()},
        "peak_ratio": search["peak_rss"] / plain["peak_rss"],
        "growth_ratio": search["growth"] / plain["growth"] if plain["growth"] > 0 else None,
        "search_over_plain_bytes": search["peak_rss"] - plain["peak_rss"],
        "saved_ratio": search["saved_for_backward"] / plain["saved_for_backward"],
    }
    if "cuda_peak_allocated" in plain:
        out["cuda_peak_ratio"] = search["cuda_peak_allocated"] / plain["cuda_peak_allocated"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True)
    parser.add_argument("--mode", choices=MODES_RUN, required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--model-folder", type=Path, default=None)
    parser.add_argument("--mode-set", default="full", help="benchmarks.run.MODES key (full, quick, tiny)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    try:
        result = measure(args.task, args.mode, args.steps, args.model_folder, args.mode_set, args.device)
    except (ValueError, FileNotFoundError) as exc:
        print(f"benchmarks.memory: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
