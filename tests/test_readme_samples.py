"""The sample outputs in README.md and docs/ are what the tool prints today (tests/readme_samples.py renders them)."""

from __future__ import annotations

import pytest

import readme_samples


def test_readme_has_samples():
    assert readme_samples.README in readme_samples.sample_files()
    blocks = readme_samples.samples(readme_samples.README.read_text(encoding="utf-8"))
    assert blocks and all("$ lora-convert " in b for b in blocks)


@pytest.mark.slow
@pytest.mark.parametrize("path", readme_samples.sample_files(), ids=lambda p: p.name)
def test_samples_are_current(path):
    text = path.read_text(encoding="utf-8")
    fresh = readme_samples.render(text)
    for old, new in zip(readme_samples.samples(text), readme_samples.samples(fresh), strict=True):
        assert readme_samples.comparable(old) == readme_samples.comparable(new), (
            f"{path.name}'s sample output differs from what the tool prints now; run `make readme`, review the diff.\n"
            f"--- README\n{old}\n--- now\n{new}"
        )


def test_comparable_masks_only_timings():
    assert readme_samples.comparable("0.1 MB in, 0.74 s") == "0.1 MB in, <t> s"
    assert readme_samples.comparable("layers 0-2") == "layers 0-2"


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path, monkeypatch):
    """The README's Python example runs as written, from a folder holding the examples."""
    import re
    import shutil

    blocks = re.findall(r"```python\n(.*?)```", readme_samples.README.read_text(encoding="utf-8"), flags=re.S)
    assert blocks
    shutil.copytree(readme_samples.ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["report"].ok and (tmp_path / "stacked-out" / "adapter_model.safetensors").exists()
