"""Issue 25's PEFT-written cases that the engine proof cannot run here, held to everything else the cases get.

tests/fixtures/data/outside_proof/ (its README says why each is there) holds adapters PEFT wrote on tiny models of
transformers 5.23 (Mistral-3's VL wrapper, EXAONE-MoE, ...), with their bases in bases/. Every case in
cases/ runs through every engine release's loader; these do not, so this file gives them the rest: the wrapper
binds its own schema (before issue 25 a Mistral-3 config was claimed by llama through its text config and every
language-model module was `modules.unknown`), validate is clean, normalize is exact against PEFT's own per-module
deltas, a wrong base is caught, and `--layout peft` reloaded by PEFT reproduces PEFT's logits (marked `peft`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import helpers

OUTSIDE = helpers.FIXTURES / "outside_proof"
CASES = sorted(p.name for p in OUTSIDE.iterdir() if (p / "adapter").is_dir()) if OUTSIDE.is_dir() else []


@pytest.fixture
def outside_fixtures(tmp_path, monkeypatch):
    """helpers' fixture root pointed at a folder whose cases/ are the outside-proof cases and whose bases/ are
    the shared bases, so the same helpers (and the same checks as tests/test_normalize.py) read them."""
    root = tmp_path / "fixtures"
    root.mkdir()
    (root / "cases").symlink_to(OUTSIDE, target_is_directory=True)
    (root / "bases").symlink_to(helpers.FIXTURES / "bases", target_is_directory=True)
    monkeypatch.setattr(helpers, "FIXTURES", root)
    return root


def _text_modules(case: str) -> list[str]:
    from lora_convert.peft.naming import VISION_SEGMENTS

    modules = json.loads((OUTSIDE / case / "case.json").read_text())["modules"]
    return [m for m in modules if VISION_SEGMENTS.isdisjoint(m.split(".")) and not m.endswith(".base_layer")]


# make_fixtures.py issue26_gguf_cases: bases in the forms llama.cpp takes, proven by llama.cpp (tests/gguf_proof/)
GGUF_BASES = [
    "v5_dots1_mha",
    "v5_ernie4_5_moe_gguf",
    "v5_gemma3_text_gguf",
    "v5_granitemoehybrid_gguf",
    "v5_minimax_m2_gguf",
    "v5_nemotron_h_gguf",
    "v5_lfm2_moe_gguf",
    "v5_falcon_h1_gguf",
    "v5_gemma4_text_gguf",
]


def test_the_outside_proof_cases_are_there():
    assert [c for c in CASES if c not in GGUF_BASES] == [
        "v5_bailing_hybrid",
        "v5_deepseek_v4",
        "v5_mistral3_mistral4",
        "v5_mistral3_vl",
        "v5_mistral3_vl_names",
        "v5_mistral_large4",
        "v5_qwen3_omni_moe",
    ]
    assert set(GGUF_BASES) <= set(CASES)


def test_a_wrapper_binds_its_own_schema_whatever_its_text_config():
    from lora_convert.arch.schema import bind

    base = json.loads((helpers.FIXTURES / "bases" / "v5_mistral3" / "config.json").read_text())
    hub_style = dict(base, text_config=dict(base["text_config"], model_type="mistral"))
    for config in (base, hub_style):
        arch = bind(config)
        assert arch.family == "mistral3"
        for stack in ("model.language_model.layers", "language_model.model.layers"):
            for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
                assert arch.resolve_path(f"{stack}.1.{name}") is not None, (stack, name)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_validate_is_clean(case, outside_fixtures):
    from lora_convert.pipeline.commands import validate

    report = validate(str(helpers.case_dir(case) / "adapter"), base=str(helpers.case_base_dir(case)), smoke=True)
    codes = [f.code for f in report.findings]
    assert not [f for f in report.findings if f.severity.value == "error"], codes
    assert "modules.unknown" not in codes and "smoke.passed" in codes, codes
    vision = len(_text_modules(case)) < len(json.loads((OUTSIDE / case / "case.json").read_text())["modules"])
    assert ("modules.vision" in codes) == (vision and "vl_names" in case)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_normalize_is_exact_against_peft(case, outside_fixtures, tmp_path):
    from test_normalize import check_output_against_peft, run_normalize

    run_normalize(case, tmp_path / "out", drop_unsupported=True)
    assert check_output_against_peft(case, tmp_path / "out") >= len(_text_modules(case))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("case", "other"),
    [
        ("v5_mistral3_vl", "v5_olmo3"),
        ("v5_qwen3_omni_moe", "v5_olmoe"),
        ("v5_bailing_hybrid", "v5_deepseek_v3"),
        ("v5_mistral_large4", "v5_mistral3"),
        ("v5_mistral3_mistral4", "v5_mistral3"),
        ("v5_deepseek_v4", "v5_deepseek_v3"),
    ],
)
def test_a_wrong_base_is_caught(case, other, outside_fixtures):
    from lora_convert.pipeline.commands import validate

    # a base of another family: other head_dim or expert widths
    report = validate(
        str(helpers.case_dir(case) / "adapter"), base=str(helpers.FIXTURES / "bases" / other), smoke=False
    )
    codes = {f.code for f in report.findings if f.severity.value == "error"}
    assert codes & {"shapes.out-features", "shapes.in-features", "modules.unknown"}, codes


@pytest.mark.peft
@pytest.mark.parametrize("case", CASES)
def test_peft_layout_reproduces_peft_logits(case, outside_fixtures, tmp_path: Path):
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    from test_engine_layouts_peft import TOLERANCE, _load_base, _logits, _produce

    out = tmp_path / "peft"
    _produce(case, out)
    ref = load_file(str(helpers.case_dir(case) / "reference.safetensors"))
    got = _logits(_load_base(case, out), out, ref["logits::input_ids"])
    diff = float((got - ref["logits::adapted"]).abs().max())
    assert diff <= TOLERANCE, f"{case}: max |logits diff| {diff:.3g}"
    assert float((got - ref["logits::base"]).abs().max()) > 10 * diff


@pytest.mark.peft
@pytest.mark.parametrize("base", ["v5_phimoe", "v5_llama4_text"])
def test_a_module_peft_cannot_apply_is_reported_and_refused(base, tmp_path):
    """Issue 25 item 3: PEFT's all-linear wraps a router that subclasses nn.Linear but returns a tuple (Phi-3.5-MoE,
    Llama-4), writes the adapter, and its adapted forward raises (tests/fixtures expected_failures). The adapter
    PEFT writes is reported (`modules.peft-cannot-apply`) and `normalize --layout peft` refuses those modules,
    named."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from lora_convert.errors import UnsupportedAdapterError
    from lora_convert.pipeline.commands import normalize, validate

    base_dir = helpers.FIXTURES / "bases" / base
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    adapter = tmp_path / "adapter"
    peft.get_peft_model(model, config).save_pretrained(str(adapter))

    report = validate(str(adapter), base=str(base_dir), smoke=False)
    flagged = [f for f in report.findings if f.code == "modules.peft-cannot-apply"]
    assert len(flagged) == 1 and "returns a tuple" in flagged[0].message, [f.code for f in report.findings]
    assert flagged[0].keys and all("router" in k for k in flagged[0].keys)
    with pytest.raises(UnsupportedAdapterError, match="router"):
        normalize(str(adapter), tmp_path / "out", base=str(base_dir), layout="peft")
    result = normalize(str(adapter), tmp_path / "kept", base=str(base_dir), drop_unsupported=True, layout="peft")
    dropped = {d.code for d in result.dropped}
    assert dropped == {"modules.peft-cannot-apply"}, dropped
    # only PEFT's own layout refuses them: the stacked layout, which PEFT does not load, keeps the router
    stacked = normalize(str(adapter), tmp_path / "stacked", base=str(base_dir))
    assert not stacked.dropped and any(g.kind == "router" for g in stacked.plan.groups), stacked.dropped
