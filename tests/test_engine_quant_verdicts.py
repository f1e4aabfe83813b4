"""Every quantization scheme lora-convert detects (lora_convert/arch/quantization.json) has a verdict in every engine
release's rules: either the release refuses the base's quantization method outright (a `quantization_method`
rule), or it has a verdict for LoRA on that scheme's dense modules and one for LoRA on its routed experts
(`quantized_base` rules, whose `schemes` list it or, absent, cover every scheme)."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from lora_convert.engines.rules import load_rules, releases

SCHEMES = json.loads(resources.files("lora_convert.arch").joinpath("quantization.json").read_text())["schemes"]
RELEASES = [r.spec for r in releases()]


def _covers(rule: dict, scheme_id: str, experts: bool) -> bool:
    params = rule.get("params") or {}
    if params.get("experts") not in (None, experts):
        return False
    if "local_contains" in params or "families" in params:  # a narrower verdict (one family's shared experts)
        return False
    return not params.get("schemes") or scheme_id in params["schemes"]


def verdicts(release: str, scheme: dict) -> dict[str, list[str]]:
    """The rule ids that decide LoRA over `scheme` in `release`: `base` (the method refused), `dense`, `experts`."""
    rules = load_rules(release)
    methods = set(scheme["quant_method"])
    return {
        "base": [
            r["id"]
            for r in rules
            if r["feature"] == "quantization_method" and methods & set(r["params"].get("methods", ()))
        ],
        **{
            side: [r["id"] for r in rules if r["feature"] == "quantized_base" and _covers(r, scheme["id"], experts)]
            for side, experts in (("dense", False), ("experts", True))
        },
    }


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s["id"])
@pytest.mark.parametrize("release", RELEASES)
def test_every_scheme_has_a_verdict_in_every_release(release, scheme):
    found = verdicts(release, scheme)
    assert found["base"] or (found["dense"] and found["experts"]), (release, scheme["id"], found)


def test_a_scheme_has_one_verdict_per_side():
    """No scheme gets two verdicts for the same side of one release (exact and load failure at once)."""
    for release in RELEASES:
        for scheme in SCHEMES:
            found = verdicts(release, scheme)
            assert len(found["dense"]) <= 1 and len(found["experts"]) <= 1, (release, scheme["id"], found)


def test_bitsandbytes_verdicts_per_engine():
    """vLLM 0.30-0.34 have no bitsandbytes method (the base is refused); SGLang serves LoRA on bitsandbytes dense
    layers and refuses it on bitsandbytes routed experts (no quant info for its MoE LoRA runner)."""
    bnb = [s for s in SCHEMES if "bitsandbytes" in s["quant_method"]]
    assert {s["id"] for s in bnb} == {"bnb-4bit", "bnb-8bit"}
    for release in RELEASES:
        for scheme in bnb:
            found = verdicts(release, scheme)
            if release.startswith("vllm"):
                assert found["base"] == ["quant-method-unknown"], release
            else:
                assert not found["base"] and found["experts"] == ["quant-moe-lora-unsupported"], release


def test_modelopt_nvfp4_verdicts_per_release():
    """ModelOpt NVFP4 (quant_method modelopt, quant_algo NVFP4): vLLM 0.30-0.34 serve it (modelopt_fp4) with LoRA on
    dense layers and routed experts; SGLang on dense layers and, through its Marlin MoE runner, on routed experts;
    SGLang 0.5.19-0.5.21 alone have the sm100 fused shared-expert kernel that fails with LoRA wrappers."""
    scheme = next(s for s in SCHEMES if s["id"] == "modelopt-nvfp4")
    for release in RELEASES:
        found = verdicts(release, scheme)
        assert not found["base"] and found["dense"] == ["quant-dense-lora"], release
        assert found["experts"] == ["quant-moe-lora"], release
        fused = [r for r in load_rules(release) if r["id"] == "nvfp4-shared-expert-fused-kernel"]
        old_sglang = release in ("sglang==0.5.19", "sglang==0.5.20", "sglang==0.5.21")
        assert bool(fused) == old_sglang, release
        if fused:
            assert fused[0]["outcome"] == "load-failure" and "sm100" in fused[0]["message"], release
