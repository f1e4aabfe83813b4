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
from lora_convert.convert import gguf_layout, layout_rules
from lora_convert.engines import rules
from lora_convert.errors import SchemaError
from lora_convert.io import shipped_data as sd
from lora_convert.peft import mlx_format


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
    out["peft/mlx_lm.json"] = _digest(mlx_format.mlx_facts())
    out["convert/gguf_architectures.json"] = _digest([gguf_layout.gguf_model_types(), gguf_layout.not_proven()])
    return out


# What the loaders returned for the shipped files before they moved onto io/shipped_data.py (HEAD of that change).
# A shipped file that changes on purpose changes its digest here too: regenerate with
# `.venv/bin/python -c "import tests.test_shipped_data as t; print(t.loaded_values())"`.
FROZEN: dict[str, str] = {
    "arch/presets": "8d81144a9aab4e9c",
    "arch/quantization.json": "0a54f50b7450f5d5",
    "convert/gguf_architectures.json": "dff63e757426d79b",
    "convert/peft_layout.json": "970a679b2fd7808e",
    "engines/sglang-0.5.19.json": "195e5484a8b36887",
    "engines/sglang-0.5.19.json layout": "9b7a864055203c42",
    "engines/sglang-0.5.20.json": "8e408c5edb89ad50",
    "engines/sglang-0.5.20.json layout": "f50cce4e2f49101c",
    "engines/sglang-0.5.21.json": "2e6e5fecc2d8889c",
    "engines/sglang-0.5.21.json layout": "b85936f898985195",
    "engines/sglang-0.5.22.json": "701f074d17933965",
    "engines/sglang-0.5.22.json layout": "6a2e9b57a5d7c0f5",
    "engines/sglang-0.5.23.json": "21c288c45e7fef27",
    "engines/sglang-0.5.23.json layout": "b77bac5fef3fe28a",
    "engines/vllm-0.30.0.json": "b4f26a40d0d981dc",
    "engines/vllm-0.30.0.json layout": "9a3d11eab08d1253",
    "engines/vllm-0.31.0.json": "7e2f2204a6cd3800",
    "engines/vllm-0.31.0.json layout": "50614dcdc717ae03",
    "engines/vllm-0.32.0.json": "690dada41a6666a4",
    "engines/vllm-0.32.0.json layout": "fc9448f28dd76235",
    "engines/vllm-0.33.0.json": "42cac8087671d80b",
    "engines/vllm-0.33.0.json layout": "9fb4e4967a132d9d",
    "engines/vllm-0.34.0.json": "e023f7017169bc58",
    "engines/vllm-0.34.0.json layout": "4b348e714002ae6d",
    "peft/mlx_lm.json": "b5992828194b6934",
    "schemas/deepseek_v3.json": "37daa71532474671",
    "schemas/deepseek_v32.json": "9c0fb1c6917c4cbd",
    "schemas/dots1.json": "15499b3ab60c44d9",
    "schemas/ernie4_5_moe.json": "c0e4f552ab83a115",
    "schemas/exaone_moe.json": "74be5c51aed15f4f",
    "schemas/gemma3.json": "8a40ac61f9e2ba40",
    "schemas/glm4.json": "a8587e677c1f8843",
    "schemas/glm4_moe.json": "eae2225e02ee5837",
    "schemas/glm4_moe_lite.json": "be6d58e0af4bde28",
    "schemas/gpt_oss.json": "8e44074e8a2154b7",
    "schemas/granitemoe.json": "9471b3634beb948e",
    "schemas/granitemoehybrid.json": "1f21f076ec430968",
    "schemas/kimi_k25.json": "357f531714705355",
    "schemas/llama.json": "5270a45c4cd6b73e",
    "schemas/llama4.json": "95fd37688f5af4d7",
    "schemas/minimax.json": "b7d02ef7ecb299e5",
    "schemas/minimax_m2.json": "484e775a228357fc",
    "schemas/mistral3.json": "7209ebc259d9d885",
    "schemas/mixtral.json": "f2371e898414233a",
    "schemas/nemotron_h.json": "f48c561160ee6978",
    "schemas/olmo3.json": "9278267b09cd0bc7",
    "schemas/olmoe.json": "e73b7b0dcf861ba2",
    "schemas/phi3.json": "a45ac6db92cc14f8",
    "schemas/phimoe.json": "eeeaf10f4a78de26",
    "schemas/qwen2_moe.json": "02ff02a9b4bd4309",
    "schemas/qwen3.json": "867dbd77ad6bcea0",
    "schemas/qwen3_5.json": "4f334111ba62bbf9",
    "schemas/qwen3_5_moe.json": "d921ddbd01389618",
    "schemas/qwen3_moe.json": "99afc157bc45e115",
    "schemas/qwen3_next.json": "6068af052a54bfda",
    "schemas/qwen3_vl.json": "17bc16f15820b184",
    "schemas/qwen3_vl_moe.json": "9ff3a390d4c23c87",
    "schemas/seed_oss.json": "32e0d929a978afc2",
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
