"""The registry of finding codes (lora_convert/codes.py) is the one place a severity is written.

The source is read with `ast`: no module outside codes.py/findings.py constructs a Finding, passes or assigns a
severity, or names a Severity member except to compare with it; every `finding(...)` names a registered code as a
literal; every registered code is used somewhere; docs/validate.md's codes section is what the registry generates.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from lora_convert import codes
from lora_convert.codes import ENGINE_OUTCOMES, REGISTRY, engine_finding, finding
from lora_convert.errors import EXIT_INTERNAL, InternalError
from lora_convert.findings import Severity

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "lora_convert"
REGISTRY_MODULES = {PACKAGE / "codes.py", PACKAGE / "findings.py"}
SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if p not in REGISTRY_MODULES)


def _tree(path: Path) -> ast.AST:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            child.parent = node  # type: ignore[attr-defined]
    return tree


def _called(node: ast.Call) -> str | None:
    func = node.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def _literal_codes(node: ast.expr) -> list[str] | None:
    """The codes a `finding(...)` first argument can be: a literal, or a conditional between literals."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.IfExp):
        body, orelse = _literal_codes(node.body), _literal_codes(node.orelse)
        return body + orelse if body is not None and orelse is not None else None
    return None


def _where(path: Path, node: ast.AST) -> str:
    return f"{path.relative_to(ROOT)}:{node.lineno}"


@pytest.mark.slow
def test_no_severity_is_written_outside_the_registry():
    problems = []
    for path in SOURCES:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Call):
                if _called(node) in ("Finding", "Severity"):
                    problems.append(f"{_where(path, node)}: {_called(node)}(...)")
                problems += [f"{_where(path, node)}: severity=" for kw in node.keywords if kw.arg == "severity"]
            elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                problems += [
                    f"{_where(path, node)}: .severity ="
                    for t in targets
                    if isinstance(t, ast.Attribute) and t.attr == "severity"
                ]
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "Severity"
                and not isinstance(node.parent, ast.Compare)
            ):  # type: ignore[attr-defined]
                problems.append(f"{_where(path, node)}: Severity.{node.attr} outside a comparison")
    assert not problems, "severities are written only in lora_convert/codes.py:\n" + "\n".join(problems)


def _finding_calls() -> list[tuple[str, list[str] | None]]:
    calls = []
    for path in SOURCES:
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Call) and _called(node) == "finding" and node.args:
                calls.append((_where(path, node), _literal_codes(node.args[0])))
    return calls


@pytest.mark.slow
def test_every_code_passed_to_finding_is_a_registered_literal():
    calls = _finding_calls()
    assert len(calls) > 80  # the grep sees the call sites (a refactor that hides them must update this test)
    not_literal = [where for where, found in calls if found is None]
    assert not not_literal, f"finding() codes must be literals (so they can be checked): {not_literal}"
    unknown = [(where, c) for where, found in calls for c in found if c not in REGISTRY]
    assert not unknown, f"unregistered codes: {unknown}"


@pytest.mark.slow
def test_every_registered_code_is_used():
    used = {c for _, found in _finding_calls() for c in found or []}
    assert set(REGISTRY) - used == set(), "registered but never reported (remove them, or use them)"


def test_finding_takes_the_severity_from_the_registry():
    assert finding("config.dora", "m").severity is Severity.ERROR
    assert finding("serving.dora", "m").severity is Severity.WARNING
    assert finding("data.zero-fill", "m", keys=["k"]).keys == ["k"]
    with pytest.raises(InternalError) as caught:
        finding("config.no-such-code", "m")
    assert caught.value.exit_code == EXIT_INTERNAL and "bug" in caught.value.hint


def test_every_code_has_one_severity_and_says_what_it_means():
    for code, entry in REGISTRY.items():
        assert isinstance(entry.severity, Severity) and entry.meaning.strip(), code
        area = code.split(".", 1)[0]
        assert area and area != "engine", code  # engine codes come from the rule files


def test_engine_findings_take_their_severity_from_the_outcome():
    assert engine_finding("sglang", "x", "wrong", "m").severity is Severity.ERROR
    assert engine_finding("vllm", "x", "exact", "m").code == "engine.vllm.x"
    with pytest.raises(InternalError):
        engine_finding("vllm", "x", "sometimes", "m")


@pytest.mark.parametrize("engine", ["sglang", "vllm"])
def test_every_engine_rule_has_a_registered_outcome(engine):
    from lora_convert.engines.rules import resolve_engine

    doc = json.loads((PACKAGE / "engines" / resolve_engine(engine).file).read_text(encoding="utf-8"))
    # a file that extends another release lists its own rules as rules_added / rules_changed
    listed = [r for key in ("rules", "rules_added", "rules_changed") for r in doc.get(key, []) if "outcome" in r]
    assert listed or "extends" in doc
    unknown = [(r["id"], r["outcome"]) for r in listed if r["outcome"] not in ENGINE_OUTCOMES]
    assert not unknown


def test_docs_validate_md_is_generated_from_the_registry():
    path = ROOT / "docs" / "validate.md"
    text = path.read_text(encoding="utf-8")
    assert text == codes.render_into(text), "docs/validate.md differs from the registry: run `make docs`"
    section = text.split(codes.BEGIN_MARKER, 1)[1].split(codes.END_MARKER, 1)[0]
    for code, entry in REGISTRY.items():
        assert f"| `{code}` | {entry.severity.value} |" in section
    for outcome in ENGINE_OUTCOMES:
        assert f"| `{outcome}` |" in section


def test_the_docs_command(tmp_path, capsys):
    target = tmp_path / "validate.md"
    target.write_text(f"before\n{codes.BEGIN_MARKER}\nstale\n{codes.END_MARKER}\nafter\n", encoding="utf-8")
    assert codes.main(["--write", str(target)]) == 0
    written = target.read_text(encoding="utf-8")
    assert (
        written.startswith("before\n") and written.endswith(f"{codes.END_MARKER}\nafter\n") and "stale" not in written
    )
    assert codes.main(["--markdown"]) == 0 and "| `shapes.unchecked` | error |" in capsys.readouterr().out
    with pytest.raises(InternalError):
        codes.render_into("no markers here")
