"""UPopCallback inside a real transformers Trainer."""

import torch
from torch.utils.data import Dataset

import upop
from families import FAMILY_BY_NAME
from upop.integrations import UPopCallback


class _Images(Dataset):
    def __init__(self, n: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 16, 16, generator=g)
        self.y = torch.randint(0, 5, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def test_trainer_callback_searches_and_compresses(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = FAMILY_BY_NAME["vit"].build()
    params = upop.count_params(model)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=8,
                             learning_rate=1e-3, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, dataloader_num_workers=0)
    callback = UPopCallback(upop.UPopConfig(target=0.5, interval=2))
    Trainer(model=model, args=args, train_dataset=_Images(), callbacks=[callback]).train()
    assert callback.search.finished and callback.search.config.total_steps == 8
    assert callback.plan is not None and abs(callback.plan.stats["achieved"] - 0.5) <= 0.01
    assert upop.count_params(model) == params - callback.plan.stats["pruned_params"]
    out = model(pixel_values=torch.randn(2, 3, 16, 16)).logits
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    upop.save_pretrained(model, tmp_path / "pruned")
    assert upop.count_params(upop.from_pretrained(tmp_path / "pruned")) == upop.count_params(model)
