"""Shared test routine: a short real search on a tiny model."""

from __future__ import annotations

import torch

import upop
from families import Family


def run_search(fam: Family, config: upop.UPopConfig, seed: int = 1):
    """Build the family's model, run `config.total_steps` search steps on a fixed batch."""
    torch.manual_seed(0)
    model = fam.build().eval()  # eval: no dropout, so outputs are comparable
    inputs = fam.inputs(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        dense = fam.probe(model(**inputs)).clone()
    search = upop.UPopSearch(model, config)
    for _ in range(config.total_steps):
        loss = fam.probe(model(**inputs)).pow(2).mean() + search.sparsity_loss()
        loss.backward()
        search.step()
    return model, inputs, dense, search
