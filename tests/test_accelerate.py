"""`accelerate launch -m upop.cli compress ...` with 2 CPU processes works as torchrun does: both ranks
take the same pruning decision and the run finishes.

accelerate starts several processes through torch.distributed.run (WORLD_SIZE / RANK / LOCAL_RANK,
what upop.training.init_distributed reads) with `--multi_gpu`; with no GPU visible
(CUDA_VISIBLE_DEVICES="") they are CPU processes on gloo. (`--cpu --num_processes N` is accelerate's
MPI path: it starts one process unless mpirun launches the others.) Nothing is read from the user's
accelerate config or Hugging Face home."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image, ImageDraw

pytest.importorskip("accelerate")

COLORS = ["red", "green", "blue"]


def _imagefolder(root: Path) -> None:
    for split, n in (("train", 6), ("test", 2)):
        for color in COLORS:
            for i in range(n):
                image = Image.new("RGB", (32, 32), "white")
                draw = ImageDraw.Draw(image)
                (draw.ellipse if i % 2 else draw.rectangle)((6, 6, 26, 26), fill=color)
                path = root / split / color / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                image.save(path)


def test_accelerate_launch_two_cpu_processes_agree(tmp_path):
    _imagefolder(tmp_path / "data")
    out = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "task": "classification", "output_dir": str(out), "model": {"preset": "tiny-vit"},
        "data": {"format": "imagefolder", "root": str(tmp_path / "data"), "train": "train", "test": "test",
                 "val": "test", "image_size": 32},
        "upop": {"target": 0.5, "interval": 1, "granularity": "head"},
        "train": {"batch_size": 3, "eval_batch_size": 8, "dense_epochs": 0, "search_epochs": 1,
                  "retrain_epochs": 1, "max_steps_per_epoch": 2},
        "eval": {"skip_latency": True},
    }))
    with socket.socket() as sock:  # accelerate's default port 29500 may be taken by another run
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf"), "ACCELERATE_CONFIG_FILE": str(tmp_path / "no_accelerate_config.yaml")}
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(port), "-m", "upop.cli", "compress", "--config", str(config)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    plans = [json.loads((out / f"plan.rank{r}.json").read_text())["structures"] for r in (0, 1)]
    assert plans[0] == plans[1]
    assert json.loads((out / "plan.json").read_text())["structures"] == plans[0]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["compressed"]["params"] < metrics["dense"]["params"]
