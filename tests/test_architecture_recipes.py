"""The recipes of docs/architecture.md, checked: a toy model family and a toy task are added through
the public registries alone (one new module each plus its registration line), and they work:
the family's compressed model computes what its masked model computed, and `upop compress` runs the
task end to end."""

from __future__ import annotations

import json
import types

import pytest
import torch
import transformers as tf
import yaml
from torch import nn

from upop import UPopConfig, UPopSearch
from upop.adapters import FAMILIES, discover
from upop.adapters._shape import layer_index, mlp_structure, set_head_attributes
from upop.structures import Structure


# ---- a toy model family --------------------------------------------------------------------------
class ToyAttention(nn.Module):
    def __init__(self, dim: int = 24, heads: int = 3) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim ** -0.5  # fixed at construction: the temperature survives slicing
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        split = lambda t: t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        attn = (q @ k.transpose(-1, -2) * self.scale).softmax(-1)
        return self.out((attn @ v).transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class ToyMLP(nn.Module):
    def __init__(self, dim: int = 24, hidden: int = 40) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.nn.functional.gelu(self.up(x)))


class ToyNet(nn.Module):
    def __init__(self, dim: int = 24, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Linear(5, dim)
        self.blocks = nn.ModuleList(nn.ModuleDict({"attn": ToyAttention(dim), "mlp": ToyMLP(dim)})
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = h + block["attn"](h)
            h = h + block["mlp"](h)
        return self.norm(h)


def _toy_find(model: nn.Module, path: str, module: nn.Module) -> list[Structure]:
    """The whole adapter of the toy family: what docs/architecture.md asks a new family to write."""
    if isinstance(module, ToyAttention):
        return [Structure(name=path, kind="attention", modality="vision", layer=layer_index(path), family="toy",
                          num_heads=module.num_heads, head_dim=module.head_dim, q=module.q, k=module.k,
                          v=module.v, out=module.out,
                          set_shape=lambda h, d, m=module: set_head_attributes(m, h, d))]
    if isinstance(module, ToyMLP):
        return [mlp_structure(path, module.up, module.down, "toy", "vision")]
    return []


@pytest.fixture
def toy_family():
    adapter = types.SimpleNamespace(find=_toy_find)
    FAMILIES.add("toy", adapter)
    try:
        yield adapter
    finally:
        FAMILIES.remove("toy")


@pytest.mark.parametrize("granularity", ["head_dim", "head"])
def test_a_toy_family_added_through_the_registry_compresses_exactly(toy_family, granularity):
    torch.manual_seed(0)
    model = ToyNet()
    assert {s.kind for s in discover(model)} == {"attention", "mlp"}
    search = UPopSearch(model, UPopConfig(target=0.5, total_steps=4, interval=1, granularity=granularity))
    x = torch.randn(4, 6, 5)
    for _ in range(4):
        model(x).pow(2).mean().backward()
        search.step()
        model.zero_grad(set_to_none=True)
    with torch.no_grad():
        masked = model(x)  # binary masks after the last step
        before = sum(p.numel() for p in model.parameters())
        search.compress()
        compressed = model(x)
    assert sum(p.numel() for p in model.parameters()) < before
    assert torch.allclose(masked, compressed, atol=1e-5)


def test_without_the_registration_the_toy_family_is_unknown():
    from upop import UnsupportedModelError

    with pytest.raises(UnsupportedModelError):
        discover(ToyNet())


# ---- a toy task ------------------------------------------------------------------------------------
def _add_toy_task():
    """The whole toy task: a data format, a preset and the Task subclass, each with its registration."""
    from upop.data.formats import FORMATS, add_format
    from upop.models import BuiltModel
    from upop.models._common import PRESETS, add_presets
    from upop.tasks.base import TASKS, Task, evaluating, register_task

    add_format("toy_random", (), "random images, label = brighter than average")

    def build(image_size: int, num_labels: int | None) -> BuiltModel:
        config = tf.ViTConfig(image_size=image_size, patch_size=4, hidden_size=16, num_hidden_layers=2,
                              num_attention_heads=2, intermediate_size=24, num_labels=2)
        return BuiltModel(tf.ViTForImageClassification(config), None, image_size)

    add_presets({"toy-vit": ("toy", build, "tiny ViT for the toy task")})

    @register_task
    class ToyTask(Task):
        name, metric, formats = "toy", "accuracy", ("toy_random",)

        def __init__(self, cfg) -> None:
            super().__init__(cfg)
            g = torch.Generator().manual_seed(0)
            size = cfg.data.image_size
            self.images = torch.randn(48, 3, size, size, generator=g)
            self.labels = (self.images.mean((1, 2, 3)) > 0).long()
            self.build_model()

        def train_dataset(self):
            return list(zip(self.images[:32], self.labels[:32], strict=True))

        def collate(self, items):
            images, labels = zip(*items, strict=True)
            return {"pixel_values": torch.stack(images), "labels": torch.stack(labels)}

        def loss(self, model, batch):
            return nn.functional.cross_entropy(model(pixel_values=batch["pixel_values"]).logits, batch["labels"])

        @torch.no_grad()
        def evaluate(self, model, split, device):
            with evaluating(model):
                logits = model(pixel_values=self.images[32:].to(device)).logits
            return {"accuracy": 100.0 * float((logits.argmax(-1).cpu() == self.labels[32:]).float().mean())}

        def example_inputs(self, batch_size):
            size = self.cfg.data.image_size
            return {"pixel_values": torch.randn(batch_size, 3, size, size)}

    def remove():
        TASKS.remove("toy")
        PRESETS.remove("toy-vit")
        FORMATS.remove("toy_random")
    return remove


def test_a_toy_task_added_through_the_registries_runs_upop_compress(tmp_path):
    from upop import from_pretrained
    from upop.cli import main

    remove = _add_toy_task()
    try:
        config = {"task": "toy", "output_dir": str(tmp_path / "run"), "model": {"preset": "toy-vit"},
                  "data": {"format": "toy_random", "image_size": 16},
                  "train": {"batch_size": 8, "search_epochs": 1, "retrain_epochs": 1, "max_steps_per_epoch": 3},
                  "upop": {"target": 0.5, "interval": 1}, "eval": {"skip_latency": True}}
        path = tmp_path / "toy.yaml"
        path.write_text(yaml.safe_dump(config))
        assert main(["compress", "--config", str(path)]) in (0, None)
        metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
        assert metrics["task"] == "toy" and metrics["compressed"]["params"] < metrics["dense"]["params"]
        reloaded = from_pretrained(tmp_path / "run" / "model")
        assert type(reloaded).__name__ == "ViTForImageClassification"
    finally:
        remove()
