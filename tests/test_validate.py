"""`lora-convert validate`: the library call, exit codes, the JSON document, GitHub annotations, the human table."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lora_convert.cli import app
from lora_convert.pipeline.commands import validate

H, HEADS, KV, HD, LAYERS, VOCAB = 16, 4, 1, 4, 2, 100
BASE_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": H,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV,
    "head_dim": HD,
    "intermediate_size": 32,
    "num_hidden_layers": LAYERS,
    "vocab_size": VOCAB,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-6,
}
OUT = {"q_proj": HEADS * HD, "k_proj": KV * HD, "v_proj": KV * HD, "o_proj": H}
IN = {"q_proj": H, "k_proj": H, "v_proj": H, "o_proj": HEADS * HD}


def key(layer, module, factor, block="self_attn"):
    return f"base_model.model.model.layers.{layer}.{block}.{module}.lora_{factor}.weight"


def llama_tensors(r=4, layers=LAYERS, modules=("q_proj", "v_proj"), seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for layer in range(layers):
        for m in modules:
            out[key(layer, m, "A")] = torch.randn(r, IN[m], generator=g) / math.sqrt(IN[m])
            out[key(layer, m, "B")] = torch.randn(OUT[m], r, generator=g) * 0.01
    return out


@pytest.fixture
def base_dir(tmp_path):
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(BASE_CONFIG))
    return folder


def invoke(*args):
    return CliRunner().invoke(app, ["validate", *map(str, args)])


def doc_of(result):
    return json.loads(result.stdout)


def codes(report_or_doc):
    findings = (
        report_or_doc["findings"] if isinstance(report_or_doc, dict) else [f.to_json() for f in report_or_doc.findings]
    )
    return sorted({f["code"] for f in findings})


# ---- the document --------------------------------------------------------------------------------------------
def test_clean_adapter_json_document(adapter_writer, base_dir):
    folder = adapter_writer(llama_tensors(), {"target_modules": ["q_proj", "v_proj"]})
    result = invoke(folder, "--base", base_dir, "--format", "json", "--no-smoke")
    assert result.exit_code == 0, result.output
    doc = doc_of(result)
    assert set(doc) >= {"ok", "adapter", "base", "findings", "summary", "schema_version", "engine", "verdict"}
    assert doc["ok"] is True and doc["adapter"] == str(folder) and doc["base"]
    assert doc["summary"]["errors"] == 0
    assert "data" in doc["summary"]["checks"]["run"]
    for f in doc["findings"]:
        assert set(f) >= {"code", "severity", "message", "keys", "expected", "actual"}
    assert result.stderr == ""


def test_library_call_matches_cli(adapter_writer, base_dir):
    folder = adapter_writer(llama_tensors(), {"target_modules": ["q_proj", "v_proj"]})
    report = validate(str(folder), base=str(base_dir), smoke=False)
    assert report.ok and report.base and report.summary["adapter"]["modules"] == 4


def test_errors_give_exit_1_and_all_checks_run(adapter_writer, base_dir):
    t = llama_tensors()
    del t[key(0, "v_proj", "B")]  # A without B
    t[key(1, "q_proj", "A")].view(-1)[3] = float("nan")
    t[key(1, "v_proj", "B")].zero_()
    folder = adapter_writer(t, {"target_modules": ["q_proj", "v_proj"], "use_dora": True})
    result = invoke(folder, "--base", base_dir, "--format", "json", "--no-smoke")
    assert result.exit_code == 1
    got = codes(doc_of(result))
    assert {"pairs.missing-B", "data.nan", "data.zero-b", "config.dora"} <= set(got), got
    assert doc_of(result)["ok"] is False


def test_strict_fails_on_warnings(adapter_writer, base_dir):
    t = llama_tensors()
    t[key(1, "v_proj", "B")].zero_()
    folder = adapter_writer(t, {"target_modules": ["q_proj", "v_proj"]})
    assert invoke(folder, "--base", base_dir, "--no-smoke").exit_code == 0
    strict = invoke(folder, "--base", base_dir, "--no-smoke", "--strict", "--format", "json")
    assert strict.exit_code == 1 and doc_of(strict)["ok"] is False


def test_no_data_skips_the_scan(adapter_writer):
    t = llama_tensors()
    t[key(1, "q_proj", "A")].view(-1)[3] = float("nan")
    folder = adapter_writer(t)
    result = invoke(folder, "--no-data", "--no-smoke", "--format", "json")
    doc = doc_of(result)
    assert "data.nan" not in codes(doc) and doc["summary"]["checks"]["skipped"]["data"] == "--no-data"
    assert doc["summary"]["data_scan"] is None


def test_base_unresolved_is_a_warning_that_says_what_was_skipped(adapter_writer):
    folder = adapter_writer(llama_tensors())
    doc = doc_of(invoke(folder, "--no-smoke", "--format", "json"))
    (f,) = [f for f in doc["findings"] if f["code"] == "base.unresolved"]
    assert f["severity"] == "warning" and "--base" in f["fix"] and "Skipped" in f["message"]
    # The shapes it could not check fail the verdict (tests/test_verdict.py has the details).
    assert doc["ok"] is False and doc["base"] is None and "shapes.unchecked" in codes(doc)


def test_unresolvable_implicit_base_is_a_warning(adapter_writer):
    folder = adapter_writer(llama_tensors(), {"base_model_name_or_path": "/nowhere/at/all/model"})
    doc = doc_of(invoke(folder, "--no-smoke", "--format", "json"))
    assert "base.unresolved" in codes(doc)


def test_explicit_base_that_does_not_resolve_is_an_error_message(adapter_writer, tmp_path):
    folder = adapter_writer(llama_tensors())
    result = invoke(folder, "--base", str(tmp_path / "no" / "such" / "base"), "--no-smoke")
    assert result.exit_code == 2 and "Error:" in result.stderr and result.stdout == ""


def test_layers_past_end(adapter_writer, base_dir):
    folder = adapter_writer(llama_tensors(layers=LAYERS + 1))
    doc = doc_of(invoke(folder, "--base", base_dir, "--no-smoke", "--format", "json"))
    (f,) = [f for f in doc["findings"] if f["code"] == "layers.past-end"]
    assert f["severity"] == "error" and any(".layers.2." in k for k in f["keys"])


def test_shape_mismatch_reported_with_expected_and_actual(adapter_writer, base_dir):
    t = llama_tensors()
    t[key(0, "v_proj", "B")] = torch.randn(OUT["v_proj"] * 2, 4) * 0.01
    doc = doc_of(invoke(adapter_writer(t), "--base", base_dir, "--no-smoke", "--format", "json"))
    shape = [f for f in doc["findings"] if f["code"].startswith("shapes.")]
    assert shape, codes(doc)
    assert shape[0]["expected"] != shape[0]["actual"]


def test_key_problems(adapter_writer):
    t = llama_tensors(layers=1)
    t["base_model.model.model.layers.0.self_attn.k_proj.lora_A.default.weight"] = torch.randn(4, H)
    t["base_model.model.model.layers.0.self_attn.k_proj.lora_B.default.weight"] = torch.randn(OUT["k_proj"], 4)
    t["base_model.model.lm_head.weight"] = torch.randn(VOCAB, H)
    t["base_model.model.model.layers.0.weird"] = torch.randn(2)
    doc = doc_of(invoke(adapter_writer(t), "--no-smoke", "--format", "json"))
    assert {"keys.adapter-name-segment", "keys.full-weight", "keys.unparseable"} <= set(codes(doc))


def test_duplicate_across_shards(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]})
    )
    t = llama_tensors(layers=1, modules=("q_proj",))
    save_file(t, str(folder / "adapter_model-00001-of-00002.safetensors"))
    save_file(
        {key(0, "q_proj", "A"): t[key(0, "q_proj", "A")]}, str(folder / "adapter_model-00002-of-00002.safetensors")
    )
    doc = doc_of(invoke(folder, "--no-smoke", "--format", "json"))
    assert "keys.duplicate" in codes(doc)


def test_rank_mismatches(adapter_writer):
    t = llama_tensors(layers=1)
    t[key(0, "q_proj", "B")] = torch.randn(OUT["q_proj"], 3)
    t[key(0, "v_proj", "A")] = torch.randn(6, H)
    t[key(0, "v_proj", "B")] = torch.randn(OUT["v_proj"], 6)
    doc = doc_of(invoke(adapter_writer(t), "--no-smoke", "--format", "json"))
    assert {"rank.a-b-mismatch", "rank.config-mismatch"} <= set(codes(doc))


def test_added_tokens(adapter_writer, base_dir):
    t = llama_tensors(layers=1)
    t["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.randn(4, VOCAB + 3)
    t["base_model.model.model.embed_tokens.lora_embedding_B"] = torch.randn(H, 4)
    folder = adapter_writer(t, {"target_modules": ["q_proj", "v_proj", "embed_tokens"]})
    (folder / "added_tokens.json").write_text(json.dumps({"<a>": VOCAB, "<b>": VOCAB + 1, "<c>": VOCAB + 2}))
    doc = doc_of(invoke(folder, "--base", base_dir, "--no-smoke", "--format", "json"))
    added = [f for f in doc["findings"] if f["code"] == "tokens.added"]
    assert len(added) == 2 and all(f["severity"] == "error" for f in added)
    assert any(f["expected"] == VOCAB and f["actual"] == VOCAB + 3 for f in added)


@pytest.mark.parametrize(
    "field, value, code, severity",
    [
        ("use_qalora", True, "config.unsupported-variant", "error"),
        ("bias", "all", "config.bias", "warning"),
        ("modules_to_save", ["lm_head"], "config.modules-to-save", "warning"),
        ("fan_in_fan_out", True, "config.fan-in-fan-out", "warning"),
        ("trainable_token_indices", [5, 6], "config.trainable-tokens", "warning"),
        ("lora_bias", True, "config.lora-bias", "error"),
    ],
)
def test_config_features(adapter_writer, field, value, code, severity):
    doc = doc_of(
        invoke(adapter_writer(llama_tensors(layers=1), {field: value}), "--no-smoke", "--format", "json", "--no-data")
    )
    assert [f["severity"] for f in doc["findings"] if f["code"] == code] == [severity]


def test_moe_missing_experts_and_projections(adapter_writer):
    g = torch.Generator().manual_seed(1)
    t = {}
    for e in range(4):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            if (e, proj) in ((1, "up_proj"),):
                continue
            t[f"base_model.model.model.layers.0.mlp.experts.{e}.{proj}.lora_A.weight"] = torch.randn(4, H, generator=g)
            t[f"base_model.model.model.layers.0.mlp.experts.{e}.{proj}.lora_B.weight"] = torch.randn(H, 4, generator=g)
    for e in (0, 1, 3):  # layer 1 lacks expert 2
        for proj in ("gate_proj", "up_proj", "down_proj"):
            t[f"base_model.model.model.layers.1.mlp.experts.{e}.{proj}.lora_A.weight"] = torch.randn(4, H, generator=g)
            t[f"base_model.model.model.layers.1.mlp.experts.{e}.{proj}.lora_B.weight"] = torch.randn(H, 4, generator=g)
    doc = doc_of(invoke(adapter_writer(t), "--no-smoke", "--format", "json", "--no-data"))
    got = {f["code"]: f for f in doc["findings"]}
    assert "experts.missing" in got and "2" in got["experts.missing"]["message"]
    assert "experts.missing-projection" in got and "up_proj" in got["experts.missing-projection"]["message"]


def test_sharding(adapter_writer, base_dir):
    folder = adapter_writer(llama_tensors())
    ok = doc_of(invoke(folder, "--base", base_dir, "--tp", "2", "--no-smoke", "--format", "json", "--no-data"))
    assert "sharding.tp" not in codes(ok)
    bad = invoke(folder, "--base", base_dir, "--tp", "8", "--no-smoke", "--format", "json", "--no-data")
    assert bad.exit_code == 1
    msgs = [f["message"] for f in doc_of(bad)["findings"] if f["code"] == "sharding.tp"]
    assert any("num_attention_heads=4" in m for m in msgs) and any(
        "v_proj" in m or "q_proj" in m or "heads" in m for m in msgs
    )
    ep = doc_of(invoke(folder, "--tp", "4", "--ep", "3", "--no-smoke", "--format", "json", "--no-data"))
    assert "sharding.ep" in codes(ep)


def test_smoke_not_run_is_a_note_unless_asked(adapter_writer):
    """Without a base there is no architecture to run the forward with: a note by default, the error smoke.unchecked
    when --smoke asked for the forward pass (a warning with --allow-unchecked), nothing with --no-smoke."""
    folder = adapter_writer(llama_tensors(layers=1))
    default = doc_of(invoke(folder, "--format", "json", "--no-data"))
    asked = doc_of(invoke(folder, "--format", "json", "--no-data", "--smoke"))
    off = doc_of(invoke(folder, "--format", "json", "--no-data", "--no-smoke"))
    smoke = lambda d: [(f["code"], f["severity"]) for f in d["findings"] if f["code"].startswith("smoke.")]  # noqa: E731
    assert smoke(default) == [("smoke.skipped", "info")]
    allowed = doc_of(invoke(folder, "--format", "json", "--no-data", "--smoke", "--allow-unchecked"))
    assert smoke(asked) == [("smoke.unchecked", "error")]
    assert smoke(allowed) == [("smoke.unchecked-allowed", "warning")]
    assert (
        default["summary"]["checks"]["skipped"]["smoke"]
        == asked["summary"]["checks"]["skipped"]["smoke"]
        == "no base architecture"
    )
    assert allowed["summary"]["checks"]["skipped"]["smoke"] == "no base architecture; accepted with --allow-unchecked"
    assert smoke(off) == [] and off["summary"]["checks"]["skipped"]["smoke"] == "--no-smoke"


def test_smoke_without_the_extra(adapter_writer, monkeypatch):
    """Without torch/triton (the [smoke] extra; lora-convert decides with importlib.util.find_spec) the default
    smoke is a note whose "Not run" entry names the install command, --smoke is exit 3, --no-smoke is unchanged."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("torch", "triton") else real(name, *a)
    )
    folder = adapter_writer(llama_tensors(layers=1))
    default = doc_of(invoke(folder, "--format", "json", "--no-data"))
    smoke = [(f["code"], f["severity"]) for f in default["findings"] if f["code"].startswith("smoke.")]
    assert smoke == [("smoke.not-installed", "info")]
    reason = "torch not installed: pip install 'lora-convert[smoke]'"
    assert default["summary"]["checks"]["skipped"]["smoke"] == reason
    assert f"smoke ({reason})" in invoke(folder, "--no-data").stdout
    asked = invoke(folder, "--format", "json", "--no-data", "--smoke")
    assert asked.exit_code == 3 and "pip install 'lora-convert[smoke]'" in asked.stderr, asked.stderr
    off = doc_of(invoke(folder, "--format", "json", "--no-data", "--no-smoke"))
    assert off["summary"]["checks"]["skipped"]["smoke"] == "--no-smoke"
    assert not [f for f in off["findings"] if f["code"].startswith("smoke.")]


# ---- usage errors -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args", [["--engine", "tgi"], ["--tp", "0"], ["--format", "xml"], ["--device", "tpu"], []])
def test_usage_errors_exit_2(adapter_writer, args):
    folder = adapter_writer(llama_tensors(layers=1))
    result = invoke(*([folder] if args else []), *args)
    assert result.exit_code == 2


# ---- formats --------------------------------------------------------------------------------------------------------
def test_github_annotations(adapter_writer, tmp_path, monkeypatch):
    t = llama_tensors(layers=1)
    t[key(0, "q_proj", "A")].view(-1)[0] = float("nan")
    t[key(0, "v_proj", "B")].zero_()
    folder = adapter_writer(t, {"modules_to_save": ["a,b:c%d\ne"]})
    monkeypatch.chdir(tmp_path)
    result = invoke("adapter", "--format", "github", "--no-smoke")
    assert result.exit_code == 1
    lines = result.stdout.strip().splitlines()
    pattern = re.compile(r"^::(error|warning|notice) title=[^,:]+,file=adapter/adapter_config\.json::.+$")
    annotations = [line for line in lines if line.startswith("::")]
    assert annotations and all(pattern.match(line) for line in annotations), annotations
    assert any(line.startswith("::error title=data.nan,") for line in annotations)
    assert any(line.startswith("::warning title=data.zero-b,") for line in annotations)
    mts = next(line for line in annotations if "title=config.modules-to-save" in line)
    assert "%25" in mts and "\n" not in mts  # % escaped in data
    assert lines[-1].startswith("lora-convert validate: FAIL")
    assert folder.exists()


def test_github_escaping_of_properties():
    from lora_convert.cli.validate_cmd import _escape_data, _escape_property

    assert _escape_data("a%b\r\nc") == "a%25b%0D%0Ac"
    assert _escape_property("x:y,z") == "x%3Ay%2Cz"


def test_human_table_and_verdict(adapter_writer, base_dir):
    t = llama_tensors(layers=1)
    t[key(0, "v_proj", "B")].zero_()
    result = invoke(adapter_writer(t), "--base", base_dir, "--no-smoke")
    assert result.exit_code == 0
    out = result.stdout
    assert "data.zero-b" in out and "warning" in out
    assert out.strip().splitlines()[-1].startswith("OK:")
    assert result.stderr == ""


def test_several_adapters_and_config_paths(adapter_writer, base_dir):
    good = adapter_writer(llama_tensors(layers=1), name="good")
    t = llama_tensors(layers=1)
    t[key(0, "q_proj", "A")].view(-1)[0] = float("inf")
    bad = adapter_writer(t, name="bad")
    result = invoke(
        good / "adapter_config.json", bad / "adapter_config.json", "--base", base_dir, "--no-smoke", "--format", "json"
    )
    assert result.exit_code == 1
    doc = doc_of(result)
    assert doc["ok"] is False and [r["ok"] for r in doc["reports"]] == [True, False]
    only_good = invoke(good / "adapter_config.json", "--base", base_dir, "--no-smoke")
    assert only_good.exit_code == 0


def test_one_missing_among_several_keeps_going(adapter_writer, base_dir, tmp_path):
    good = adapter_writer(llama_tensors(layers=1), name="good")
    result = invoke(good, tmp_path / "missing", "--base", base_dir, "--no-smoke", "--format", "json")
    assert result.exit_code == 2
    assert [r["ok"] for r in doc_of(result)["reports"]] == [True]


def test_progress_bar_only_for_large_scans_on_a_terminal():
    from lora_convert.cli.validate_cmd import _ByteProgress

    bar = _ByteProgress()
    bar._enabled = True
    bar(10, 1000)  # small: nothing is started
    assert bar._progress is None
    bar(10, 200 * 1024 * 1024)
    assert bar._progress is not None
    bar.close()
    assert bar._progress is None


def test_progress_callback_gets_every_byte(adapter_writer):
    folder = adapter_writer(llama_tensors())
    seen = []
    report = validate(str(folder), smoke=False, progress=lambda n, total: seen.append((n, total)))
    assert sum(n for n, _ in seen) == report.summary["adapter"]["bytes"] == seen[-1][1]


# ---- codes with one severity each: zero fills of a normalize output, added tokens without a vocab size --------------
def test_zero_fills_of_a_normalize_output_are_their_own_note(tmp_path):
    """An all-zero B the adapter has by accident is the warning data.zero-b; the zero fills normalize wrote on
    purpose (listed in its report) are data.zero-fill, a note: two codes, each with one severity."""
    from pathlib import Path

    from lora_convert.api import normalize_adapter

    example = Path(__file__).resolve().parent.parent / "examples" / "tiny-deepseek-v3"
    out = tmp_path / "out"
    normalize_adapter(example / "adapter", out, base=example / "base", layout="sglang")
    report = validate(str(out), base=str(example / "base"), smoke=False)
    fills = [f for f in report.findings if f.code == "data.zero-fill"]
    assert len(fills) == 1 and fills[0].severity.value == "info" and fills[0].keys
    assert "lora_convert_report.json" in fills[0].message and "data.zero-b" not in report.summary["codes"]
    (out / "lora_convert_report.json").unlink()  # without the report the zeros are unexplained
    again = validate(str(out), base=str(example / "base"), smoke=False)
    assert [f.severity.value for f in again.findings if f.code == "data.zero-b"] == ["warning"]
    assert "data.zero-fill" not in again.summary["codes"]


def test_added_tokens_without_a_vocab_size_are_a_warning(adapter_writer):
    folder = adapter_writer(llama_tensors(layers=1))
    (folder / "added_tokens.json").write_text(json.dumps({"<a>": VOCAB, "<b>": VOCAB + 1}))
    doc = doc_of(invoke(folder, "--no-smoke", "--format", "json", "--allow-unchecked"))
    found = {f["code"]: f["severity"] for f in doc["findings"] if f["code"].startswith("tokens.")}
    assert found == {"tokens.added-unchecked": "warning"}


def test_human_header_names_the_base_given_when_the_adapter_is_unreadable(tmp_path, base_dir):
    """An unreadable adapter stops validate before the base is resolved; the header still shows the --base given,
    not `base: (none)`."""
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{")
    result = invoke(folder, "--base", base_dir, "--no-smoke")
    assert result.exit_code == 1, result.output
    header = result.stdout.splitlines()[0]
    assert f"base: {base_dir}" in header and "(none)" not in header, header
    assert "config.unreadable" in result.stdout
    # and the verdict does not contradict the header: the base was given, the adapter was never checked against it
    assert "(not checked against a base model)" in result.stdout.splitlines()[-1], result.stdout
    without = invoke(folder, "--no-smoke")
    assert "base: (none)" in without.stdout.splitlines()[0], without.stdout


EXAMPLE_ADAPTER = Path(__file__).resolve().parent.parent / "examples" / "tiny-deepseek-v3" / "adapter"


@pytest.fixture
def hub_unreachable(monkeypatch):
    """No network: one failed probe, and huggingface_hub finds nothing in its cache."""
    import huggingface_hub
    from huggingface_hub import errors as hub_errors

    def offline(*args, **kwargs):
        raise hub_errors.LocalEntryNotFoundError("not in the cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setattr("lora_convert.io.source.hub_unreachable", lambda *a, **k: "no connection (test)")


def test_a_preset_standing_in_for_an_unreachable_hub_base_is_a_note(hub_unreachable):
    """docs/validate.md: a shipped preset that lists the unreachable repo id is used instead, with a note."""
    report = validate(str(EXAMPLE_ADAPTER), base="deepseek-ai/DeepSeek-V3", smoke=False, data_scan=False)
    assert report.base == "deepseek-v3"
    [note] = [f for f in report.findings if f.code == "base.preset"]
    assert note.severity.value == "info"
    assert "deepseek-ai/DeepSeek-V3" in note.message and "deepseek-v3" in note.message
    assert "unreachable" in note.message
    human = invoke(EXAMPLE_ADAPTER, "--base", "deepseek-ai/DeepSeek-V3", "--no-smoke", "--no-data")
    assert "base.preset" in human.stdout, human.stdout


def test_a_preset_matched_on_the_adapters_base_model_is_a_note(tmp_path):
    folder = tmp_path / "adapter"
    shutil.copytree(EXAMPLE_ADAPTER, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": "deepseek-ai/DeepSeek-R1"})
    )
    report = validate(str(folder), smoke=False, data_scan=False)
    [note] = [f for f in report.findings if f.code == "base.preset"]
    assert "deepseek-ai/DeepSeek-R1" in note.message and "deepseek-v3" in note.message
    named = validate(str(folder), base="deepseek-v3", smoke=False, data_scan=False)
    assert "base.preset" not in codes(named)  # a preset asked for by name stands in for nothing


@pytest.mark.parametrize(
    "module, expected",
    [
        # A name the layer does not have: the module names of that layer are what is expected.
        ("self_attn.q_proj_extra", "self_attn.q_proj"),
        # A layer stack the schema does not know: its layer stacks are.
        ("decoder.layers.0.self_attn.q_proj", "model.layers.N"),
    ],
)
def test_unknown_module_says_what_is_expected(adapter_writer, base_dir, module, expected):
    tensors = llama_tensors()
    g = torch.Generator().manual_seed(1)
    path = module if module.startswith("decoder.") else f"model.layers.0.{module}"
    tensors[f"base_model.model.{path}.lora_A.weight"] = torch.randn(4, H, generator=g)
    tensors[f"base_model.model.{path}.lora_B.weight"] = torch.randn(H, 4, generator=g)
    folder = adapter_writer(tensors, {"target_modules": ["q_proj", "v_proj"]})
    report = validate(str(folder), base=str(base_dir), smoke=False, data_scan=False)
    [unknown] = [f for f in report.findings if f.code == "modules.unknown"]
    assert unknown.expected, unknown
    assert expected in unknown.expected, unknown.expected
    human = invoke(folder, "--base", base_dir, "--no-smoke", "--no-data")
    [line] = [line.strip() for line in human.stdout.splitlines() if line.strip().startswith("expected:")]
    assert expected in line, line
