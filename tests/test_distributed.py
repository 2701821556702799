"""Two processes (gloo): scores are averaged across ranks before each update, so every rank
takes the same decision, and that decision is the one made on the averaged scores."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import upop


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).parent))
        from families import FAMILY_BY_NAME

        fam = FAMILY_BY_NAME["vit"]
        torch.manual_seed(0)  # same weights on every rank
        model = fam.build().eval()
        inputs = fam.inputs(torch.Generator().manual_seed(100 + rank))  # different data per rank
        search = upop.UPopSearch(model, upop.UPopConfig(target=0.5, total_steps=6, interval=2))
        local = {n: torch.zeros_like(s) for n, s in search.scores.items()}
        for _ in range(6):
            fam.probe(model(**inputs)).pow(2).mean().backward()
            for n, g in search.masks.grads().items():
                local[n] += g.double()
            search.step()
        out[rank] = {
            "plan": search.plan().to_dict()["structures"],
            "local": local,
            "reduced": search.reduced_scores(),
        }
    finally:
        dist.destroy_process_group()


def test_two_ranks_take_the_same_decision():
    world = 2
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(world, _free_port(), out), nprocs=world, join=True)
        out = dict(out)
    assert out[0]["plan"] == out[1]["plan"]
    some = next(iter(out[0]["local"]))
    assert not torch.allclose(out[0]["local"][some], out[1]["local"][some]), "ranks saw different data"
    for n in out[0]["reduced"]:
        mean = (out[0]["local"][n] + out[1]["local"][n]) / 2
        assert torch.allclose(out[0]["reduced"][n], mean)
        assert torch.equal(out[0]["reduced"][n], out[1]["reduced"][n])
