"""Architecture knowledge lives in data (schemas/*.json, engines/*.json), not in the Python under lora_convert/.

The scan reads the code the way the interpreter does (`ast`): string literals, names, attributes, function and
class names, parameters and keywords count; comments and docstrings do not (they may explain a family). A hit is
a family name (deepseek, qwen, nemotron, ...) or an identifier only one family has (its config fields such as
q_lora_rank or ssm_state_size, its module names such as kv_a_proj_with_mqa or block_sparse_moe). A new family
should need one JSON file; a family name in the code means it would need code too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lora_convert"

FAMILY_NAMES = (
    "deepseek",
    "kimi",
    "qwen",
    "nemotron",
    "mixtral",
    "llama",
    "mistral",
    "mamba",
    "mla",
    "gdn",
    "deltanet",
)
# Config fields and module names that exist in one family only.
FAMILY_IDENTIFIERS = (
    "q_lora_rank",
    "kv_lora_rank",
    "qk_rope_head_dim",
    "qk_nope_head_dim",
    "first_k_dense_replace",
    "n_shared_experts",
    "n_routed_experts",
    "q_a_proj",
    "kv_a_proj_with_mqa",
    "q_b_proj",
    "kv_b_proj",
    "fused_qkv_a_proj_with_mqa",
    "ssm_state_size",
    "n_groups",
    "hybrid_override_pattern",
    "layers_block_type",
    "moe_latent_size",
    "fc1_latent_proj",
    "fc2_latent_proj",
    "mixer",
    "linear_num_value_heads",
    "linear_num_key_heads",
    "linear_attn",
    "in_proj_qkvz",
    "in_proj_qkv",
    "in_proj_ba",
    "shared_expert_gate",
    "block_sparse_moe",
    "num_local_experts",
    "w1",
    "w2",
    "w3",
)
TERMS = FAMILY_NAMES + FAMILY_IDENTIFIERS

# file under lora_convert/ -> (terms that may stay in its code, why). Keep this short.
ALLOWED: dict[str, tuple[frozenset[str], str]] = {
    # The schema's kind vocabulary: the roles a group plays, validated against every schema file and documented in
    # docs/schemas.md. Families share them (mamba layers in several hybrids, MLA in DeepSeek and Kimi).
    "arch/schema_loader.py": (frozenset({"mla", "mamba"}), "kind vocabulary (KINDS)"),
    # User-facing help text that shows what a family name looks like.
    "cli/schemas_cmd.py": (frozenset({"llama", "deepseek"}), "help text example"),
}


def _allowed(key: tuple[str, str]) -> bool:
    file, term = key
    return file in ALLOWED and term in ALLOWED[file][0]


# Projects named after a family, not the family: llama.cpp (the GGUF layout's loader) and its llama-cpp-python.
PROJECT_SUFFIXES = {"llama": r"(?![.\-_]cpp)"}


def _pattern(term: str) -> re.Pattern[str]:
    # Letters (and, for the short w1/w2/w3, digits) around a term make another word: `formla` is no hit, while
    # `qwen3_5`, `mla_kv_a` and `nemotron_h` are.
    edge = "a-z0-9" if re.fullmatch(r"w\d", term) else "a-z"
    return re.compile(rf"(?<![{edge}]){re.escape(term)}(?![{edge}]){PROJECT_SUFFIXES.get(term, '')}")


PATTERNS = {term: _pattern(term) for term in TERMS}


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if (
                isinstance(first, ast.Expr)
                and isinstance(first.value, ast.Constant)
                and isinstance(first.value.value, str)
            ):
                ids.add(id(first.value))
    return ids


def code_words(source: str) -> list[tuple[int, str]]:
    """(line, text) of every string literal (docstrings excluded), name, attribute, definition, parameter,
    keyword and import alias in `source`."""
    tree = ast.parse(source)
    docstrings = _docstring_nodes(tree)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            out.append((node.lineno, node.value))
        elif isinstance(node, ast.Name):
            out.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute):
            out.append((node.lineno, node.attr))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.append((node.lineno, node.name))
        elif isinstance(node, ast.arg):
            out.append((node.lineno, node.arg))
        elif isinstance(node, ast.keyword) and node.arg:
            out.append((node.value.lineno, node.arg))
        elif isinstance(node, ast.alias):
            out.append((getattr(node, "lineno", 0), node.asname or node.name))
    return out


def family_hits(source: str) -> list[tuple[int, str, str]]:
    """(line, term, text) for every family term in the code of `source`."""
    hits = []
    for line, text in code_words(source):
        lowered = text.lower()
        hits += [(line, term, text) for term, pattern in PATTERNS.items() if pattern.search(lowered)]
    return hits


def _package_hits() -> dict[tuple[str, str], list[str]]:
    found: dict[tuple[str, str], list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        for line, term, text in family_hits(path.read_text(encoding="utf-8")):
            found.setdefault((rel, term), []).append(f"{rel}:{line}: {text[:80]!r}")
    return found


def test_the_scan_sees_code_and_skips_comments_and_docstrings():
    source = '''
"""A module about DeepSeek (docstring: fine)."""
# a comment about Nemotron-H: fine
def f(cfg):
    """Reads the Qwen config (docstring: fine)."""
    x = cfg.get("q_lora_rank")      # a string literal: a hit
    if family == "nemotron_h":       # a hit
        return f"{x} rows of the mixer"   # an f-string part: a hit
    return mla_numbers(w1=1)         # a name and a keyword: hits
'''
    terms = sorted({term for _, term, _ in family_hits(source)})
    assert terms == ["mixer", "mla", "nemotron", "q_lora_rank", "w1"]
    assert not family_hits("formla = 'formlayout'\nqwenish = 1\nw12 = 'kw1'")[2:]  # other words are no hits
    assert not family_hits("x = 'loaded by llama.cpp (llama-cpp-python)'")  # the project, not the family
    assert family_hits("x = 'llama'") and family_hits("x = 'a llama.config'")


@pytest.mark.slow
def test_no_family_knowledge_in_python_outside_the_allow_list():
    found = _package_hits()
    unexplained = {k: v for k, v in found.items() if not _allowed(k)}
    assert not unexplained, "family names in code (put them in schemas/*.json or engines/*.json):\n" + "\n".join(
        line for lines in unexplained.values() for line in lines[:3]
    )


@pytest.mark.slow
def test_the_allow_list_has_no_stale_entries():
    found = _package_hits()
    stale = sorted((file, term) for file, (terms, _) in ALLOWED.items() for term in terms if (file, term) not in found)
    assert not stale, f"allow-list entries that no longer match anything: {stale}"


@pytest.mark.parametrize(
    "case, module, kind",
    [
        ("v4_deepseek_v3", "self_attn.kv_a_proj_with_mqa", "mla"),
        ("v5_nemotron_h", "mixer.in_proj", "mamba"),
        ("v5_nemotron_h", "mixer.q_proj", "attention"),
        ("v4_mixtral", "block_sparse_moe.gate", "router"),
        ("v5_qwen3_5", "linear_attn.in_proj_qkv", "linear_attention"),
    ],
)
def test_inspect_takes_module_kinds_from_the_schemas(case, module, kind):
    from lora_convert.peft.adapter import load_adapter
    from lora_convert.pipeline.inspect_report import build_report

    data = Path(__file__).parent / "fixtures" / "data" / "cases" / case / "adapter"
    families = build_report(load_adapter(str(data)))["families"]
    assert module in [e["name"] for e in families[kind]["entries"]]
