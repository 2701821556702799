"""The user guide's four pretrained-style paths (section 8: a transformers CLIP folder, a timm model,
an open_clip model, a Trainer run with resume) run as written: every python block of a path is
executed in order, in one namespace, in an empty working folder."""

import re
from pathlib import Path

import pytest
import torch

import upop

GUIDE = Path(__file__).parents[1] / "docs" / "user_guide.md"
PATHS = ("8a", "8b", "8c", "8d")


def path_blocks(text: str) -> dict[str, list[str]]:
    """{"8a": [python blocks...], ...}: the blocks under each `### 8x.` heading, up to the next heading."""
    sections: dict[str, list[str]] = {}
    for part in re.split(r"^(?=#{2,3} )", text, flags=re.M):
        heading = re.match(r"### (8[a-z])\. ", part)
        if heading:
            sections[heading.group(1)] = re.findall(r"```python\n(.*?)```", part, flags=re.S)
    return sections


def test_the_guide_has_the_four_paths():
    sections = path_blocks(GUIDE.read_text())
    assert set(PATHS) <= set(sections)
    assert all(sections[p] for p in PATHS)


def _run(section: str, folder: Path, monkeypatch) -> dict:
    monkeypatch.chdir(folder)
    scope: dict = {"__name__": f"user_guide_{section}"}
    for i, block in enumerate(path_blocks(GUIDE.read_text())[section]):
        exec(compile(block, f"docs/user_guide.md#{section}[{i}]", "exec"), scope)
    return scope


def _achieved(model) -> float:
    return model.upop_plan.stats["achieved"]


@pytest.mark.parametrize("section", PATHS)
def test_user_guide_path_runs(section, tmp_path, monkeypatch):
    torch.manual_seed(0)
    scope = _run(section, tmp_path, monkeypatch)
    reloaded = scope.get("reloaded")
    if section == "8a":
        import transformers

        assert type(reloaded) is transformers.CLIPModel and _achieved(reloaded) == pytest.approx(0.5, abs=0.02)
        assert type(scope["processor"]) is transformers.CLIPProcessor  # AutoProcessor on the compressed folder
        assert {"processor_config.json", "tokenizer.json"} <= {p.name for p in (tmp_path / "my-clip-upop").iterdir()}
        dense = transformers.CLIPModel.from_pretrained(tmp_path / "my-clip")
        assert upop.count_params(reloaded) < upop.count_params(dense)
    elif section == "8b":
        assert type(reloaded).__module__.startswith("timm.") and reloaded.num_classes == 5
        assert _achieved(reloaded) == pytest.approx(0.5, abs=0.02)
    elif section == "8c":
        assert type(reloaded).__module__.startswith("open_clip") and _achieved(reloaded) == pytest.approx(0.5, abs=0.02)
    else:
        from upop.integrations import STATE_FILE

        assert (tmp_path / "bert-run" / "checkpoint-4" / STATE_FILE).is_file()  # the interrupted run's state
        callback = scope["callback"]
        assert callback.search.step_count == 12 and callback.plan.stats["achieved"] == pytest.approx(0.5, abs=0.02)
        saved = upop.from_pretrained(tmp_path / "bert-upop")
        assert {n: s.kept for n, s in saved.upop_plan.structures.items()} == \
            {n: s.kept for n, s in callback.plan.structures.items()}
        assert (tmp_path / "bert-upop" / "tokenizer.json").is_file()
        assert (tmp_path / "bert-upop-retrained" / "tokenizer.json").is_file()
        assert any("upop/ratio" in log for log in scope["trainer"].state.log_history)
