"""The one loader of shipped data files (lora_convert/io/shipped_data.py): every shipped file loads to the values
it loaded to before the loaders moved onto it (a frozen digest per file), and every kind of file reports a bad
value in the one format: `<file>: <path of the value>: expected ..., got ...`."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json

import pytest

from lora_convert.arch import base_config, quantization, schema_loader
from lora_convert.arch.schema_loader import list_schemas, load_schema
from lora_convert.convert import layout_rules
from lora_convert.engines import rules
from lora_convert.errors import SchemaError
from lora_convert.io import shipped_data as sd


def _plain(value):
    """A JSON-able, order-stable form of a loader's result (dataclasses as dicts, sets sorted)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"__class__": type(value).__name__, **fields}
    if isinstance(value, dict) or hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(_plain(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _digest(value) -> str:
    text = json.dumps(_plain(value), sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def loaded_values() -> dict[str, str]:
    """Shipped file -> digest of what its loader returns."""
    out = {}
    for family in list_schemas():
        out[f"schemas/{family}.json"] = _digest(load_schema(family))
    out["arch/presets"] = _digest(base_config._load_presets())
    out["arch/quantization.json"] = _digest((quantization.schemes(), quantization.config_fields()))
    for release in rules.releases():
        spec = release.spec
        out[f"engines/{release.file}"] = _digest(
            (rules.load_rules(spec), rules.engine_info(spec), rules.layout_document(spec))
        )
        out[f"engines/{release.file} layout"] = _digest(layout_rules.load_layout_rules(spec))
    out["convert/peft_layout.json"] = _digest(layout_rules.load_layout_rules("peft"))
    return out


# What the loaders returned for the shipped files before they moved onto io/shipped_data.py (HEAD of that change).
# A shipped file that changes on purpose changes its digest here too: regenerate with
# `.venv/bin/python -c "import tests.test_shipped_data as t; print(t.loaded_values())"`.
FROZEN: dict[str, str] = {
    "arch/presets": "e01dc547c9b215b8",
    "arch/quantization.json": "88091ff3e7f59482",
    "convert/peft_layout.json": "3e59aa144bb9898f",
    "engines/sglang-0.5.19.json": "f27a91c6d6dd08a5",
    "engines/sglang-0.5.19.json layout": "cb0ab3c3ef7925c5",
    "engines/sglang-0.5.20.json": "60c415e8c6a3f657",
    "engines/sglang-0.5.20.json layout": "15d17112ffbdcaa7",
    "engines/sglang-0.5.21.json": "c544108123a1a5bb",
    "engines/sglang-0.5.21.json layout": "df6b1b5465ea1c39",
    "engines/sglang-0.5.22.json": "dbd422052b760aa2",
    "engines/sglang-0.5.22.json layout": "0e5e6b6ef1173756",
    "engines/sglang-0.5.23.json": "2f550e47e94ead08",
    "engines/sglang-0.5.23.json layout": "7b453a5922eef735",
    "engines/vllm-0.30.0.json": "89a4f0fd90be7cab",
    "engines/vllm-0.30.0.json layout": "6455d56fb7c3bdaf",
    "engines/vllm-0.31.0.json": "b630b73f68c5ba23",
    "engines/vllm-0.31.0.json layout": "a75273a44b8de5fd",
    "engines/vllm-0.32.0.json": "80468c69b4b676d5",
    "engines/vllm-0.32.0.json layout": "aac93b0e709562b5",
    "engines/vllm-0.33.0.json": "834179a774956a2a",
    "engines/vllm-0.33.0.json layout": "44b7a9bf7bc00628",
    "engines/vllm-0.34.0.json": "2cbf206d174a599e",
    "engines/vllm-0.34.0.json layout": "302696abfc70a905",
    "schemas/deepseek_v3.json": "350f19cd2071068d",
    "schemas/deepseek_v32.json": "b99f50eac46fbdcb",
    "schemas/gemma3.json": "7ba398a23091527d",
    "schemas/glm4.json": "1694f08df2db6607",
    "schemas/glm4_moe.json": "33d2187f337f2d96",
    "schemas/gpt_oss.json": "4a228ab08b4b386a",
    "schemas/granitemoe.json": "f2f7c98ee8fa737c",
    "schemas/granitemoehybrid.json": "3f40b9d685b83e4b",
    "schemas/kimi_k25.json": "6836c31d0c1b17c1",
    "schemas/llama.json": "ac25a3d1e5155758",
    "schemas/llama4.json": "5016c1a8fcde764c",
    "schemas/minimax.json": "36d0a67f227e844a",
    "schemas/minimax_m2.json": "2617efe82aee6577",
    "schemas/mixtral.json": "42a591e48e7694a5",
    "schemas/nemotron_h.json": "019e8786d8dbada1",
    "schemas/olmoe.json": "0ae6c2fc3e8abd4d",
    "schemas/phi3.json": "b29d985873f8a837",
    "schemas/qwen2_moe.json": "c27a4db477e30e31",
    "schemas/qwen3.json": "5a68ed6500cc62b7",
    "schemas/qwen3_5.json": "b3662e9dada58ae9",
    "schemas/qwen3_5_moe.json": "430908f40babc81d",
    "schemas/qwen3_moe.json": "88d9d246a649771f",
    "schemas/qwen3_next.json": "247be43572fc4ac7",
    "schemas/qwen3_vl.json": "b3d49239584111ac",
    "schemas/qwen3_vl_moe.json": "0f25bdb8b3da7fa0",
}


def test_every_shipped_file_loads_to_the_same_values():
    assert loaded_values() == FROZEN


# ------------------------------------------------------------------------------------------------ the error format
def _clear_caches() -> None:
    for cached in (
        load_schema,
        base_config._load_presets,
        quantization._document,
        quantization.schemes,
        quantization.config_fields,
        rules._document,
        rules.load_rules,
        layout_rules.load_layout_rules,
    ):
        cached.cache_clear()


@pytest.fixture
def edit(monkeypatch):
    """edit[file] = function: the shipped document `file` is read with that change made to it."""
    edits = {}
    real = sd.read_resource

    def read(resource, file):
        doc = real(resource, file)
        if file in edits:
            doc = copy.deepcopy(doc)
            edits[file](doc)
        return doc

    monkeypatch.setattr(sd, "read_resource", read)
    monkeypatch.setattr(schema_loader, "read_resource", read)
    _clear_caches()
    yield edits
    monkeypatch.undo()
    _clear_caches()


def _message(load) -> str:
    with pytest.raises(SchemaError) as info:
        load()
    assert "ships with lora-convert" in info.value.hint
    return info.value.message


def test_a_schema_file_names_the_file_the_path_and_expected_vs_actual(edit):
    file = "schemas/llama.json"
    edit[file] = lambda d: d["groups"][0]["slices"][1].update(out=True)
    path = sd.read_shipped("lora_convert.schemas", "llama.json", file)["groups"][0]["path"]
    assert _message(lambda: load_schema("llama")) == (
        f"{file}: groups[0] ({path}).slices[1].out: expected an expression (string or integer), got boolean true"
    )


def test_a_preset_names_the_file_the_path_and_expected_vs_actual(edit):
    file = "lora_convert/arch/presets/qwen3-8b.json"
    edit[file] = lambda d: d.update(hub_ids="Qwen/Qwen3-8B")
    assert _message(base_config.list_presets) == f"{file}: hub_ids: expected a list, got string 'Qwen/Qwen3-8B'"


def test_the_quantization_schemes_name_the_file_the_path_and_expected_vs_actual(edit):
    file = "lora_convert/arch/quantization.json"
    edit[file] = lambda d: d["schemes"][0]["forms"][0]["aux"]["weight_scale_inv"].update(shape="n_out")
    assert _message(quantization.schemes) == (
        f"{file}: schemes[0] (fp8-block).forms[0].aux.weight_scale_inv.shape: expected a list, got string 'n_out'"
    )


def test_an_engine_rule_file_names_the_file_the_path_and_expected_vs_actual(edit):
    file = f"engines/{rules.resolve_engine('sglang').file}"
    edit[file] = lambda d: d["rules"][3].update(outcome="fine")
    rule_id = sd.read_shipped("lora_convert.engines", file.split("/")[1], file)["rules"][3]["id"]
    assert _message(lambda: rules.load_rules("sglang")) == (
        f"{file}: rules[3] ({rule_id}).outcome: expected one of {', '.join(rules.OUTCOMES)}, got string 'fine'"
    )
    # what the spec cannot say (a rule id used twice) is reported in the same format
    edit[file] = lambda d: d["rules"][4].update(id=d["rules"][3]["id"])
    _clear_caches()
    assert _message(lambda: rules.load_rules("sglang")) == (
        f"{file}: rules[4] ({rule_id}).id: expected a rule id not used before, got {rule_id!r} again"
    )


def test_the_peft_layout_names_the_file_the_path_and_expected_vs_actual(edit):
    file = "convert/peft_layout.json"
    edit[file] = lambda d: d["rename"][0].update(names=["x"])
    assert _message(lambda: layout_rules.load_layout_rules("peft")) == (
        f"{file}: rename[0].names: expected an object, got array"
    )
    # one strictness rule: a key the spec does not declare is refused (a refusal list among them: PEFT refuses
    # nothing), in the same format
    edit[file] = lambda d: d.update(refuse=[])
    _clear_caches()
    assert _message(lambda: layout_rules.load_layout_rules("peft")).startswith(
        f"{file}: top level: unknown key 'refuse' (allowed: "
    )


def test_the_spec_refuses_null_empty_and_repeated_values():
    spec = sd.Object(required={"names": sd.ListOf(sd.STRING, unique=True)}, optional={"flag": sd.BOOL})
    assert sd.check({"names": ["a"], "_note": "why"}, spec, "f.json") == {"names": ["a"], "_note": "why"}
    cases = [
        ({"names": ["a", "a"]}, "names: expected no item listed twice, got string 'a' twice"),
        ({"names": [""]}, "names[0]: expected a non-empty string, got string ''"),
        ({"names": [], "flag": None}, "flag: expected true or false, got null"),
        ({"names": [], "flag": 1}, "flag: expected true or false, got number 1"),
        ({}, "top level: missing required key 'names'"),
        ([], "top level: expected an object, got array (empty)"),
    ]
    for doc, problem in cases:
        with pytest.raises(SchemaError) as info:
            sd.check(doc, spec, "f.json")
        assert info.value.message == f"f.json: {problem}"
