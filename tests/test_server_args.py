"""The engine server's own flags as input (issue 24, item 2): `validate --engine E --server-args "..."`.

Parsing per release (names, types and defaults from lora_convert/engines/<engine>-server-args.json), each flag's
effect on PEFT-written fixtures (tests/fixtures/data) and on adapters written here, the prediction behind the
engine proofs, the CLI end to end with its exit codes, and the pass-through of the Action and the pre-commit hook.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from helpers import case_base_dir, case_dir, write_adapter
from lora_convert.cli import app
from lora_convert.engines.rules import EngineRelease, releases
from lora_convert.engines.server_args import parse_server_args, release_flags
from lora_convert.errors import UsageError
from lora_convert.pipeline.commands import predict, validate

VLLM_RELEASES = ("0.30.0", "0.31.0", "0.32.0", "0.33.0", "0.34.0")
SGLANG_RELEASES = ("0.5.19", "0.5.20", "0.5.21", "0.5.22", "0.5.23")
LLAMA = "v5_llama"  # PEFT-written: q/k/v/o/gate/up/down on layers 0-1, r=8, float32
EXPERTS = "v5_gpt_oss_experts"  # PEFT-written: attention + 3-D expert LoRA that vLLM loads, r=8


def codes(report) -> list[str]:
    return [f.code for f in report.findings]


def the(report, code: str):
    (found,) = [f for f in report.findings if f.code == code]
    return found


# ------------------------------------------------------------------------------------------------ the data
@pytest.mark.parametrize("version", VLLM_RELEASES)
def test_vllm_flags_per_release(version):
    flags = release_flags(EngineRelease("vllm", version))
    rank = flags["--max-lora-rank"]
    assert rank.default == 16 and rank.choices == (1, 8, 16, 32, 64, 128, 256, 320, 512)
    # 0.30 and 0.31 compare only `r` with the limit; 0.32 on take max(r, rank_pattern) (peft_helper.py)
    assert rank.params["rank_pattern"] is (version >= "0.32.0")
    assert flags["--lora-dtype"].choices == ("auto", "float16", "bfloat16")
    assert flags["--max-loras"].default == 1 and flags["--lora-target-modules"].default is None
    assert flags["--tensor-parallel-size"].aliases == ("-tp",)
    assert ("--max-lora-cls-labels" in flags) is (version != "0.30.0")  # new in 0.31
    for flag in flags.values():  # every citation is of the release itself
        assert flag.source.startswith(f"vllm=={version}: "), (flag.name, flag.source)


@pytest.mark.parametrize("version", SGLANG_RELEASES)
def test_sglang_flags_per_release(version):
    flags = release_flags(EngineRelease("sglang", version))
    assert flags["--max-lora-rank"].default is None  # inferred from the adapters
    assert flags["--lora-backend"].default == "csgmv"
    assert ("triton_v2" in flags["--lora-backend"].choices) is (version == "0.5.23")
    assert "all" in flags["--lora-target-modules"].choices and "qkv_proj" in flags["--lora-target-modules"].choices
    assert flags["--tp-size"].aliases == ("--tensor-parallel-size",)
    for flag in flags.values():
        assert flag.source.startswith(f"sglang=={version}: "), (flag.name, flag.source)


def test_every_described_release_has_its_flags():
    for release in releases():
        assert release_flags(release), release.spec


def test_parsing_defaults_and_forms():
    args = parse_server_args(
        "vllm==0.34.0",
        "vllm serve meta/llama --max-lora-rank=32 --lora-target-modules qkv_proj o_proj --port 8000 "
        "--gpu-memory-utilization 0.9 --fully-sharded-loras -tp 2 --max-lora-rank 64 --no-enable-lora",
    )
    assert args.given == {
        "--max-lora-rank": 64,  # repeated: the last one wins, as argparse does
        "--lora-target-modules": ("qkv_proj", "o_proj"),
        "--fully-sharded-loras": True,
        "--tensor-parallel-size": 2,
        "--enable-lora": False,
    }
    assert args.value("--lora-dtype") == "auto" and args.value("--max-loras") == 1  # the release's defaults
    assert args.tp == 2
    assert args.ignored == ("vllm", "serve", "meta/llama", "--port 8000", "--gpu-memory-utilization 0.9")
    assert parse_server_args("vllm", None) is None
    assert parse_server_args("sglang==0.5.22", "--max-lora-rank 48 --tp-size 4").given == {
        "--max-lora-rank": 48,
        "--tp-size": 4,
    }


@pytest.mark.parametrize(
    ("engine", "flags", "says"),
    [
        ("vllm", "--max-lora-rank 33", "--max-lora-rank expects one of 1, 8, 16, 32, 64, 128, 256, 320, 512, got '33'"),
        ("vllm", "--max-lora-rank x", "expects an integer, got 'x'"),
        ("vllm", "--max-loras 0", "expects a number >= 1, got '0'"),
        ("vllm", "--lora-dtype float32", "expects one of auto, float16, bfloat16, got 'float32'"),
        ("vllm", "--fully-sharded-loras=maybe", "--fully-sharded-loras expects no value"),
        ("vllm", "--lora-target-modules --max-loras 2", "expects one or more names, got 'nothing'"),
        ("sglang==0.5.22", "--lora-backend triton_v2", "got 'triton_v2'"),  # 0.5.23 only
        ("sglang", "--lora-target-modules qkv_proj mlp", "got 'mlp'"),
        ("vllm", "--max-lora-rank 16 'unclosed", "not valid shell words"),
    ],
)
def test_bad_values_are_usage_errors(engine, flags, says):
    with pytest.raises(UsageError) as err:
        parse_server_args(engine, flags)
    assert says in err.value.message and err.value.exit_code == 2
    assert "arg_utils.py" in err.value.message or "sglang/srt" in err.value.message or "shell" in err.value.message


def test_unknown_lora_flag_names_the_known_ones():
    with pytest.raises(UsageError) as err:
        parse_server_args("vllm==0.33.0", "--lora-rank 32")
    assert "--lora-rank is not a LoRA flag of vllm==0.33.0" in err.value.message
    assert "--max-lora-rank" in err.value.message and "--lora-target-modules" in err.value.message
    assert parse_server_args("sglang==0.5.23", "--lora-backend triton_v2").given == {"--lora-backend": "triton_v2"}
    with pytest.raises(UsageError, match="not a LoRA flag of sglang==0.5.23"):
        parse_server_args("sglang", "--max-lora-ranks 8")


def test_file_form(tmp_path):
    path = tmp_path / "vllm-flags.txt"
    path.write_text("# the production server\n--max-lora-rank 64   # rank-64 adapters\n--lora-dtype bfloat16\n")
    args = parse_server_args("vllm", file=path)
    assert args.given == {"--max-lora-rank": 64, "--lora-dtype": "bfloat16"}
    with pytest.raises(UsageError, match="not both"):
        parse_server_args("vllm", "--max-lora-rank 64", path)
    with pytest.raises(UsageError, match="no --engine"):
        parse_server_args("none", file=path)
    with pytest.raises(UsageError):
        parse_server_args("vllm", file=tmp_path / "missing.txt")


# ------------------------------------------------------------------------------------------------ effects
def llama_validate(adapter=None, **kw):
    return validate(
        adapter or case_dir(LLAMA) / "adapter", base=str(case_base_dir(LLAMA)), smoke=False, data_scan=False, **kw
    )


def test_target_modules_drop_what_vllm_does_not_wrap():
    report = llama_validate(engine="vllm", server_args="--lora-target-modules qkv_proj")
    excluded = the(report, "server-args.target-excluded")
    assert "8 module(s) (down_proj, gate_proj, o_proj, up_proj)" in excluded.message
    assert "vllm/lora/utils.py:301" in excluded.message and not report.ok
    predicted = predict("vllm", case_dir(LLAMA) / "adapter", case_base_dir(LLAMA), "--lora-target-modules qkv_proj")
    assert predicted.load_failure == []
    assert {m for m, o in predicted.modules.items() if o == "dropped"} == {
        f"model.layers.{i}.{m}"
        for i in (0, 1)
        for m in ("mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.o_proj")
    }
    # a packed member names its whole packed module (vLLM wraps qkv_proj), and every module listed is served
    predicted = predict("vllm", case_dir(LLAMA) / "adapter", case_base_dir(LLAMA), "--lora-target-modules q_proj")
    assert predicted.modules["model.layers.0.self_attn.v_proj"] == "exact"
    listed = "--lora-target-modules qkv_proj o_proj gate_up_proj down_proj"
    assert set(predict("vllm", case_dir(LLAMA) / "adapter", case_base_dir(LLAMA), listed).modules.values()) == {"exact"}
    assert "server-args.target-excluded" not in codes(llama_validate(engine="vllm", server_args=listed))


def down_proj_only(folder):
    """The PEFT-written Llama adapter's down_proj factors alone (vllm #55193's adapter)."""
    src = case_dir(LLAMA) / "adapter"
    with safe_open(src / "adapter_model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if ".down_proj." in k}  # noqa: SIM118 (no __iter__)
    config = json.loads((src / "adapter_config.json").read_text())
    config["target_modules"] = ["down_proj"]
    return write_adapter(folder, tensors, config)


def test_down_proj_only_adapter_with_qkv_targets_applies_nothing(tmp_path):
    adapter = down_proj_only(tmp_path / "down")
    predicted = predict("vllm", adapter, case_base_dir(LLAMA), "--lora-target-modules qkv_proj")
    assert predicted.load_failure == [] and set(predicted.modules.values()) == {"dropped"}
    assert set(predict("vllm", adapter, case_base_dir(LLAMA)).modules.values()) == {"exact"}  # without the flag
    # SGLang refuses it instead: its targets must include the adapter's (lora_manager.py)
    predicted = predict("sglang", adapter, case_base_dir(LLAMA), "--lora-target-modules qkv_proj")
    assert predicted.load_failure == ["server-args.target-refused"]
    assert predict("sglang", adapter, case_base_dir(LLAMA), "--lora-target-modules all").load_failure == []


def test_sglang_target_modules_are_normalized():
    refused = llama_validate(engine="sglang", server_args="--lora-target-modules qkv_proj")
    assert (
        "down_proj, gate_up_proj, o_proj are not in --lora-target-modules"
        in the(refused, "server-args.target-refused").message
    )
    names = "--lora-target-modules q_proj k_proj v_proj o_proj gate_up_proj down_proj"
    assert "server-args.target-refused" not in codes(llama_validate(engine="sglang", server_args=names))


def rank_64(folder):
    """A rank-64 Llama adapter of the fixture's base (hidden 48, intermediate 72) on down_proj and o_proj."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for layer in (0, 1):
        for name, (out, inp) in {"mlp.down_proj": (48, 72), "self_attn.o_proj": (48, 64)}.items():
            key = f"base_model.model.model.layers.{layer}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(64, inp, generator=g) / 8
            tensors[f"{key}.lora_B.weight"] = torch.randn(out, 64, generator=g) / 100
    return write_adapter(folder, tensors, {"r": 64, "lora_alpha": 64, "target_modules": ["down_proj", "o_proj"]})


def test_rank_above_max_fails_to_load(tmp_path):
    adapter = rank_64(tmp_path / "r64")
    base = case_base_dir(LLAMA)
    # no flags: a server at the defaults (vLLM: --max-lora-rank 16) refuses it; validate says which flag it needs
    assert predict("vllm", adapter, base).load_failure == ["max-lora-rank"]
    plain = llama_validate(adapter, engine="vllm")
    assert "engine.vllm.max-lora-rank" in codes(plain) and plain.ok
    # flags given: the limit is known
    assert predict("vllm", adapter, base, "--max-lora-rank 64").load_failure == []
    assert predict("vllm", adapter, base, "--max-lora-rank 32").load_failure == ["server-args.rank-above-max"]
    assert predict("vllm", adapter, base, "--port 8000").load_failure == ["server-args.rank-above-max"]  # default 16
    failed = llama_validate(adapter, engine="vllm", server_args="--max-lora-rank 32")
    assert not failed.ok and "engine.vllm.max-lora-rank" not in codes(failed)
    found = the(failed, "server-args.rank-above-max")
    assert found.expected == "<= 32" and found.actual == 64 and found.fix.endswith("--max-lora-rank 64")
    assert llama_validate(adapter, engine="vllm", server_args="--max-lora-rank 64").ok
    # SGLang sizes its pool from the adapters unless told
    assert predict("sglang", adapter, base).load_failure == []
    assert predict("sglang", adapter, base, "--max-lora-rank 32").load_failure == ["server-args.rank-above-max"]


def test_rank_pattern_counts_from_vllm_0_32(tmp_path):
    """vLLM 0.32+ compare max(r, rank_pattern) with --max-lora-rank; 0.30/0.31 compare r alone (peft_helper.py)."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (out, inp, rank) in {"mlp.down_proj": (48, 72, 32), "self_attn.o_proj": (48, 64, 8)}.items():
        key = f"base_model.model.model.layers.0.{name}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(rank, inp, generator=g) / 8
        tensors[f"{key}.lora_B.weight"] = torch.randn(out, rank, generator=g) / 100
    config = {"r": 8, "lora_alpha": 8, "target_modules": ["down_proj", "o_proj"], "rank_pattern": {"down_proj": 32}}
    adapter = write_adapter(tmp_path / "pattern", tensors, config)
    flags = "--max-lora-rank 16"
    for version in VLLM_RELEASES:
        expected = ["server-args.rank-above-max"] if version >= "0.32.0" else []
        assert predict(f"vllm=={version}", adapter, case_base_dir(LLAMA), flags).load_failure == expected, version


def test_lora_dtype_and_multi_adapter_flags_are_notes():
    report = llama_validate(engine="vllm", server_args="--lora-dtype float16 --max-loras 4 --port 1")
    assert report.ok
    assert "float32 factors are rounded to float16" in the(report, "server-args.lora-dtype").message
    note = the(report, "server-args.flags").message
    assert "--max-loras only matter when several adapters share the server" in note
    assert "Ignored (not about LoRA): --port 1." in note
    assert "server-args.lora-dtype" not in codes(llama_validate(engine="vllm", server_args="--lora-dtype auto"))
    base = case_base_dir(LLAMA)
    assert predict("vllm", case_dir(LLAMA) / "adapter", base, "--lora-dtype float16 --max-loras 4").load_failure == []


def test_fully_sharded_loras_needs_a_rank_the_tp_size_divides():
    adapter, base = case_dir(EXPERTS) / "adapter", case_base_dir(EXPERTS)
    assert predict("vllm", adapter, base, "-tp 3").load_failure == []
    assert predict("vllm", adapter, base, "-tp 2 --fully-sharded-loras").load_failure == []  # r=8
    assert predict("vllm", adapter, base, "-tp 3 --fully-sharded-loras").load_failure == ["server-args.sharded-rank"]


def test_tensor_parallel_size_is_the_sharding_checks():
    report = llama_validate(engine="vllm", server_args="--tensor-parallel-size 3")
    assert "sharding" in report.summary["checks"]["run"]
    assert any(c.startswith("sharding.") for c in codes(report))  # 4 heads over 3 ranks
    assert "sharding" not in llama_validate(engine="vllm").summary["checks"]["run"]
    with pytest.raises(UsageError, match="--tp 2 and the server's tensor-parallel size 3 differ"):
        llama_validate(engine="vllm", tp=2, server_args="-tp 3")


def test_lora_turned_off_loads_nothing():
    base = case_base_dir(LLAMA)
    assert predict("vllm", case_dir(LLAMA) / "adapter", base, "--no-enable-lora").load_failure == [
        "server-args.lora-disabled"
    ]
    assert predict("sglang", case_dir(LLAMA) / "adapter", base, "--enable-lora").load_failure == []


def test_unmodelled_flags_are_a_warning():
    report = llama_validate(engine="vllm", server_args="--enable-tower-connector-lora")
    assert the(report, "server-args.unmodelled").severity.value == "warning"
    assert "server-args.unmodelled" not in codes(llama_validate(engine="vllm", server_args="--max-loras 2"))


# ------------------------------------------------------------------------------------------------ the CLI
def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def test_validate_cli_end_to_end(tmp_path):
    adapter, base = str(case_dir(LLAMA) / "adapter"), str(case_base_dir(LLAMA))
    common = ["validate", adapter, "--base", base, "--no-smoke", "--no-data", "--engine", "vllm", "--format", "json"]
    ok = cli(*common, "--server-args", "--max-lora-rank 32 --port 8000")
    assert ok.exit_code == 0, ok.output
    report = json.loads(ok.stdout)
    (note,) = [f for f in report["findings"] if f["code"] == "server-args.flags"]
    assert "given --max-lora-rank 32" in note["message"] and "--port 8000" in note["message"]
    dropped = cli(*common, "--server-args", "--lora-target-modules qkv_proj")
    assert dropped.exit_code == 1 and "server-args.target-excluded" in dropped.stdout
    bad = cli(*common, "--server-args", "--max-lora-rank 33")
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    unknown = cli(*common, "--server-args", "--lora-rank 8")
    assert unknown.exit_code == 2 and "--max-lora-rank" in unknown.output
    flags = tmp_path / "flags.txt"
    flags.write_text("--lora-target-modules qkv_proj  # attention only\n")
    from_file = cli(*common, "--server-args-file", str(flags))
    assert from_file.exit_code == 1 and "server-args.target-excluded" in from_file.stdout
    no_engine = cli("validate", adapter, "--base", base, "--no-smoke", "--server-args", "--max-lora-rank 32")
    assert no_engine.exit_code == 2 and "no --engine" in no_engine.output


def test_scan_cli_passes_the_flags(tmp_path):
    source = tmp_path / "registry"
    shutil.copytree(case_dir(LLAMA) / "adapter", source / "llama")
    out = tmp_path / "scan.jsonl"
    args = ["scan", str(source), "--base", str(case_base_dir(LLAMA)), "--engine", "vllm", "--no-data", "-o", str(out)]
    result = cli(*args, "--server-args", "--lora-target-modules qkv_proj", "--jobs", "1")
    assert result.exit_code == 1, result.output
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert "server-args.target-excluded" in json.dumps(record)
    bad = cli(*args[:-2], "-o", str(tmp_path / "bad.jsonl"), "--server-args", "--max-lora-rank 33")
    assert bad.exit_code == 2 and not (tmp_path / "bad.jsonl").exists()
    both = cli(*args[:-2], "--engine", "sglang", "--server-args", "--max-lora-rank 32")
    assert both.exit_code == 2 and "several releases" in both.output


# ------------------------------------------------------------------------------------------------ Action and hook
@pytest.mark.slow
def test_action_passes_the_server_flags(tmp_path):
    from test_ci_integration import action, commit, git, run_action, write_base
    from test_ci_integration import write_adapter as write_small

    assert action()["inputs"]["server-args"]["default"] == ""
    assert action()["inputs"]["server-args-file"]["default"] == ""
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    write_base(tmp_path / "base")
    write_small(repo / "adapters" / "a")  # q_proj and v_proj, r=4
    (repo / "vllm-flags.txt").write_text("--lora-target-modules qkv_proj\n")
    commit(repo, "first")
    adapters = {"INPUT_ADAPTERS": "adapters/a", "INPUT_ENGINE": "vllm"}
    assert run_action(repo, tmp_path, **adapters).code == 0
    run = run_action(repo, tmp_path, **adapters, INPUT_SERVER_ARGS="--lora-target-modules o_proj")
    assert run.code == 1 and any("server-args.target-excluded" in a for a in run.annotations("error")), run
    run = run_action(repo, tmp_path, **adapters, INPUT_SERVER_ARGS_FILE="vllm-flags.txt")
    assert run.code == 0 and "server-args.flags" in run.stdout, run
    run = run_action(repo, tmp_path, **adapters, INPUT_SERVER_ARGS="--max-lora-rank 33")
    assert run.code == 2, run


@pytest.mark.slow
def test_pre_commit_hook_passes_the_server_flags(tmp_path):
    from test_ci_integration import env, hook, write_base
    from test_ci_integration import write_adapter as write_small

    base = write_base(tmp_path / "base")
    adapter = write_small(tmp_path / "a", base=base)
    h = hook()
    command = h["entry"].split() + list(h.get("args", [])) + ["--engine", "vllm"]
    files = [str(adapter / "adapter_config.json")]
    ok = subprocess.run(command + files, capture_output=True, text=True, env=env(), timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    flags = ["--server-args", "--lora-target-modules o_proj"]
    dropped = subprocess.run(command + flags + files, capture_output=True, text=True, env=env(), timeout=120)
    assert dropped.returncode == 1 and "server-args.target-excluded" in dropped.stdout, dropped.stdout
