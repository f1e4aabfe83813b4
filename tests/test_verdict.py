"""The verdict says what was checked: `shapes.unchecked`, `--allow-unchecked`, the checks lists, and the exit codes
of `--base` and of the Hub (usage 2, environment 3, one attempt when nothing answers)."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from helpers import write_adapter
from lora_convert.check.validate import CHECK_NAMES
from lora_convert.cli import app
from lora_convert.pipeline.commands import validate

H, HEADS, KV, HD, LAYERS = 16, 4, 1, 4, 2
LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": H,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV,
    "head_dim": HD,
    "intermediate_size": 32,
    "num_hidden_layers": LAYERS,
    "vocab_size": 100,
    "tie_word_embeddings": False,
    "rms_norm_eps": 1e-6,
}
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tiny-deepseek-v3"


def tensors(q_out: int = HEADS * HD) -> dict:
    """q_proj and v_proj LoRA on every layer; `q_out` other than 16 makes q's B the wrong shape for LLAMA."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for layer in range(LAYERS):
        for module, rows in (("q_proj", q_out), ("v_proj", KV * HD)):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            out[f"{prefix}.lora_A.weight"] = torch.randn(4, H, generator=g) / math.sqrt(H)
            out[f"{prefix}.lora_B.weight"] = torch.randn(rows, 4, generator=g) * 0.01
    return out


@pytest.fixture
def base_dir(tmp_path):
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA))
    return folder


@pytest.fixture
def adapter(tmp_path):
    return write_adapter(tmp_path / "ad", tensors(), {"target_modules": ["q_proj", "v_proj"]})


@pytest.fixture
def broken_adapter(tmp_path):
    """q_proj B has 20 rows where the base has 16: only the shape check can see that."""
    return write_adapter(tmp_path / "broken", tensors(q_out=20), {"target_modules": ["q_proj", "v_proj"]})


def invoke(*args):
    return CliRunner().invoke(app, [*map(str, args)])


def findings_by_code(doc: dict) -> dict:
    return {f["code"]: f for f in doc["findings"]}


# ------------------------------------------------------------------------------------------ shapes.unchecked
def test_no_base_is_an_error_not_ok(broken_adapter):
    result = invoke("validate", broken_adapter, "--no-smoke")
    assert result.exit_code == 1, result.output
    assert "shapes.unchecked" in result.stdout
    verdict = result.stdout.strip().splitlines()[-1]
    assert verdict.startswith("FAIL (errors): ") and "(not checked against a base model)" in verdict
    assert "Not run: shapes (no --base, and adapter_config.json names no base model)" in verdict


def test_no_base_library_report_keeps_base_unresolved_and_adds_the_error(adapter):
    report = validate(adapter, smoke=False)
    found = {f.code: f for f in report.findings}
    assert not report.ok
    assert found["shapes.unchecked"].severity.value == "error"
    assert "--base" in found["shapes.unchecked"].fix and "lora-convert schemas list" in found["shapes.unchecked"].fix
    # The existing finding still says what was skipped.
    assert found["base.unresolved"].severity.value == "warning"
    assert "Skipped: the shape check" in found["base.unresolved"].message
    assert "shapes" not in report.summary["checks"]["run"] and "shapes" in report.summary["checks"]["skipped"]


def test_unresolvable_implicit_base_is_unchecked(tmp_path):
    folder = write_adapter(
        tmp_path / "ad",
        tensors(),
        {"target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": str(tmp_path / "gone" / "base")},
    )
    doc = json.loads(invoke("validate", folder, "--no-smoke", "--format", "json").stdout)
    found = findings_by_code(doc)
    assert doc["ok"] is False
    assert found["shapes.unchecked"]["severity"] == "error"
    assert "could not be resolved" in found["shapes.unchecked"]["message"]
    assert found["base.unresolved"]["severity"] == "warning"


def test_implicit_hub_base_offline_is_unchecked_not_a_crash(tmp_path):
    # conftest sets HF_HUB_OFFLINE=1: an uncached implicit Hub base cannot resolve.
    folder = write_adapter(
        tmp_path / "ad",
        tensors(),
        {"target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "some-org/uncached-base"},
    )
    result = invoke("validate", folder, "--no-smoke", "--format", "json", "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 1, result.output
    found = findings_by_code(json.loads(result.stdout))
    assert found["shapes.unchecked"]["severity"] == "error"
    assert "not in the local Hugging Face cache" in found["base.unresolved"]["message"]


def test_family_without_schema_is_unchecked(tmp_path, broken_adapter):
    base = tmp_path / "mystery"
    base.mkdir()
    (base / "config.json").write_text(
        json.dumps({**LLAMA, "model_type": "mystery-lm", "architectures": ["MysteryForCausalLM"]})
    )
    result = invoke("validate", broken_adapter, "--base", base, "--no-smoke", "--format", "json")
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)
    found = findings_by_code(doc)
    assert found["shapes.unchecked"]["severity"] == "error"
    assert "no schema for model_type 'mystery-lm'" in found["shapes.unchecked"]["message"]
    assert "add a schema" in found["shapes.unchecked"]["fix"].lower()
    assert found["base.unsupported"]["severity"] == "warning"
    assert doc["base"] == str(base)
    assert doc["summary"]["checks"]["skipped"]["shapes"] == "no schema for model_type 'mystery-lm'"


def test_allow_unchecked_makes_it_a_warning(broken_adapter):
    result = invoke("validate", broken_adapter, "--no-smoke", "--allow-unchecked", "--format", "json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["ok"] is True and doc["allow_unchecked"] is True
    assert findings_by_code(doc)["shapes.unchecked-allowed"]["severity"] == "warning"
    assert "shapes.unchecked" not in findings_by_code(doc)
    assert "accepted with --allow-unchecked" in doc["summary"]["checks"]["skipped"]["shapes"]
    assert doc["verdict"].startswith("OK: ") and "Not run: shapes (" in doc["verdict"]
    # A warning still fails under --strict.
    assert invoke("validate", broken_adapter, "--no-smoke", "--allow-unchecked", "--strict").exit_code == 1


def test_allow_unchecked_in_the_library(adapter):
    report = validate(adapter, smoke=False, allow_unchecked=True)
    assert report.ok and report.allow_unchecked
    assert [f.severity.value for f in report.findings if f.code == "shapes.unchecked-allowed"] == ["warning"]
    assert "shapes.unchecked" not in {f.code for f in report.findings}


def test_a_real_base_finds_what_unchecked_would_have_hidden(broken_adapter, base_dir):
    result = invoke("validate", broken_adapter, "--base", base_dir, "--no-smoke", "--format", "json")
    assert result.exit_code == 1
    codes = set(findings_by_code(json.loads(result.stdout)))
    assert "shapes.out-features" in codes and "shapes.unchecked" not in codes


def test_github_format_annotates_and_prints_the_verdict(broken_adapter):
    result = invoke("validate", broken_adapter, "--no-smoke", "--format", "github")
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert any(line.startswith("::error title=shapes.unchecked") for line in lines)
    assert lines[-1].startswith("lora-convert validate: FAIL (errors): ")
    assert "Checked: config, keys, pairs, moe, data." in lines[-1] and "Not run: shapes (" in lines[-1]


def test_stacked_output_keeps_its_own_shape_check(tmp_path):
    out = tmp_path / "stacked"
    made = invoke("normalize", EXAMPLE / "adapter", "--base", EXAMPLE / "base", "-o", out)
    assert made.exit_code == 0, made.output
    result = invoke("validate", out, "--no-smoke", "--format", "json")
    doc = json.loads(result.stdout)
    assert "shapes" in doc["summary"]["checks"]["run"]
    assert "shapes.unchecked" not in findings_by_code(doc)


# -------------------------------------------------------------------------------------- engine-rules.unchecked
@pytest.fixture
def stacked_output(tmp_path):
    """The example normalized to the stacked layout: the engine's module-group rules cannot plan it."""
    out = tmp_path / "stacked"
    made = invoke("normalize", EXAMPLE / "adapter", "--base", EXAMPLE / "base", "-o", out)
    assert made.exit_code == 0, made.output
    return out


def test_engine_rules_not_evaluated_are_an_error_not_ok(stacked_output):
    """The issue: `OK ... engine sglang: 0 error(s)` and `Not run: engine (...)` in one report."""
    result = invoke("validate", stacked_output, "--base", EXAMPLE / "base", "--engine", "sglang", "--no-smoke")
    assert result.exit_code == 1, result.output
    verdict = result.stdout.strip().splitlines()[-1]
    assert verdict.startswith("FAIL (errors): ") and "Not run: " in verdict and " engine (" in verdict
    assert "engine-rules.unchecked" in result.stdout
    doc = json.loads(
        invoke(
            "validate", stacked_output, "--base", EXAMPLE / "base", "--engine", "sglang", "--no-smoke", "-f", "json"
        ).stdout
    )
    found = findings_by_code(doc)
    assert doc["ok"] is False and found["engine-rules.unchecked"]["severity"] == "error"
    gap = found["engine-rules.unchecked"]
    assert "sglang" in gap["message"] and "--allow-unchecked" in gap["fix"] and "--layout sglang" in gap["fix"]
    assert "engine" in doc["summary"]["checks"]["skipped"] and "engine" not in doc["summary"]["checks"]["run"]
    # the rules that could be evaluated are still reported
    assert "engine.sglang.kv-b-proj" in found


def test_allow_unchecked_makes_the_engine_gap_a_warning(stacked_output):
    args = ["validate", stacked_output, "--base", EXAMPLE / "base", "--engine", "sglang", "--no-smoke"]
    result = invoke(*args, "--allow-unchecked", "-f", "json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    found = findings_by_code(doc)
    assert found["engine-rules.unchecked-allowed"]["severity"] == "warning" and "engine-rules.unchecked" not in found
    assert doc["verdict"].startswith("OK: ") and "accepted with --allow-unchecked" in doc["verdict"]
    assert invoke(*args, "--allow-unchecked", "--strict").exit_code == 1


def test_engine_without_a_base_is_unchecked_like_the_shapes(adapter):
    """One mechanism: every check that was asked for and could not run is `<check>.unchecked`."""
    report = validate(adapter, engine="sglang", smoke=False)
    found = {f.code: f for f in report.findings}
    assert not report.ok
    assert found["shapes.unchecked"].severity.value == found["engine-rules.unchecked"].severity.value == "error"
    assert "--base" in found["engine-rules.unchecked"].fix
    allowed = validate(adapter, engine="sglang", smoke=False, allow_unchecked=True)
    codes = {f.code: f.severity.value for f in allowed.findings}
    assert allowed.ok and codes["engine-rules.unchecked-allowed"] == codes["shapes.unchecked-allowed"] == "warning"


def test_an_ok_verdict_never_has_a_check_that_was_asked_for_and_not_run(adapter, base_dir, stacked_output):
    """Whatever the adapter: OK, and a check in `Not run` that the caller did not turn off, never come together."""
    chosen = ("--no-smoke", "--engine none", "no --tp/--ep", "--no-data")
    runs = [
        validate(adapter, engine="sglang", smoke=False),
        validate(adapter, base=str(base_dir), engine="sglang", smoke=False),
        validate(stacked_output, base=str(EXAMPLE / "base"), engine="sglang", smoke=False),
        validate(stacked_output, base=str(EXAMPLE / "base"), engine="vllm", smoke=False),
    ]
    for report in runs:
        not_run = {k: v for k, v in report.summary["checks"]["skipped"].items() if v not in chosen}
        if report.ok:
            assert not not_run, (report.adapter, report.verdict())
        gaps = [f for f in report.findings if f.code.endswith((".unchecked", ".unchecked-allowed"))]
        assert len(gaps) == len(not_run), (report.adapter, report.verdict())


# ------------------------------------------------------------------------------------------- checks listed
def test_verdict_and_summary_list_the_checks(adapter, base_dir):
    result = invoke("validate", adapter, "--base", base_dir, "--no-smoke")
    assert result.exit_code == 0, result.output
    verdict = result.stdout.strip().splitlines()[-1]
    assert verdict == (
        f"OK: {adapter} against {base_dir}: 0 error(s), 0 warning(s), 0 note(s). "
        "Checked: config, keys, pairs, shapes, moe, data. "
        "Not run: sharding (no --tp/--ep), smoke (--no-smoke), engine (--engine none)."
    )


@pytest.mark.parametrize(
    "extra, ran, not_run",
    [
        ((), ["config", "keys", "pairs", "shapes", "moe", "data"], ["sharding", "smoke", "engine"]),
        (
            ("--tp", "2", "--engine", "sglang", "--no-data"),
            ["config", "keys", "pairs", "shapes", "moe", "sharding", "engine"],
            ["data", "smoke"],
        ),
    ],
)
def test_json_summary_checks_are_accurate(adapter, base_dir, extra, ran, not_run):
    doc = json.loads(invoke("validate", adapter, "--base", base_dir, "--no-smoke", "--format", "json", *extra).stdout)
    checks = doc["summary"]["checks"]
    assert checks["run"] == ran
    assert list(checks["skipped"]) == not_run
    assert set(checks["run"]) | set(checks["skipped"]) == set(CHECK_NAMES)
    assert doc["verdict"].endswith("Not run: " + ", ".join(f"{c} ({checks['skipped'][c]})" for c in not_run) + ".")


def test_smoke_that_ran_is_listed(adapter, base_dir):
    report = validate(adapter, base=str(base_dir), smoke=True, device="cpu")
    assert "smoke" in report.summary["checks"]["run"], report.summary["checks"]
    assert "smoke" not in report.summary["checks"]["skipped"]


# ------------------------------------------------------------------------------------------- exit codes
@pytest.mark.parametrize("base", ["/nonexistent", "./missing", "./missing/config.json", "no-such-preset"])
@pytest.mark.parametrize("command", ["validate", "normalize", "smoke"])
def test_a_base_that_names_nothing_is_a_usage_error(tmp_path, adapter, command, base, monkeypatch):
    monkeypatch.chdir(tmp_path)
    extra = ["-o", tmp_path / "out"] if command == "normalize" else []
    result = invoke(command, adapter, "--base", base, *extra)
    assert result.exit_code == 2, result.output
    assert "Error:" in result.stderr and "Traceback" not in result.output
    assert "lora-convert schemas list" in result.stderr


def test_offline_uncached_hub_base_is_an_environment_problem(tmp_path, adapter):
    # conftest sets HF_HUB_OFFLINE=1; the cache folder is empty.
    result = invoke("validate", adapter, "--base", "some-org/uncached-model", "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 3, result.output
    assert "not in the local Hugging Face cache" in result.stderr
    assert "local folder" in result.stderr and "lora-convert schemas list" in result.stderr


def test_offline_uncached_hub_adapter_is_an_environment_problem(tmp_path):
    result = invoke("validate", "some-org/uncached-adapter", "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 3, result.output
    assert "local folder" in result.stderr


# ------------------------------------------------------------------------------ no network: one attempt
class DroppingServer:
    """A local listener that reads each request line and hangs up without answering (what huggingface_hub treats
    as a network error worth retrying)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(32)
        self.port = self.sock.getsockname()[1]
        self.requests: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    line = conn.recv(4096).split(b"\r\n", 1)[0].decode("latin-1")
                except OSError:
                    line = "<no request>"
                self.requests.append(line)

    def close(self) -> None:
        self.sock.close()


def run_cli_without_network(args: list, endpoint: str, home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1")
    code = "import sys; from lora_convert.cli._app import main; sys.argv = ['lora-convert', *sys.argv[1:]]; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    "what, args, path",
    [
        (
            "base",
            ["validate", EXAMPLE / "adapter", "--base", "some-org/some-model", "--no-smoke"],
            "/some-org/some-model/resolve/main/config.json",
        ),
        (
            "adapter",
            ["validate", "some-org/some-adapter", "--no-smoke"],
            "/some-org/some-adapter/resolve/main/adapter_config.json",
        ),
    ],
)
@pytest.mark.slow
def test_no_network_asks_the_hub_once(tmp_path, what, args, path):
    server = DroppingServer()
    try:
        result = run_cli_without_network(args, f"http://127.0.0.1:{server.port}", tmp_path / "hf")
    finally:
        server.close()
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr and "Retrying" not in result.stderr
    assert "the Hub cannot be reached" in result.stderr and "local folder" in result.stderr
    asked = [r for r in server.requests if path in r]
    assert len(asked) == 1, server.requests
    # Nothing else was retried either (huggingface_hub may make one unrelated registry lookup per process).
    assert len(server.requests) == len(set(server.requests)), server.requests


@pytest.mark.slow
def test_closed_port_fails_at_once_with_exit_3(tmp_path):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now: every connection is refused
    result = run_cli_without_network(
        ["validate", EXAMPLE / "adapter", "--base", "some-org/some-model", "--no-smoke"],
        f"http://127.0.0.1:{port}",
        tmp_path / "hf",
    )
    assert result.returncode == 3, result.stderr
    assert "Retrying" not in result.stderr
    assert "lora-convert schemas list" in result.stderr


def test_a_check_subset_names_the_rest_as_not_selected():
    root = EXAMPLE
    report = validate(root / "adapter", base=str(root / "base"), checks=("config", "shapes"), smoke=False)
    checks = report.summary["checks"]
    assert checks["run"] == ["config", "shapes"]
    assert {name for name, why in checks["skipped"].items() if why == "not selected by --checks"} == set(
        CHECK_NAMES
    ) - {"config", "shapes"}
    from lora_convert.errors import UsageError

    with pytest.raises(UsageError, match="nope"):
        validate(root / "adapter", base=str(root / "base"), checks=("config", "nope"))


# -------------------------------------------------------------------------------------------- smoke.unchecked
def smoke_findings(doc: dict) -> list[tuple[str, str]]:
    return [(f["code"], f["severity"]) for f in doc["findings"] if f["code"].startswith("smoke.")]


def test_smoke_asked_for_and_not_run_is_an_error_not_ok(stacked_output):
    """--smoke on a stacked output (validate does not know the adapter it came from): the forward pass that was asked
    for did not run, so the verdict cannot be OK; --allow-unchecked makes it a warning, which --strict still fails."""
    args = ["validate", stacked_output, "--base", EXAMPLE / "base", "--no-data", "--smoke"]
    result = invoke(*args, "-f", "json")
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)
    assert doc["ok"] is False and smoke_findings(doc) == [("smoke.unchecked", "error")]
    gap = findings_by_code(doc)["smoke.unchecked"]
    assert "--original" in gap["fix"] and "--allow-unchecked" in gap["fix"]
    assert doc["summary"]["checks"]["skipped"]["smoke"] == "stacked output"
    assert doc["verdict"].startswith("FAIL (errors): ") and "smoke (stacked output)" in doc["verdict"]

    allowed = invoke(*args, "--allow-unchecked", "-f", "json")
    assert allowed.exit_code == 0, allowed.output
    doc = json.loads(allowed.stdout)
    assert smoke_findings(doc) == [("smoke.unchecked-allowed", "warning")]
    assert doc["summary"]["checks"]["skipped"]["smoke"] == "stacked output; accepted with --allow-unchecked"
    assert invoke(*args, "--allow-unchecked", "--strict").exit_code == 1
    # By default (no --smoke) a smoke forward that cannot run is the note it always was.
    default = json.loads(invoke(*args[:-1], "-f", "json").stdout)
    assert smoke_findings(default) == [("smoke.skipped", "info")] and default["ok"] is True


def test_smoke_asked_for_without_a_base_is_unchecked_like_the_shapes(adapter):
    report = validate(adapter, smoke=True, data_scan=False)
    codes = {f.code: f.severity.value for f in report.findings}
    assert codes["smoke.unchecked"] == codes["shapes.unchecked"] == "error"
    allowed = validate(adapter, smoke=True, data_scan=False, allow_unchecked=True)
    codes = {f.code: f.severity.value for f in allowed.findings}
    assert allowed.ok and codes["smoke.unchecked-allowed"] == codes["shapes.unchecked-allowed"] == "warning"


@pytest.fixture
def without_smoke_extra(monkeypatch):
    """torch and triton look absent (lora-convert decides with importlib.util.find_spec)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("torch", "triton") else real(name, *a)
    )


def test_smoke_asked_for_on_a_machine_that_cannot_run_it(adapter, base_dir, without_smoke_extra):
    """The machine cannot run the forward pass (the [smoke] extra is missing): exit 3 with the install command, as
    the README's exit-code table says; with --allow-unchecked the warning smoke.unchecked-allowed and a full report."""
    args = ["validate", adapter, "--base", base_dir, "--smoke"]
    refused = invoke(*args)
    assert refused.exit_code == 3 and "pip install 'lora-convert[smoke]'" in refused.stderr, refused.output
    allowed = invoke(*args, "--allow-unchecked", "-f", "json")
    assert allowed.exit_code == 0, allowed.output
    doc = json.loads(allowed.stdout)
    assert smoke_findings(doc) == [("smoke.unchecked-allowed", "warning")]
    assert "pip install 'lora-convert[smoke]'" in findings_by_code(doc)["smoke.unchecked-allowed"]["fix"]
    assert doc["summary"]["checks"]["skipped"]["smoke"] == (
        "torch not installed: pip install 'lora-convert[smoke]'; accepted with --allow-unchecked"
    )
    assert "shapes" in doc["summary"]["checks"]["run"]  # the other checks still ran and are reported
    # The default smoke is still the note the light install (pre-commit hook, Action) relies on.
    default = json.loads(invoke(*args[:-1], "-f", "json").stdout)
    assert smoke_findings(default) == [("smoke.not-installed", "info")] and default["ok"] is True


def test_smoke_asked_for_on_cuda_without_a_cuda_device(adapter, base_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = ["validate", adapter, "--base", base_dir, "--no-data", "--smoke", "--device", "cuda"]
    refused = invoke(*args)
    assert refused.exit_code == 3 and "CUDA" in refused.stderr, refused.output
    allowed = invoke(*args, "--allow-unchecked", "-f", "json")
    assert allowed.exit_code == 0, allowed.output
    doc = json.loads(allowed.stdout)
    assert smoke_findings(doc) == [("smoke.unchecked-allowed", "warning")]
    assert "CUDA" in findings_by_code(doc)["smoke.unchecked-allowed"]["message"]


def test_no_ok_verdict_with_a_smoke_that_was_asked_for_and_not_run(adapter, base_dir, stacked_output):
    """Whatever stopped it (no base, a stacked output, the errors found before it), a smoke forward asked for and not
    run leaves the report failing and names itself in `Not run`."""
    runs = [
        validate(adapter, smoke=True, data_scan=False),
        validate(stacked_output, base=str(EXAMPLE / "base"), smoke=True, data_scan=False),
        validate(adapter, base=str(EXAMPLE / "base"), smoke=True, data_scan=False),  # not its base: errors
    ]
    for report in runs:
        assert "smoke" in report.summary["checks"]["skipped"], report.verdict()
        assert not report.ok and "smoke.unchecked" in {f.code for f in report.findings}, report.verdict()
