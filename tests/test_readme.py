"""The README's API example runs as written and ends on target."""

import re
from pathlib import Path

README = Path(__file__).parents[1] / "README.md"


def test_readme_api_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    example = next(b for b in blocks if "UPopSearch" in b and "save_pretrained" in b)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(example, "README.md", "exec"), scope)
    assert abs(scope["plan"].stats["achieved"] - 0.5) <= 0.01
    assert type(scope["model"]).__name__ == "CLIPModel"
    assert (tmp_path / "out" / "model.safetensors").is_file()
