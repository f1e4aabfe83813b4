"""Names say what a thing is: a name defined at the top level of two modules of lora_convert reads as one thing
in two places. The pairs issue 23 found (two `validate_adapter`, two `resolve_base`, two `ScanResult`, two
`group_source_keys`) each keep one definition, and the internal ones are named for what they do."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "lora_convert"

ONE_HOME = ("validate_adapter", "resolve_base", "ScanResult", "group_source_keys")


def _top_level_definitions() -> dict[str, list[str]]:
    found: dict[str, list[str]] = defaultdict(list)
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                found[node.name].append(str(path.relative_to(PACKAGE.parent)))
    return found


def test_each_name_has_one_definition():
    found = _top_level_definitions()
    twice = {name: found[name] for name in ONE_HOME if len(found[name]) != 1}
    assert twice == {}


def test_the_public_names_stay_where_docs_api_puts_them():
    found = _top_level_definitions()
    assert found["validate_adapter"] == ["lora_convert/api.py"]
    assert found["ScanResult"] == ["lora_convert/scan/report.py"]
    assert found["resolve_base"] == ["lora_convert/arch/base_config.py"]
