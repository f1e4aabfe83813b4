"""Every function in lora_convert/ reads as what it does: none is longer than LIMIT lines without saying why.

A function's length is counted from its first body line (its docstring included) to its end; the signature is not
counted, since a CLI command's signature is its option declarations. A function may be longer when its docstring
says why, in a sentence starting with "Long because".
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 80
REASON = "Long because"


def _functions(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def body_length(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    return node.end_lineno - node.body[0].lineno + 1


def long_functions(folder: Path) -> list[str]:
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in _functions(path):
            if body_length(node) > LIMIT and REASON not in (ast.get_docstring(node) or ""):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({body_length(node)} lines)")
    return found


def test_no_function_is_long_without_a_reason():
    assert long_functions(ROOT / "lora_convert") == []
    assert long_functions(ROOT / "kernels") == []


def test_the_measure_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(LIMIT + 1))
    (tmp_path / "long.py").write_text(f"def f(\n    a,\n    b,\n):\n{body}\n", encoding="utf-8")
    (tmp_path / "short.py").write_text("def g(\n" + "    a,\n" * 100 + "):\n    return a\n", encoding="utf-8")
    (tmp_path / "excused.py").write_text(f'def h():\n    """{REASON} it must."""\n{body}\n', encoding="utf-8")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert [entry.split(" ")[1] for entry in long_functions(tmp_path)] == ["f"]
    finally:
        ROOT = saved
