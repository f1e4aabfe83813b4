"""Engine profiles: rule files are well-formed data, and the findings the issue names appear with their numbers."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from lora_convert.codes import ENGINE_OUTCOMES
from lora_convert.engines.profiles import FEATURES, OUTCOMES, engine_info, load_rules
from lora_convert.pipeline.commands import validate

DATA = Path(__file__).parent / "fixtures" / "data"


def base_of(case):
    return str(DATA / "bases" / json.loads((DATA / "cases" / case / "case.json").read_text())["base"])


def engine_findings(case_or_folder, engine, case=None, **kw):
    folder = case_or_folder if isinstance(case_or_folder, Path) else DATA / "cases" / case_or_folder / "adapter"
    report = validate(str(folder), base=base_of(case or case_or_folder), engine=engine, smoke=False, **kw)
    return {f.code: f for f in report.findings if f.code.startswith(f"engine.{engine}.")}, report


# ---- the data files -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("engine", ["sglang", "vllm"])
def test_rule_files_are_complete(engine):
    rules = load_rules(engine)
    assert len(rules) >= 10
    for rule in rules:
        assert (rule["feature"] in FEATURES or rule["feature"] == "planned_group") and rule["outcome"] in OUTCOMES
        assert rule["engine_version"] and rule["source"] and rule["message"]
        assert re.fullmatch(r"[a-z0-9-]+", rule["id"])
        if ENGINE_OUTCOMES[rule["outcome"]][0].value == "error":
            assert rule["fix"], rule["id"]
    # every rule of a release says it describes that release (an inherited rule too: engines/rules.py)
    assert all(r["engine_version"] == engine_info(engine)["label"] for r in rules)
    if engine == "vllm":
        # every rule cites a released wheel (its release's, or the one it was read in and inherited from), not a
        # main-line commit
        cites_a_release = re.compile(r"\bvllm==\d+\.\d+\.\d+: ")
        assert all(cites_a_release.search(r["source"]) for r in rules if r["id"] not in VLLM_GENERIC), [
            r["id"] for r in rules if not cites_a_release.search(r["source"])
        ]


# rules whose source is a general property of PEFT adapters rather than a line of vLLM
VLLM_GENERIC = {
    "rslora-exact",
    "partial-expert-projections",
    "dora-rejected",
    "modules-to-save-rejected",
    "prefix-mismatch",
    "added-tokens",
    "adapter-name-segment",
    "vision-ignored",
    "layers-past-end",
    "max-lora-rank",
}


def test_required_rules_exist():
    sglang = {r["id"] for r in load_rules("sglang")}
    vllm = {r["id"] for r in load_rules("vllm")}
    assert {
        "rslora-ignored",
        "rank-pattern-pool-shape",
        "alpha-pattern-wrong-scale",
        "gdn-two-way-in-proj",
        "mla-missing-kv-a",
        "qkv-missing-v",
        "nemotron-in-proj-bcdt-dropped",
        "shared-experts-fusion",
        "dora-rejected",
        "added-tokens-rejected",
        "layers-past-end",
        "router-lora",
    } <= sglang
    assert {
        "partial-expert-projections",
        "kv-b-proj-not-applied",
        "dora-rejected",
        "bias-rejected",
        "modules-to-save-rejected",
        "prefix-mismatch",
        "fused-3d-on-2d-wrapper",
        "per-expert-on-3d-model",
        "mixed-expert-ranks",
        "kimi-k25-no-lora",
        "router-lora-non-gated",
    } <= vllm
    # vLLM 0.33.0's PEFTHelper honours rank/alpha patterns and it wraps (gated) MoE routers: no rule may say otherwise
    assert not {"patterns-dropped", "router-lora"} & vllm


def test_unknown_engine_is_a_usage_error(adapter_writer):
    import torch

    from lora_convert.errors import UsageError

    folder = adapter_writer(
        {
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 8),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(8, 4),
        }
    )
    with pytest.raises(UsageError):
        validate(str(folder), engine="tgi")


# ---- the findings the issue asks for ---------------------------------------------------------------------------------
def test_sglang_rslora_is_served_too_weak_by_sqrt_r():
    found, _ = engine_findings("v5_deepseek_v3_rslora", "sglang")
    f = found["engine.sglang.rslora-ignored"]
    assert f.severity.value == "error" and f.actual == "wrong"
    assert f"{math.sqrt(8):.2f}x too weak" in f.message and "2.83x" in f.message
    assert "--layout sglang" in f.fix and "0.5.23" in f.message


def test_vllm_honours_rslora():
    found, _ = engine_findings("v5_llama_rslora", "vllm")
    assert found["engine.vllm.rslora-exact"].severity.value == "info"
    assert "engine.vllm.patterns-dropped" not in found


def test_sglang_kv_a_less_deepseek_with_numbers():
    found, report = engine_findings("v5_deepseek_v3_q_a_only", "sglang")
    f = found["engine.sglang.mla-missing-kv-a"]
    cfg = json.loads((Path(base_of("v5_deepseek_v3_q_a_only")) / "config.json").read_text())
    q, kv, rope = cfg["q_lora_rank"], cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
    assert (f.expected, f.actual) == ("exact", "load-failure")  # the outcome, as in every engine finding
    assert f"[{2 * q}, 8]" in f.message and f"[{q + kv + rope}, 8]" in f.message
    assert "--layout sglang" in f.fix and "kv_lora_rank + qk_rope_head_dim" in f.fix
    assert not report.ok  # an engine error fails the run


def test_sglang_qwen35_two_way_gdn():
    found, _ = engine_findings("v5_qwen3_5", "sglang")
    f = found["engine.sglang.gdn-two-way-in-proj"]
    assert "in_proj_qkv" in f.message and "NotImplementedError" in f.message and "load-failure" in f.message
    assert "in_proj_q/k/v/z" in f.fix and "--layout sglang" in f.fix
    assert any("linear_attn.in_proj_qkv" in k for k in f.keys)


def test_sglang_nemotron_in_proj_share_lost():
    found, report = engine_findings("v5_nemotron_h", "sglang")
    f = found["engine.sglang.nemotron-in-proj-bcdt-dropped"]
    cfg = json.loads((Path(base_of("v5_nemotron_h")) / "config.json").read_text())
    inner = cfg["mamba_num_heads"] * cfg["mamba_head_dim"]
    total = 2 * inner + 2 * cfg["n_groups"] * cfg["ssm_state_size"] + cfg["mamba_num_heads"]
    assert f"{total - 2 * inner} B/C/dt rows of {total}" in f.message
    share = float(re.search(r"([0-9.]+)% of the in_proj delta", f.message).group(1))
    # recompute the share from the tensors directly
    t = load_file(str(DATA / "cases" / "v5_nemotron_h" / "adapter" / "adapter_model.safetensors"))
    a = next(v for k, v in t.items() if k.endswith("mixer.in_proj.lora_A.weight")).double()
    b = next(v for k, v in t.items() if k.endswith("mixer.in_proj.lora_B.weight")).double()
    delta = b @ a
    expected = 100 * float(delta[2 * inner :].pow(2).sum() / delta.pow(2).sum())
    assert share == pytest.approx(expected, abs=0.06)
    assert "--layout sglang" in f.fix
    assert "engine.sglang.nemotron-in-proj-unnormalized" in found
    # without the data scan the row share is reported instead
    found_nodata, _ = engine_findings("v5_nemotron_h", "sglang", data_scan=False)
    msg = found_nodata["engine.sglang.nemotron-in-proj-bcdt-dropped"].message
    assert f"{100 * (total - 2 * inner) / total:.1f}%" in msg


def test_sglang_missing_v_and_rank_pattern():
    found, _ = engine_findings("v5_deepseek_v3_noq", "sglang")
    assert "KeyError" in found["engine.sglang.qkv-missing-v"].message
    found, _ = engine_findings("v5_deepseek_v3_rank_pattern", "sglang")
    assert "engine.sglang.rank-pattern-pool-shape" in found and "engine.sglang.alpha-pattern-wrong-scale" in found
    assert "r=12" in found["engine.sglang.rank-pattern-pool-shape"].message


def test_sglang_mixtral_w_names_and_router():
    found, _ = engine_findings("v4_mixtral", "sglang")
    assert "engine.sglang.w-named-targets" in found and "engine.sglang.router-lora" in found


def test_dora_rejected_by_both():
    for engine in ("sglang", "vllm"):
        found, _ = engine_findings("v5_llama_dora", engine)
        assert found[f"engine.{engine}.dora-rejected"].actual == "load-failure"


def test_vllm_rules_on_fixtures():
    found, _ = engine_findings("v5_deepseek_v3_experts_down_only", "vllm")
    assert "gate, up" in found["engine.vllm.partial-expert-projections"].message
    found, _ = engine_findings("v4_deepseek_v3", "vllm")
    assert found["engine.vllm.kv-b-proj-not-applied"].actual == "dropped"
    found, _ = engine_findings("v5_deepseek_v3_rank_pattern", "vllm")
    assert not [c for c in found if "pattern" in c]
    found, _ = engine_findings("v4_mixtral", "vllm")
    assert not [c for c in found if "router" in c]  # a gated router's LoRA is applied
    assert "engine.vllm.partial-expert-projections" not in found
    found, _ = engine_findings("v5_qwen3_moe", "vllm")
    assert found["engine.vllm.fused-3d-on-2d-wrapper"].severity.value == "error"
    found, _ = engine_findings("v5_qwen3_5_moe_vl", "vllm")
    assert not [c for c in found if "3d" in c]  # a 3-D adapter on a 3-D model class loads
    found, _ = engine_findings("v4emu_kimi_k25", "vllm")
    assert "engine.vllm.kimi-k25-no-lora" in found


def test_vllm_refuses_vision_embedding_lora():
    # PEFT's LoRA on Qwen3-VL's vision `pos_embed` (an nn.Embedding): vLLM 0.33.0 refuses the adapter (`expected
    # target modules in {...} but received ['visual.pos_embed', ...]`, measured by tests/test_proof_vllm.py).
    from lora_convert.pipeline.commands import predict

    case = "v5_qwen3_vl_vision_pos_embed"
    found, _ = engine_findings(case, "vllm")
    refused = found["engine.vllm.vision-embedding-rejected"]
    assert refused.severity.value == "error" and refused.actual == "load-failure"
    assert "model.visual.pos_embed" in refused.message
    assert all("pos_embed" in k for k in refused.keys) and len(refused.keys) == 2
    # vision-ignored is about the vision Linear modules vLLM loads and never applies; this Embedding is not one
    assert "engine.vllm.vision-ignored" not in found
    assert predict("vllm", DATA / "cases" / case / "adapter", base_of(case)).load_failure == [
        "vision-embedding-rejected"
    ]
    # the fixture without the Embedding still loads, its vision Linear modules ignored
    found, _ = engine_findings("v5_qwen3_vl_vision", "vllm")
    assert "engine.vllm.vision-embedding-rejected" not in found and "engine.vllm.vision-ignored" in found


def test_sglang_refuses_a_vision_embedding_target_name():
    # the same adapter on SGLang 0.5.23: `pos_embed` in target_modules gets a LoRA buffer sized by get_hidden_dim,
    # which has no entry for it (NotImplementedError at start-up, measured by tests/test_proof_sglang.py)
    from lora_convert.pipeline.commands import predict

    case = "v5_qwen3_vl_vision_pos_embed"
    found, _ = engine_findings(case, "sglang")
    refused = found["engine.sglang.vision-embedding-target"]
    assert refused.actual == "load-failure" and "pos_embed" in refused.message
    assert predict("sglang", DATA / "cases" / case / "adapter", base_of(case)).load_failure == [
        "vision-embedding-target"
    ]


def test_vllm_prefix_mismatch(tmp_path):
    """A text-stack adapter (`model.layers`) against a base whose checkpoint names it otherwise."""
    src = DATA / "cases" / "v4_llama" / "adapter"
    dst = tmp_path / "prefixed"
    shutil.copytree(src, dst)
    t = load_file(str(dst / "adapter_model.safetensors"))
    t = {
        k.replace("base_model.model.model.layers.", "base_model.model.language_model.model.layers."): v
        for k, v in t.items()
    }
    save_file(t, str(dst / "adapter_model.safetensors"))
    found, _ = engine_findings(dst, "vllm", case="v4_llama")
    f = found.get("engine.vllm.prefix-mismatch")
    assert f is not None, sorted(found)
    assert "language_model.model.layers" in f.message and "model.layers" in f.message


def test_shared_expert_fusion_needs_the_default_config(tmp_path):
    found, _ = engine_findings("v4_deepseek_v3", "sglang")
    assert "engine.sglang.shared-experts-fusion" not in found  # 4 routed experts: fusion is not on by default
    base = tmp_path / "base"
    base.mkdir()
    cfg = json.loads((Path(base_of("v4_deepseek_v3")) / "config.json").read_text())
    cfg["n_routed_experts"], cfg["n_shared_experts"] = 256, 1
    (base / "config.json").write_text(json.dumps(cfg))
    report = validate(
        str(DATA / "cases" / "v4_deepseek_v3" / "adapter"),
        base=str(base),
        engine="sglang",
        smoke=False,
        data_scan=False,
    )
    codes = {f.code: f for f in report.findings}
    assert "--disable-shared-experts-fusion" in codes["engine.sglang.shared-experts-fusion"].fix


def test_engine_json_output_and_no_engine_no_findings():
    from typer.testing import CliRunner

    from lora_convert.cli import app

    folder = str(DATA / "cases" / "v5_llama_rslora" / "adapter")
    result = CliRunner().invoke(
        app,
        [
            "validate",
            folder,
            "--base",
            base_of("v5_llama_rslora"),
            "--engine",
            "sglang",
            "--format",
            "json",
            "--no-smoke",
            "--no-data",
        ],
    )
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert any(f["code"] == "engine.sglang.rslora-ignored" for f in doc["findings"])
    plain = validate(folder, base=base_of("v5_llama_rslora"), smoke=False, data_scan=False)
    assert not [f for f in plain.findings if f.code.startswith("engine.")]


# ---- numbers come from the schema, names from the rules ---------------------------------------------------------------
def test_row_split_without_a_base_names_the_dropped_slices_from_the_schema():
    """Without --base the detector still knows which rows SGLang drops: the slices and their `out` expressions of
    the rule family's schema (z|x kept, B/C/dt dropped), not a name list in Python."""
    from lora_convert.engines.profiles import compute_features
    from lora_convert.peft.adapter import load_adapter

    adapter = load_adapter(str(DATA / "cases" / "v5_nemotron_h" / "adapter"))
    fired = compute_features("sglang", adapter, None)
    text = fired["nemotron-in-proj-bcdt-dropped"]["share_text"]
    assert text.startswith("the B/C/dt rows (") and "mamba_num_heads" in text and "--base" in text


def test_row_energy_modules_follow_the_rules():
    from lora_convert.engines.profiles import row_energy_modules
    from lora_convert.peft.adapter import load_adapter

    nemotron = load_adapter(str(DATA / "cases" / "v5_nemotron_h" / "adapter"))
    assert [m.split(".")[-1] for m in row_energy_modules(nemotron, None)] == ["in_proj"]
    assert row_energy_modules(load_adapter(str(DATA / "cases" / "v4_llama" / "adapter")), None) == []


def test_fused_rows_numbers_name_the_schema_slices():
    found, _ = engine_findings("v5_deepseek_v3_q_a_only", "sglang")
    message = found["engine.sglang.mla-missing-kv-a"].message
    assert "(q_lora_rank)" in message and "(kv_lora_rank + qk_rope_head_dim)" in message


def test_shared_expert_count_comes_from_the_schema():
    from lora_convert.arch.base_config import resolve_base
    from lora_convert.arch.schema import bind

    arch = bind(resolve_base("deepseek-v3"))
    assert (arch.expert_count(), arch.shared_expert_count()) == (256, 1)
    assert (
        bind(
            {
                "model_type": "llama",
                "num_hidden_layers": 2,
                "hidden_size": 8,
                "num_attention_heads": 2,
                "intermediate_size": 16,
                "vocab_size": 32,
            }
        ).shared_expert_count()
        is None
    )


def test_docs_engine_tables_are_generated_from_the_rule_files():
    from lora_convert.engines import table

    path = Path(__file__).resolve().parents[1] / "docs" / "engine-layouts.md"
    text = path.read_text(encoding="utf-8")
    assert text == table.render_into(text), "docs/engine-layouts.md differs from the rule files: run `make docs`"
    section = text.split(table.BEGIN_MARKER, 1)[1]
    for rule_id in [r["id"] for r in load_rules("sglang")] + [r["id"] for r in load_rules("vllm")]:
        assert f"`{rule_id}`" in section
