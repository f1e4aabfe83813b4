"""docs/architecture.md, the map for newcomers: its stage and module list is generated from the code
(tests/architecture_map.py: the stages of tests/test_layering.py, each module's docstring's first sentence) and must
match it; every module of the package is on it, says its job, and every command has its flow there."""

from __future__ import annotations

import re

import pytest

import architecture_map as amap
from lora_convert.errors import InternalError
from test_layering import MODULES, ROOT, STAGES

DOC = ROOT / "docs" / "architecture.md"


def _section(text: str) -> str:
    return text.split(amap.BEGIN_MARKER, 1)[1].split(amap.END_MARKER, 1)[0]


def test_docs_architecture_md_is_generated_from_the_code():
    text = DOC.read_text(encoding="utf-8")
    assert text == amap.render_into(text), "docs/architecture.md differs from the code: run `make docs`"


def test_every_module_is_on_the_map():
    section = _section(DOC.read_text(encoding="utf-8"))
    missing = [m for m in MODULES if f"| `{MODULES[m].relative_to(ROOT).as_posix()}` |" not in section]
    assert not missing, f"modules missing from docs/architecture.md (run `make docs`): {missing}"


def test_the_stages_are_the_layering_contract_in_order():
    section = _section(DOC.read_text(encoding="utf-8"))
    headings = re.findall(r"^### \d+\. (\w+)", section, flags=re.M)
    assert headings == list(STAGES)


def test_every_module_says_its_job():
    # The map's line for a module is its docstring's first sentence; a module without one has no line to show.
    silent = sorted(m for m in MODULES if len(amap.job_of(MODULES[m]).split()) < 3)
    assert not silent, f"modules whose docstring does not open with a sentence saying their job: {silent}"


def test_the_first_sentence_is_cut_where_the_sentence_ends(tmp_path):
    module = tmp_path / "m.py"
    module.write_text('"""One job, e.g. `a.b` and O(1) per key. More detail.\n\nA second paragraph."""\n')
    assert amap.job_of(module) == "One job, e.g. `a.b` and O(1) per key."
    module.write_text('"""A title without a full stop\nwrapped over two lines\n\nDetail."""\n')
    assert amap.job_of(module) == "A title without a full stop wrapped over two lines"
    module.write_text("x = 1\n")
    assert amap.job_of(module) == ""


def test_every_command_has_its_flow():
    commands = sorted(m.rsplit(".", 1)[1].removesuffix("_cmd") for m in MODULES if m.endswith("_cmd"))
    assert len(commands) >= 6, "the CLI modules were not found"
    text = DOC.read_text(encoding="utf-8")
    hand_written = text.replace(_section(text), "")
    flows = re.findall(r"^### `lora-convert (\w+)`", hand_written, flags=re.M)
    assert sorted(flows) == commands


def test_the_write_command(tmp_path):
    target = tmp_path / "architecture.md"
    target.write_text(f"before\n{amap.BEGIN_MARKER}\nstale\n{amap.END_MARKER}\nafter\n", encoding="utf-8")
    assert amap.main(["--write", str(target)]) == 0
    written = target.read_text(encoding="utf-8")
    assert written.startswith("before\n") and written.endswith(f"{amap.END_MARKER}\nafter\n")
    assert "stale" not in written and "`lora_convert/api.py`" in written
    with pytest.raises(InternalError):
        amap.render_into("no markers here")


@pytest.mark.parametrize("doc", ["README.md", "DEVELOPERS.md"])
def test_the_map_is_linked(doc):
    assert "(docs/architecture.md)" in (ROOT / doc).read_text(encoding="utf-8")
