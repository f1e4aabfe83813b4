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
    "arch/presets": "037b35cefae13a84",
    "arch/quantization.json": "0a54f50b7450f5d5",
    "convert/gguf_architectures.json": "a5f1bfaa1930cc59",
    "convert/peft_layout.json": "6eb2bd909ac12b0e",
    "engines/sglang-0.5.19.json": "44e37f4cd63eceac",
    "engines/sglang-0.5.19.json layout": "82698adf7141ce77",
    "engines/sglang-0.5.20.json": "3fa769f386c2c616",
    "engines/sglang-0.5.20.json layout": "950c8099fabcf3e6",
    "engines/sglang-0.5.21.json": "a0bfb42a45f2f9bf",
    "engines/sglang-0.5.21.json layout": "327d8e9f9cfdd7a9",
    "engines/sglang-0.5.22.json": "b9262d2fc30b97e3",
    "engines/sglang-0.5.22.json layout": "5af0af3cfac5f5c0",
    "engines/sglang-0.5.23.json": "7c5b7fff6406abcf",
    "engines/sglang-0.5.23.json layout": "e978ab4e3710fe20",
    "engines/vllm-0.30.0.json": "86fbeb49c551be6e",
    "engines/vllm-0.30.0.json layout": "653c2b9b58db3b34",
    "engines/vllm-0.31.0.json": "c29b8086e9b1153e",
    "engines/vllm-0.31.0.json layout": "bda3c3e53f3397d1",
    "engines/vllm-0.32.0.json": "12ba97fe606d3258",
    "engines/vllm-0.32.0.json layout": "43b01fdd1dafdeb5",
    "engines/vllm-0.33.0.json": "9db14b5cabee8ba4",
    "engines/vllm-0.33.0.json layout": "747c6b0cfbbeea69",
    "engines/vllm-0.34.0.json": "896f54c420263f80",
    "engines/vllm-0.34.0.json layout": "95a50c2268145436",
    "peft/mlx_lm.json": "f737013ec60e8747",
    "schemas/bailing_hybrid.json": "30925f45c11c7ee3",
    "schemas/deepseek_v3.json": "ac26b9a314bff20c",
    "schemas/deepseek_v32.json": "acc4cb8ae4c81847",
    "schemas/deepseek_v4.json": "99a247a6110e173e",
    "schemas/dots1.json": "fbf97d2a09668c2d",
    "schemas/ernie4_5_moe.json": "b2fb67c43f70abfd",
    "schemas/exaone_moe.json": "e4a1ba090a771896",
    "schemas/falcon_h1.json": "1c6a1d95593362d0",
    "schemas/gemma3.json": "3745c9726e2283ab",
    "schemas/gemma4.json": "32c35a7fa4cdbd64",
    "schemas/glm4.json": "bb10c7bec5468d5d",
    "schemas/glm4_moe.json": "08c24b8168c1165c",
    "schemas/glm4_moe_lite.json": "958fb2e12d8d7b33",
    "schemas/glm_moe_dsa.json": "56a0148b23ea389f",
    "schemas/gpt_oss.json": "16dada16e561da20",
    "schemas/granitemoe.json": "b6ff7afd7f87e4fe",
    "schemas/granitemoehybrid.json": "e52aec5dc21f3712",
    "schemas/hy_v3.json": "ad63f3cfd22e425f",
    "schemas/jamba.json": "395e02b1f979de7a",
    "schemas/kimi_k25.json": "4b2c5bc3ae29373c",
    "schemas/kimi_linear.json": "75f70809e07d7df7",
    "schemas/lfm2_moe.json": "2cdd3a1b77c7b948",
    "schemas/llama.json": "3a5f5105d0168b7e",
    "schemas/llama4.json": "6043c65873169af5",
    "schemas/longcat_flash.json": "06efa23fe968f000",
    "schemas/minimax.json": "140960660a9a6451",
    "schemas/minimax_m2.json": "81ddabe0966bc107",
    "schemas/mistral3.json": "c48f8ab8244c7acf",
    "schemas/mistral4.json": "7948d99ac9414b3d",
    "schemas/mistral_large4.json": "9118d0e402ad5721",
    "schemas/mixtral.json": "6bf88b531b641261",
    "schemas/nemotron_h.json": "bdad19b71d2daf23",
    "schemas/olmo3.json": "604a0db9bfe3fe0b",
    "schemas/olmo_hybrid.json": "e1e5852ea05a0b2a",
    "schemas/olmoe.json": "3b50afaa75ffe830",
    "schemas/phi3.json": "23483b1521841bb6",
    "schemas/phimoe.json": "e0f8835a0bbaab49",
    "schemas/qwen2_moe.json": "c6413c6ce3d99326",
    "schemas/qwen3.json": "b1f95e51578d4df3",
    "schemas/qwen3_5.json": "f1e6a5693fafce28",
    "schemas/qwen3_5_moe.json": "b646990826f41b4d",
    "schemas/qwen3_moe.json": "e96d3c89cfe40ce6",
    "schemas/qwen3_next.json": "b0fe0317b5969a1c",
    "schemas/qwen3_omni_moe.json": "2bb8af21f265e156",
    "schemas/qwen3_vl.json": "2ef01fea2e4462ac",
    "schemas/qwen3_vl_moe.json": "d56b67e536442b9d",
    "schemas/seed_oss.json": "94d1b87a5e027246",
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
