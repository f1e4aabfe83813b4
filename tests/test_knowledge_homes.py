"""Each kind of knowledge has one home (issue 23, item 2): the dtype table (lora_convert/io/dtypes.py), the list of
output layouts (the engine rule files plus the built-in `stacked` and `peft`: convert/layout_rules.output_layouts),
which engine features normalize refuses and which check reports an adapter finding (the codes registry).

Two kinds of test: the values every consumer sees are the ones the code held before the move (written out here
as the oracle), and the source, read with `ast`, holds no second copy (a literal collection of dtype tags or
names, or of layout names, outside the home).
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from lora_convert.io import dtypes

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted([*(ROOT / "lora_convert").rglob("*.py"), *(ROOT / "kernels").glob("*.py")])

# ------------------------------------------------------------------------------------------------ dtypes
# What the eight places held before the table (HEAD a3da5f2 and after): the oracle of the table's views.
OLD_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I64": 8, "I32": 4,
    "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
OLD_FLOATS = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0"}
OLD_TORCH_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu", "I64": "int64", "I32": "int32", "I16": "int16",
    "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}  # fmt: skip
OLD_SMALLEST_NORMAL = {
    "F64": 2.2250738585072014e-308, "F32": 1.1754943508222875e-38, "F16": 6.103515625e-05,
    "BF16": 1.1754943508222875e-38,
}  # fmt: skip


def test_the_table_holds_what_the_scattered_copies_held():
    import ml_dtypes

    assert dtypes.DTYPE_SIZES == OLD_SIZES and list(dtypes.DTYPE_SIZES) == list(OLD_SIZES)
    assert dtypes.FLOAT_DTYPES == OLD_FLOATS
    assert dtypes.TORCH_DTYPE_NAMES == OLD_TORCH_NAMES
    old_numpy = {
        "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
        "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "F8_E8M0": ml_dtypes.float8_e8m0fnu,
        "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64, "U32": np.uint32,
        "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
    }  # fmt: skip
    for tag, old in old_numpy.items():
        assert dtypes.numpy_dtype(tag) == np.dtype(old), tag
        assert dtypes.dtype_tag(np.dtype(old)) == tag
        assert dtypes.tag_of_torch_name(OLD_TORCH_NAMES[tag]) == tag
    assert dtypes.tag_of_torch_name("complex64") is None
    assert {"F64", "F32", "F16", "BF16"} == dtypes.IEEE_FLOAT_DTYPES
    for tag, value in OLD_SMALLEST_NORMAL.items():
        assert dtypes.smallest_normal(tag) == value, tag
    assert dtypes.OUTPUT_DTYPES == {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}
    assert list(dtypes.OUTPUT_DTYPES) == ["bf16", "fp16", "fp32"]
    assert dtypes.OUTPUT_DTYPE_CHOICES == ("keep", "bf16", "fp16", "fp32")


def test_ieee_bit_fields_agree_with_the_formats():
    """The exponent masks and mantissa widths, checked against the formats themselves: +inf is exactly the mask
    (sign 0, mantissa 0), and the largest finite value's exponent field is one below all ones."""
    for d in dtypes.DTYPES:
        if not d.ieee:
            assert d.mantissa_bits is None
            continue
        dt = dtypes.numpy_dtype(d.tag)
        inf = np.array(np.inf, dtype=np.float64).astype(dt).view(f"u{d.size}")
        assert int(inf) == d.exponent_mask, d.tag
        import ml_dtypes

        top = np.array(ml_dtypes.finfo(dt).max, dtype=dt).view(f"u{d.size}")
        assert (int(top) & d.exponent_mask) >> d.mantissa_bits == d.largest_exponent_field, d.tag
        assert int(ml_dtypes.finfo(dt).nmant) == d.mantissa_bits, d.tag
        assert dtypes.smallest_normal(d.tag) == float(ml_dtypes.finfo(dt).smallest_normal), d.tag


def test_every_consumer_reads_the_table():
    from lora_convert.check import data_scan
    from lora_convert.convert import factors, group_tensors
    from lora_convert.io import safetensors_writer, tensor_files

    assert tensor_files.DTYPE_SIZES is dtypes.DTYPE_SIZES
    assert safetensors_writer.DTYPE_SIZES is dtypes.DTYPE_SIZES
    assert data_scan.FLOAT_DTYPES is dtypes.FLOAT_DTYPES
    assert {"F64", "F32", "F16", "BF16"} == data_scan.FAST_NORM_DTYPES
    assert {"F16", "BF16"} == data_scan.SIXTEEN_BIT
    assert data_scan.SMALLEST_NORMAL == OLD_SMALLEST_NORMAL
    assert group_tensors.OUTPUT_DTYPES is dtypes.OUTPUT_DTYPES
    assert factors._EXPONENT_FIELDS == {"bfloat16": (7, 0x7F80, 254), "float16": (10, 0x7C00, 30)}
    assert {name: (np.dtype(u), np.dtype(i), m) for name, (u, i, m) in group_tensors._NON_FINITE_FROM.items()} == {
        "float64": (np.dtype(np.uint64), np.dtype(np.int64), 0x7FF0000000000000),
        "float32": (np.dtype(np.uint32), np.dtype(np.int32), 0x7F800000),
        "bfloat16": (np.dtype(np.uint16), np.dtype(np.int16), 0x7F80),
        "float16": (np.dtype(np.uint16), np.dtype(np.int16), 0x7C00),
    }


def test_the_api_dtype_choices_come_from_the_table():
    import lora_convert.api as api

    assert api.DTYPES == ("keep", "bf16", "fp16", "fp32")
    assert api.DTYPES is dtypes.OUTPUT_DTYPE_CHOICES


def test_the_keep_choice_keeps_one_ieee_source_dtype():
    from types import SimpleNamespace

    from lora_convert.convert import group_tensors

    def plan_of(*tags):
        mods = [SimpleNamespace(lora_A=SimpleNamespace(dtype=t), lora_B=SimpleNamespace(dtype=t)) for t in tags]
        slices = [SimpleNamespace(sources=lambda m=m: [SimpleNamespace(module=m)]) for m in mods]
        return SimpleNamespace(groups=[SimpleNamespace(slices=slices)])

    for tag in ("F64", "F32", "F16", "BF16"):
        assert group_tensors.output_dtype(plan_of(tag), "keep") == tag
        assert group_tensors.output_dtype(plan_of(tag), "fp16") == "F16"
    assert group_tensors.output_dtype(plan_of("BF16", "F16"), "keep") == "F32"
    assert group_tensors.output_dtype(plan_of("F8_E4M3"), "keep") == "F32"
    assert group_tensors.output_dtype(plan_of("F8_E4M3", "BF16"), "keep") == "BF16"


DTYPE_WORDS = set(dtypes.DTYPE_SIZES) | {d.name for d in dtypes.DTYPES if d.is_float}
# Keyed by dtype, but not a fact of the dtype: the smoke check's tolerance for each output dtype is its own policy.
ALLOWED_DTYPE_COLLECTIONS = {("lora_convert/smoke/report.py", "TOLERANCES")}


def _word(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ("torch", "np"):
        return node.attr
    return None


def _collections(tree: ast.AST):
    """(assigned name or None, node, the words of its elements or keys) of every literal collection."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Set, ast.Tuple, ast.List)):
            yield node, [_word(e) for e in node.elts]
        elif isinstance(node, ast.Dict):
            yield node, [_word(k) for k in node.keys if k is not None]


def _assigned_name(tree: ast.AST, target: ast.AST) -> str | None:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is target:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            return next((t.id for t in targets if isinstance(t, ast.Name)), None)
    return None


def test_no_second_copy_of_dtype_knowledge():
    """No literal collection of two or more dtype tags or dtype names outside io/dtypes.py."""
    home = ROOT / "lora_convert" / "io" / "dtypes.py"
    found = []
    for path in SOURCES:
        if path == home:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node, words in _collections(tree):
            named = {w for w in words if w in DTYPE_WORDS}
            if len(named) >= 2:
                where = (str(path.relative_to(ROOT)), _assigned_name(tree, node))
                if where not in ALLOWED_DTYPE_COLLECTIONS:
                    found.append(f"{where[0]}:{node.lineno} {sorted(named)}")
    assert not found, "dtype knowledge outside lora_convert/io/dtypes.py:\n" + "\n".join(found)


# ----------------------------------------------------------------------------------------------- layouts
def test_layouts_are_stacked_peft_and_one_per_engine_rule_file():
    from lora_convert.api import layouts
    from lora_convert.convert.layout_rules import output_layouts, rule_layouts
    from lora_convert.engines.rules import installed_engines

    assert output_layouts() == ("stacked", "peft", "mlx", "gguf", *installed_engines())
    assert rule_layouts() == ("peft", *installed_engines())
    assert layouts() == output_layouts()
    assert {"sglang", "vllm"} <= set(installed_engines())


def test_a_new_rule_file_is_a_new_layout_everywhere(monkeypatch, tmp_path):
    """One function gives the list: an engine that gains a rule file is a layout of the API, the engine-layout
    planner and the scan's hint without another edit."""
    from lora_convert.api import layouts
    from lora_convert.convert import engine_layouts
    from lora_convert.engines import rules
    from lora_convert.errors import UsageError
    from lora_convert.scan import report
    from lora_convert.scan.task import ScanOptions

    extra = rules.EngineRelease("newengine", "1.0")
    shipped = rules.releases()
    monkeypatch.setattr(rules, "releases", lambda: (*shipped, extra))
    assert "newengine" in layouts()
    assert "newengine" in engine_layouts.rule_layouts()
    options = ScanOptions(normalize_root=str(tmp_path / "out"), layout=None)
    with pytest.raises(UsageError) as exc:
        report.run_scan([str(tmp_path)], options=options)
    for layout in layouts():
        assert layout in exc.value.hint, (layout, exc.value.hint)


LAYOUT_WORDS = {"stacked", "peft", "sglang", "vllm"}


def test_no_second_list_of_layouts():
    """No literal collection of two or more layout names in the package (the layout list is output_layouts())."""
    found = []
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node, words in _collections(tree):
            named = {w for w in words if w in LAYOUT_WORDS}
            if len(named) >= 2:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {sorted(named)}")
    assert not found, "lists of layouts outside convert/layout_rules.output_layouts:\n" + "\n".join(found)


# ------------------------------------------------------------------------------------------ codes registry
def test_normalize_refuses_the_features_the_registry_names():
    from lora_convert.codes import NORMALIZE_REFUSED_FEATURES, REGISTRY
    from lora_convert.engines import rules
    from lora_convert.engines.features import FEATURES

    # what engines/rules.py held before (NORMALIZE_REFUSES)
    assert {
        "dora", "bias", "full_weights", "added_tokens", "vision_modules", "layers_past_end", "trainable_tokens",
    } == NORMALIZE_REFUSED_FEATURES  # fmt: skip
    assert set(FEATURES) >= NORMALIZE_REFUSED_FEATURES
    assert not hasattr(rules, "NORMALIZE_REFUSES")
    by_feature = {c.refused_feature: c.code for c in REGISTRY.values() if c.refused_feature}
    assert by_feature == {
        "dora": "config.dora", "bias": "config.lora-bias", "full_weights": "keys.full-weight",
        "added_tokens": "tokens.added", "vision_modules": "modules.vision", "layers_past_end": "layers.past-end",
        "trainable_tokens": "keys.trainable-tokens",
    }  # fmt: skip
    rule = {"feature": "dora", "outcome": "load-failure"}
    assert rules.layout_treatment(rule) == rules.REFUSES
    assert rules.layout_treatment({**rule, "feature": "rslora"}) != rules.REFUSES


def test_the_plan_refuses_modules_with_codes_that_name_their_feature():
    """Every code the plan refuses a module with, other than `modules.unknown` (no engine feature is about modules
    the schema does not know), `modules.peft-cannot-apply` (PEFT, not an engine, is what cannot apply them: the
    schema says why) and `keys.base-layer-copy` (PEFT's copies of a base weight are left out, never refused), names
    the engine feature its rules are about."""
    import inspect as source

    from lora_convert.codes import REGISTRY
    from lora_convert.convert import plan

    text = source.getsource(plan)
    refused = {c for c in REGISTRY if f'"{c}"' in text}
    assert {"config.dora", "config.lora-bias", "keys.full-weight", "modules.vision", "layers.past-end"} <= refused
    for code in refused - {"modules.unknown", "modules.peft-cannot-apply", "keys.base-layer-copy"}:
        assert REGISTRY[code].refused_feature, code


def test_each_code_knows_the_check_that_reports_it():
    from lora_convert.check.validate import CHECK_NAMES
    from lora_convert.codes import AREAS, REGISTRY, check_of
    from lora_convert.errors import InternalError

    # the prefix map check/context.py held before, for every code the adapter reader can report
    old = {"config": ("config.", "tokens."), "pairs": ("pairs.", "rank.", "shapes."), "moe": ("experts.",)}

    def old_group(code: str) -> str:
        return next((g for g, prefixes in old.items() if code.startswith(prefixes)), "keys")

    reader_areas = {"config", "tokens", "keys", "pairs and ranks", "MoE"}
    for area in AREAS:
        assert area.check is None or area.check in CHECK_NAMES, area.name
        for c in area.codes:
            if area.name in reader_areas:
                assert check_of(c.code) == old_group(c.code), c.code
    assert check_of("shapes.in-features") == "shapes" and check_of("data.nan") == "data"
    assert check_of("base.preset") is None
    with pytest.raises(InternalError):
        check_of("no.such-code")
    assert len(REGISTRY) == sum(len(a.codes) for a in AREAS)


def test_adapter_findings_go_to_the_check_of_their_code():
    from types import SimpleNamespace

    from lora_convert.check.context import adapter_findings
    from lora_convert.codes import finding

    codes = ["config.rslora", "keys.duplicate", "rank.a-b-mismatch", "shapes.not-2d", "experts.parameter-guessed"]
    found = [finding(c, c) for c in codes]
    ctx = SimpleNamespace(adapter=SimpleNamespace(findings=found), stacked=False)
    got = {g: [f.code for f in adapter_findings(ctx, g)] for g in ("config", "keys", "pairs", "moe", "data")}
    assert got == {
        "config": ["config.rslora"],
        "keys": ["keys.duplicate"],
        "pairs": ["rank.a-b-mismatch", "shapes.not-2d"],
        "moe": ["experts.parameter-guessed"],
        "data": [],
    }
    ctx.stacked = True  # a stacked output's rank and shape findings are the layout checks' concern
    assert [f.code for f in adapter_findings(ctx, "pairs")] == []


def test_normalize_blockers_compare_severities_not_strings():
    from lora_convert.codes import finding
    from lora_convert.convert.blockers import normalize_blockers

    error, warning, info = finding("keys.duplicate", "e"), finding("config.bias", "w"), finding("config.rslora", "i")
    assert normalize_blockers([error, warning, info]) == [error]
    assert normalize_blockers([error, warning, info], strict=True) == [error, warning]
    assert normalize_blockers([finding("keys.full-weight", "per module")]) == []
    source = (ROOT / "lora_convert" / "convert" / "blockers.py").read_text(encoding="utf-8")
    assert "severity.value" not in source


def test_smoke_staging_reinterprets_exactly_the_dtypes_numpy_lacks():
    torch = pytest.importorskip("torch")
    from lora_convert.smoke.staging import to_torch

    bits = np.arange(0, 1 << 16, 257, dtype=np.uint16)
    for d in dtypes.DTYPES:
        if not d.is_float:
            continue
        raw = np.resize(bits.view(np.uint8), 64 * d.size).view(f"u{d.size}")
        array = raw.view(dtypes.numpy_dtype(d.tag))
        tensor = to_torch(array)
        assert tensor.dtype == getattr(torch, d.name), d.tag
        got = tensor.view(getattr(torch, f"uint{8 * d.size}") if d.size > 1 else torch.uint8).numpy()
        assert np.array_equal(got.view(f"u{d.size}"), raw), d.tag
