"""`lora-convert schemas list | show | check` through typer's CliRunner."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import lora_convert.arch.schema_loader as schema_module  # where the schema files are listed
from lora_convert.arch.base_config import list_presets
from lora_convert.arch.schema import load_schema
from lora_convert.cli import app

runner = CliRunner()


def test_schemas_check_passes_on_the_shipped_files():
    result = runner.invoke(app, ["schemas", "check"])
    assert result.exit_code == 0, result.output
    assert "FAILED" not in result.stdout
    assert "ok      preset deepseek-v3 -> deepseek_v3: 61 layers" in result.stdout


def test_schemas_check_json_covers_every_schema_and_preset():
    result = runner.invoke(app, ["schemas", "check", "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is True
    assert [s["family"] for s in report["schemas"]] == schema_module.list_schemas()
    assert all(p["ok"] for p in report["presets"]) and len(report["presets"]) == len(list_presets())
    # Every shipped family is exercised by a preset, except three whose real Hub config.json had no followable public
    # copy when their schemas were added (issue 14: Granite-3 MoE, Granite-4 hybrid, MiniMax-Text-01); the fixtures
    # bind them to tiny configs. Three of issue 25's families have no preset for the same reason, and their
    # PEFT-written fixtures bind them: dots1 (transformers' Dots1Config defaults leave the expert counts unset and give
    # hidden_size 4608, which no other followable source confirms), olmo3 (Olmo3Config's defaults are OLMo-2's
    # 50304-token vocabulary, and no followable copy of an Olmo-3 config.json was found) and exaone_moe
    # (ExaoneMoeConfig names K-EXAONE-236B-A23B but its defaults, 32 layers of 64 experts, are not that checkpoint).
    issue25_without_source = ["dots1", "exaone_moe", "olmo3"]
    # fam-misc: hy_v3, bailing_hybrid (no followable copy of HY3's or Ling-3.0's config.json was found; fixtures bind
    # them). qwen3_omni_moe and kimi_linear have presets since (qwen3-omni-30b-a3b-instruct, kimi-linear-48b-a3b-instruct).
    issue25_without_source += ["hy_v3", "bailing_hybrid"]
    # fam-gemma: gemma4 (no followable copy of any Gemma-4 config.json, with repository and commit, was found; the
    # v5_gemma4_* fixtures bind it)
    issue25_without_source += ["gemma4"]
    # fam-mla: glm_moe_dsa (GLM-5.2's values were seen only in third-party code, not in a followable copy of the Hub
    # config.json), mistral4 and mistral_large4 (no followable copy of Mistral-Small-4's or Mistral-Large-4's
    # config.json was found in the session's time); the v5_glm_moe_dsa / v5_mistral4 / v5_mistral_large4 fixtures bind them
    issue25_without_source += ["glm_moe_dsa", "mistral4", "mistral_large4"]
    # fam-mla: deepseek_v4 (no followable copy of DeepSeek-V4-Flash's config.json; v5_deepseek_v4 binds it)
    issue25_without_source += ["deepseek_v4"]
    # fam-hybrid: olmo_hybrid (no followable copy of an OLMo-Hybrid config.json; v5_olmo_hybrid binds it). lfm2_moe,
    # falcon_h1 and jamba have presets since (lfm2-8b-a1b, falcon-h1-7b-base, ai21-jamba-1.5-mini).
    issue25_without_source += ["olmo_hybrid"]
    # longcat: longcat_flash (no followable copy of LongCat-Flash-Chat's config.json; only config classes' defaults and
    # partial snippets were found; v5_longcat_flash binds it)
    issue25_without_source += ["longcat_flash"]
    assert report["families_without_preset"] == sorted(
        ["granitemoe", "granitemoehybrid", "minimax", *issue25_without_source]
    )


def test_schemas_check_fails_on_a_broken_schema(tmp_path, monkeypatch):
    shipped = schema_module._schema_files()
    (tmp_path / "toy.json").write_text(json.dumps({"family": "toy", "bogus": 1}))
    monkeypatch.setattr(schema_module, "_schema_files", lambda: {**shipped, "toy": tmp_path / "toy.json"})
    load_schema.cache_clear()
    try:
        result = runner.invoke(app, ["schemas", "check"])
    finally:
        load_schema.cache_clear()
    assert result.exit_code == 1
    assert "FAILED  schema toy" in result.stdout and "unknown key 'bogus'" in result.stdout


def test_schemas_list():
    result = runner.invoke(app, ["schemas", "list", "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {s["family"] for s in data["schemas"]} == set(schema_module.list_schemas())
    presets = {p["name"]: p for p in data["presets"]}
    assert presets["kimi-k2.5"]["family"] == "kimi_k25"
    assert presets["deepseek-v3"]["hub_ids"] == ["deepseek-ai/DeepSeek-V3", "deepseek-ai/DeepSeek-R1"]
    human = runner.invoke(app, ["schemas", "list"])
    assert human.exit_code == 0 and "qwen3.5-35b-a3b" in human.stdout


def test_show_human_output_has_a_table_per_layer_type():
    result = runner.invoke(app, ["schemas", "show", "deepseek-v3"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "layers 0-2: attention + dense" in result.stdout
    assert "layers 3-60: attention + moe" in result.stdout
    assert "fused_qkv_a_proj_with_mqa" in result.stdout and "2112" in result.stdout
    assert "q_a_proj=1536 | kv_a_proj_with_mqa=576" in result.stdout


def test_show_a_family_without_base_is_symbolic():
    result = runner.invoke(app, ["schemas", "show", "deepseek_v3", "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    fused = next(g for g in data["groups"] if g["path"] == "self_attn.fused_qkv_a_proj_with_mqa")
    assert [s["out"] for s in fused["slices"]] == ["q_lora_rank", "kv_lora_rank + qk_rope_head_dim"]
    human = runner.invoke(app, ["schemas", "show", "nemotron_h"], env={"COLUMNS": "250"})
    assert human.exit_code == 0 and "mixer.in_proj" in human.stdout


def test_show_family_with_base(tmp_path):
    cfg = {
        "model_type": "llama",
        "num_hidden_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 96,
        "vocab_size": 100,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    result = runner.invoke(app, ["schemas", "show", "llama", "--base", str(tmp_path), "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    qkv = data["layer_types"][0]["groups"][0]
    assert qkv["name"] == "qkv_proj" and qkv["out"] == 64 + 2 * 2 * 16
    assert data["base"]["origin"] == "local"
    only_base = runner.invoke(app, ["schemas", "show", "--base", str(tmp_path / "config.json"), "--format", "json"])
    assert only_base.exit_code == 0 and json.loads(only_base.stdout)["num_layers"] == 2


@pytest.mark.parametrize(
    "args, code, text",
    [
        (["schemas", "show"], 2, "Give a schema family or preset"),
        # A name that is no family, preset, path or Hub id is a usage error, as for --base everywhere.
        (["schemas", "show", "no-such-thing"], 2, "'no-such-thing' is not a schema family or a preset name"),
        (["schemas", "show", "./no/such/folder"], 2, "'./no/such/folder' is not a schema family or a preset name"),
        (["schemas", "show", "deepseek-v3", "--base", "llama-3.1-8b"], 2, "cannot be combined with --base"),
    ],
)
def test_show_errors(args, code, text):
    result = runner.invoke(app, args)
    assert result.exit_code == code, result.output
    assert text in result.stderr
    assert "Error:" in result.stderr and "Hint:" in result.stderr


@pytest.mark.parametrize("target", ["nosuch", "./no/such/folder"])
def test_show_of_an_unknown_name_speaks_of_schema_names(target):
    """ARCH_OR_PRESET is not --base: the message names the argument and `schemas list`, never --base."""
    result = runner.invoke(app, ["schemas", "show", target])
    assert result.exit_code == 2, result.output
    assert "--base" not in result.stderr, result.stderr
    assert "`lora-convert schemas list`" in result.stderr.split("Hint:")[1], result.stderr


def test_show_says_when_a_preset_stands_in_for_an_unreachable_hub_id(monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors as hub_errors

    def offline(*args, **kwargs):
        raise hub_errors.LocalEntryNotFoundError("not in the cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setattr("lora_convert.io.source.hub_unreachable", lambda *a, **k: "no connection (test)")
    result = runner.invoke(app, ["schemas", "show", "deepseek-ai/DeepSeek-V3"])
    assert result.exit_code == 0, result.output
    assert "note: the shipped preset deepseek-v3 is used: the Hub was unreachable for 'deepseek-ai/DeepSeek-V3'" in (
        result.stdout
    ), result.stdout
    named = runner.invoke(app, ["schemas", "show", "deepseek-v3"])
    assert named.exit_code == 0 and "note:" not in named.stdout
