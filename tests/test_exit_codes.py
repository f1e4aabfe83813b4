"""The README's exit-code table, row by row, through the installed console script (`lora-convert` next to the
interpreter that runs the tests), for every command a row applies to.

| 0 | ok (warnings allowed unless --strict) | 1 | the adapter has errors | 2 | usage error | 3 | environment problem |
| 4 | internal error: a bug in lora-convert | 141 | stdout closed by its reader (`| head`) |

Every failure that is not a report of findings prints `Error: ...` first on stderr, then `Hint: ...`, and never a
traceback. Each test runs in an empty working folder with an empty, offline Hugging Face cache.

`cli` starts the console script in a fresh process (what a user runs; the environment rows need a fresh
process, as huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when it is imported); `fast` invokes the same
application in this process (typer's CliRunner) for the many variants of a row, to keep the file quick.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny-deepseek-v3"
ADAPTER = str(EXAMPLE / "adapter")
BASE = str(EXAMPLE / "base")
UNCACHED_HUB_ID = "lora-convert-tests/not-in-any-cache"


def _console_script() -> list[str]:
    script = Path(sys.executable).with_name("lora-convert")
    return [str(script)] if script.exists() else [sys.executable, "-m", "lora_convert"]


@pytest.fixture
def cli(tmp_path):
    hf_home = tmp_path / "hf-home"
    hf_home.mkdir()
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("LORA_CONVERT_DEBUG", "HF_TOKEN", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT")
    }
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1")
    workdir = tmp_path / "work"
    workdir.mkdir()

    def run(*args) -> subprocess.CompletedProcess:
        return subprocess.run(
            _console_script() + [str(a) for a in args],
            cwd=workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    run.workdir = workdir
    run.env = env
    return run


@pytest.fixture
def fast(cli, monkeypatch):
    from typer.testing import CliRunner

    from lora_convert.cli import app

    monkeypatch.chdir(cli.workdir)
    monkeypatch.delenv("LORA_CONVERT_DEBUG", raising=False)

    def run(*args) -> subprocess.CompletedProcess:
        result = CliRunner().invoke(app, [str(a) for a in args])
        escaped = result.exception if not isinstance(result.exception, SystemExit) else None
        assert escaped is None, f"an exception escaped the CLI: {escaped!r}"
        return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)

    run.workdir = cli.workdir
    return run


def assert_error(result: subprocess.CompletedProcess, code: int, *words: str) -> None:
    """An error exit: the code, `Error:` first on stderr, a `Hint:`, no traceback anywhere."""
    shown = f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == code, shown
    assert result.stderr.startswith("Error:"), shown
    assert "\nHint:" in result.stderr, shown
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, shown
    for word in words:
        assert word in result.stderr, (word, shown)


def assert_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr and "Error:" not in result.stderr, result.stderr


def adapter_copy(tmp_path: Path, mutate=None, name: str = "adapter") -> str:
    folder = tmp_path / name
    shutil.copytree(ADAPTER, folder)
    if mutate is not None:
        path = folder / "adapter_config.json"
        path.write_text(json.dumps(mutate(json.loads(path.read_text()))))
    return str(folder)


def _without_peft_type(cfg: dict) -> dict:
    cfg.pop("peft_type")  # a warning (config.peft-type-assumed): PEFT assumes LORA
    return cfg


# ------------------------------------------------------------------------------------------------ 0: ok
@pytest.mark.slow
def test_0_inspect(cli):
    assert_ok(cli("inspect", ADAPTER))
    result = cli("inspect", ADAPTER, "--format", "json")
    assert_ok(result)
    assert json.loads(result.stdout)["ok"] is True


def test_0_inspect_with_a_warning(fast, tmp_path):
    result = fast("inspect", adapter_copy(tmp_path, _without_peft_type), "--format", "json")
    assert_ok(result)
    assert "warning" in {f["severity"] for f in json.loads(result.stdout)["findings"]}


@pytest.mark.slow
def test_0_validate(cli):
    result = cli("validate", ADAPTER, "--base", BASE, "--no-smoke", "--format", "json")
    assert_ok(result)
    assert json.loads(result.stdout)["ok"] is True


def test_0_validate_warnings_allowed_unless_strict(fast, tmp_path):
    folder = adapter_copy(tmp_path, _without_peft_type)
    result = fast("validate", folder, "--base", BASE, "--no-smoke", "--format", "json")
    assert_ok(result)
    doc = json.loads(result.stdout)
    assert doc["ok"] is True and "config.peft-type-assumed" in {
        f["code"] for f in doc["findings"] if f["severity"] == "warning"
    }
    strict = fast("validate", folder, "--base", BASE, "--no-smoke", "--strict", "--format", "json")
    assert strict.returncode == 1, strict.stdout + strict.stderr
    assert json.loads(strict.stdout)["ok"] is False and "Traceback" not in strict.stderr


@pytest.mark.slow
def test_0_normalize(cli):
    assert_ok(cli("normalize", ADAPTER, "--base", BASE, "-o", "out"))
    assert (cli.workdir / "out" / "lora_layout.json").is_file()


@pytest.mark.parametrize("layout", ["sglang", "peft"])
def test_0_normalize_engine_layouts(fast, layout):
    assert_ok(fast("normalize", ADAPTER, "--base", BASE, "--layout", layout, "-o", "out"))
    assert (fast.workdir / "out" / "adapter_config.json").is_file()


@pytest.mark.slow
def test_0_smoke_on_the_cpu(cli):
    assert_ok(cli("smoke", ADAPTER, "--base", BASE, "--device", "cpu"))


@pytest.mark.slow
def test_0_schemas_list(cli):
    assert_ok(cli("schemas", "list"))


@pytest.mark.parametrize(
    "args", [["show", "deepseek_v3"], ["show", "deepseek-v3"], ["show", "--base", BASE], ["check"]]
)
def test_0_schemas(fast, args):
    assert_ok(fast("schemas", *args))


def test_0_version(cli):
    assert_ok(cli("--version"))


@pytest.mark.parametrize("args", [["--help"], ["inspect", "--help"], ["schemas", "show", "--help"]])
def test_0_help(fast, args):
    assert_ok(fast(*args))


# ---------------------------------------------------------------------------------- 1: the adapter has errors
BAD_CONFIGS = {
    "array": lambda cfg: [1, 2],
    "r-zero": lambda cfg: {**cfg, "r": 0},
    "r-string": lambda cfg: {**cfg, "r": "8"},
    "targets-number": lambda cfg: {**cfg, "target_modules": 5},
}


@pytest.mark.slow
def test_1_bad_config_through_the_script(cli, tmp_path):
    folder = adapter_copy(tmp_path, BAD_CONFIGS["r-string"])
    assert_error(cli("inspect", folder), 1, "adapter_config.json is invalid", "`r`")
    result = cli("validate", folder, "--base", BASE, "--format", "json")
    assert result.returncode == 1 and "config.wrong-type" in {f["code"] for f in json.loads(result.stdout)["findings"]}
    assert_error(cli("normalize", folder, "--base", BASE, "-o", "out"), 1, "`r`")
    assert_error(cli("smoke", folder, "--base", BASE, "--device", "cpu"), 1, "`r`")


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_1_inspect_bad_config(fast, tmp_path, name):
    assert_error(fast("inspect", adapter_copy(tmp_path, BAD_CONFIGS[name])), 1, "adapter_config.json is invalid")


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_1_validate_bad_config(fast, tmp_path, name):
    result = fast("validate", adapter_copy(tmp_path, BAD_CONFIGS[name]), "--base", BASE, "--format", "json")
    assert result.returncode == 1, result.stdout + result.stderr
    doc = json.loads(result.stdout)
    assert doc["ok"] is False and "Traceback" not in result.stderr
    assert any(f["code"].startswith("config.") for f in doc["findings"] if f["severity"] == "error")


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_1_normalize_bad_config(fast, tmp_path, name):
    assert_error(
        fast("normalize", adapter_copy(tmp_path, BAD_CONFIGS[name]), "--base", BASE, "-o", "out"),
        1,
        "adapter_config.json",
    )
    assert not (fast.workdir / "out").exists()


def test_1_inspect_and_validate_tensor_errors(fast, tmp_path):
    folder = adapter_copy(tmp_path, lambda cfg: {**cfg, "r": 4})  # the tensors have rank 8 (and 12, 4 by pattern)
    assert_error(fast("inspect", folder), 1, "rank.config-mismatch")
    result = fast("validate", folder, "--base", BASE, "--format", "json")
    assert result.returncode == 1 and "rank.config-mismatch" in {
        f["code"] for f in json.loads(result.stdout)["findings"]
    }


def test_1_normalize_refuses_modules(fast, tmp_path):
    """A whole-module weight (modules_to_save) is not LoRA: normalize refuses unless --drop-unsupported."""
    import numpy as np
    from safetensors.numpy import load_file, save_file

    folder = Path(adapter_copy(tmp_path))
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    tensors["base_model.model.lm_head.weight"] = np.zeros((4, 4), dtype=np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    assert_error(fast("normalize", folder, "--base", BASE, "-o", "out"), 1, "cannot be converted", "lm_head")
    assert not (fast.workdir / "out").exists()
    assert_ok(fast("normalize", folder, "--base", BASE, "-o", "out", "--drop-unsupported"))


# ------------------------------------------------------------------------------------------------ 2: usage
COMMANDS = {
    "inspect": ["inspect", ADAPTER],
    "validate": ["validate", ADAPTER, "--base", BASE],
    "normalize": ["normalize", ADAPTER, "--base", BASE, "-o", "out"],
    "smoke": ["smoke", ADAPTER, "--base", BASE, "--device", "cpu"],
    "schemas list": ["schemas", "list"],
    "schemas show": ["schemas", "show", "deepseek-v3"],
    "schemas check": ["schemas", "check"],
    "report": ["report", "scan.jsonl", "--html", "fleet.html"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_2_unknown_flag(cli, name):
    assert_error(cli(*COMMANDS[name], "--no-such-flag"), 2, "--no-such-flag", "--help")


@pytest.mark.slow
@pytest.mark.parametrize("args", [["no-such-command"], ["schemas", "no-such-command"]])
def test_2_unknown_command(cli, args):
    assert_error(cli(*args), 2, "no-such-command")


@pytest.mark.parametrize("args", [[], ["schemas"]])
def test_2_no_arguments_prints_the_help(cli, args):
    """A group called without a command prints its help on stdout and exits 2, with nothing on stderr."""
    result = cli(*args)
    assert result.returncode == 2, result
    assert f"Usage: lora-convert {' '.join(args)}".rstrip() in result.stdout and "Commands" in result.stdout, result
    assert result.stderr == "", result


def test_cli_imports_no_private_modules_of_other_packages():
    """Typer's and click's underscore modules are no API; a typer release may move them (cli/_app.py)."""
    import ast

    cli_dir = Path(__file__).resolve().parent.parent / "lora_convert" / "cli"
    private = []
    for path in sorted(cli_dir.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] != "lora_convert" and any(p.startswith("_") and not p.endswith("__") for p in parts):
                    private.append(f"{path.name}: {name}")
    assert private == []


@pytest.mark.slow
@pytest.mark.parametrize("command", ["inspect", "validate", "normalize", "smoke"])
def test_2_missing_adapter_argument(cli, command):
    assert_error(cli(command), 2, "ADAPTER")


@pytest.mark.parametrize("command", ["inspect", "validate", "normalize", "smoke"])
def test_2_missing_path(fast, command):
    args = {"normalize": ["-o", "out"], "validate": ["--base", BASE], "smoke": ["--base", BASE]}.get(command, [])
    assert_error(fast(command, "./no/such/adapter", *args), 2, "no/such/adapter")


@pytest.mark.parametrize("command", ["inspect", "validate", "normalize", "smoke"])
@pytest.mark.parametrize("hub_id", ["org/na me", "org/name@", "org--x/name"])
def test_2_malformed_hub_id(fast, command, hub_id):
    args = {"normalize": ["-o", "out"], "validate": ["--base", BASE], "smoke": ["--base", BASE]}.get(command, [])
    assert_error(fast(command, hub_id, *args), 2, hub_id)


@pytest.mark.slow
def test_2_output_folder_in_the_way(cli):
    bystander = cli.workdir / "out" / "notes.txt"
    bystander.parent.mkdir()
    bystander.write_text("keep me")
    assert_error(cli("normalize", ADAPTER, "--base", BASE, "-o", "out"), 2, "out")
    assert bystander.read_text() == "keep me" and sorted(p.name for p in bystander.parent.iterdir()) == ["notes.txt"]


def test_2_normalize_without_output(fast):
    assert_error(fast("normalize", ADAPTER, "--base", BASE), 2, "-o")


@pytest.mark.parametrize(
    "args, words",
    [
        (["normalize", ADAPTER, "--base", BASE, "-o", "out", "--rank", "0"], ["--rank"]),
        (["normalize", ADAPTER, "--base", BASE, "-o", "out", "--rank", "2"], ["--rank 2"]),  # below the adapter's rank
        (["normalize", ADAPTER, "--base", BASE, "-o", "out", "--layout", "nope"], ["--layout"]),
        (["validate", ADAPTER, "--base", BASE, "--tp", "0"], ["--tp"]),
        (["validate", ADAPTER, "--base", BASE, "--engine", "nope"], ["--engine"]),
        (["smoke", ADAPTER, "--base", BASE, "--tokens", "0"], ["--tokens"]),
        (["smoke", ADAPTER, "--base", BASE, "--layers", "nope"], ["--layers"]),
        (["smoke", ADAPTER, "--base", BASE, "--layers", "99"], ["--layers"]),  # past the base's last layer
        (
            ["smoke", ADAPTER, "--base", BASE, "--original", ADAPTER],
            ["--original"],
        ),  # --original is for stacked outputs
        (["inspect", ADAPTER, "--format", "xml"], ["--format"]),
        (["schemas", "show"], ["ARCH_OR_PRESET"]),
    ],
)
def test_2_bad_values(fast, args, words):
    assert_error(fast(*args), 2, *words)
    assert not (fast.workdir / "out").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["validate", ADAPTER, "--no-smoke"],
        ["normalize", ADAPTER, "-o", "out"],
        ["smoke", ADAPTER, "--device", "cpu"],
        ["schemas", "show"],
    ],
)
def test_2_missing_base_path(fast, args):
    """An explicit --base that does not exist is a usage error, like any other missing path."""
    assert_error(fast(*args, "--base", "/nonexistent/base"), 2, "/nonexistent/base")


def test_2_schemas_show_of_nothing_known(fast):
    assert_error(fast("schemas", "show", "no-such-family-or-preset"), 2, "no-such-family-or-preset")


# ----------------------------------------------------------------------------------------- 3: environment
def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.parametrize(
    "args",
    [
        ["smoke", ADAPTER, "--base", BASE, "--device", "cuda"],
        ["validate", ADAPTER, "--base", BASE, "--smoke", "--device", "cuda"],
    ],
)
@pytest.mark.slow
def test_3_no_cuda_for_device_cuda(cli, args):
    if _has_cuda():
        pytest.skip("this row is about a machine without CUDA")
    assert_error(cli(*args), 3, "CUDA")


@pytest.fixture
def without_smoke_extra(monkeypatch):
    """torch and triton look uninstalled to lora-convert, which decides with importlib.util.find_spec (a light
    install end to end, with the packages really absent, is tests/test_light_install.py)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("torch", "triton") else real(name, *a)
    )


@pytest.mark.parametrize(
    "args",
    [
        ["smoke", ADAPTER, "--base", BASE],
        ["smoke", ADAPTER, "--base", BASE, "--device", "cpu"],
        ["validate", ADAPTER, "--base", BASE, "--smoke"],
    ],
)
def test_3_smoke_extra_not_installed(fast, without_smoke_extra, args):
    assert_error(fast(*args), 3, "torch", "pip install 'lora-convert[smoke]'")


def test_0_validate_without_the_smoke_extra(fast, without_smoke_extra):
    """Plain validate does not need the extra: the smoke forward that did not run is a note."""
    result = fast("validate", ADAPTER, "--base", BASE, "--format", "json")
    assert_ok(result)
    doc = json.loads(result.stdout)
    assert [f["code"] for f in doc["findings"] if f["code"].startswith("smoke.")] == ["smoke.not-installed"]


@pytest.mark.slow
@pytest.mark.parametrize("command", ["inspect", "validate", "normalize", "smoke"])
def test_3_hub_adapter_not_cached_offline(cli, command):
    args = {"normalize": ["--base", BASE, "-o", "out"], "validate": ["--base", BASE], "smoke": ["--base", BASE]}.get(
        command, []
    )
    assert_error(cli(command, UNCACHED_HUB_ID, *args), 3, UNCACHED_HUB_ID)


@pytest.mark.parametrize(
    "args",
    [
        ["validate", ADAPTER, "--no-smoke"],
        ["normalize", ADAPTER, "-o", "out"],
        ["smoke", ADAPTER, "--device", "cpu"],
        ["schemas", "show"],
    ],
)
@pytest.mark.slow
def test_3_hub_base_not_cached_offline(cli, args):
    assert_error(cli(*args, "--base", UNCACHED_HUB_ID), 3, UNCACHED_HUB_ID)


# ------------------------------------------ validate without a resolvable base: shapes unchecked is an error
def test_1_validate_without_base_is_unchecked(fast):
    result = fast("validate", ADAPTER, "--no-smoke", "--format", "json")
    assert result.returncode == 1, result.stdout + result.stderr
    doc = json.loads(result.stdout)
    assert "shapes.unchecked" in {f["code"] for f in doc["findings"] if f["severity"] == "error"}


def test_0_validate_without_base_allowed_unchecked(fast):
    result = fast("validate", ADAPTER, "--no-smoke", "--allow-unchecked", "--format", "json")
    assert_ok(result)
    doc = json.loads(result.stdout)
    assert "shapes.unchecked-allowed" in {f["code"] for f in doc["findings"] if f["severity"] == "warning"}


# ---------------------------------------- validate --engine whose rules could not be evaluated: an error, like shapes
def test_1_validate_engine_rules_not_evaluated(fast, tmp_path):
    stacked = tmp_path / "stacked"
    assert_ok(fast("normalize", ADAPTER, "--base", BASE, "-o", stacked))
    args = ("validate", stacked, "--base", BASE, "--engine", "sglang", "--no-smoke", "--format", "json")
    result = fast(*args)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "engine-rules.unchecked" in {f["code"] for f in json.loads(result.stdout)["findings"]}
    allowed = fast(*args, "--allow-unchecked")
    assert_ok(allowed)
    assert "engine-rules.unchecked-allowed" in {f["code"] for f in json.loads(allowed.stdout)["findings"]}


# -------------------------------------------------------------------------- 4: internal error (a bug in lora-convert)
@pytest.mark.parametrize(
    "command, target, args",
    [
        ("validate", "lora_convert.api.validate_adapter", ["--base", BASE]),
        ("inspect", "lora_convert.api.inspect_adapter", []),
        ("normalize", "lora_convert.api.normalize_adapter", ["--base", BASE, "-o", "out"]),
    ],
)
@pytest.mark.parametrize("raised", [RuntimeError("unexpected state"), MemoryError()])
def test_4_internal_error(fast, monkeypatch, command, target, args, raised):
    """A bug is exit 4, never 1 (which says the adapter has errors), and the message says it is a bug to report."""

    def broken(*args, **kwargs):
        raise raised

    monkeypatch.setattr(target, broken)
    result = fast(command, ADAPTER, *args)
    assert_error(result, 4, "Internal error", "bug in lora-convert", "LORA_CONVERT_DEBUG=1", "report")
    assert not (fast.workdir / "out").exists()


def test_4_an_unregistered_finding_code_is_a_bug(fast, monkeypatch):
    from lora_convert.check import keys

    def unregistered(adapter):
        from lora_convert.codes import finding

        return [finding("keys.no-such-code", "a check that reports a code nobody registered")]

    monkeypatch.setattr(keys, "key_findings", unregistered)
    result = fast("validate", ADAPTER, "--base", BASE, "--no-smoke")
    assert_error(result, 4, "keys.no-such-code", "not registered", "bug in lora-convert")


# ---------------------------------------------------------------- 141: stdout closed by its reader (`| head`)
# What a shell reports for a program killed by SIGPIPE (128 + 13): a reader that stopped reading is neither a
# verdict on the adapter (1) nor a bug (4), and the program stops quietly, without a message or a traceback.
EXIT_OUTPUT_CLOSED = 141
WRITES_TO_STDOUT = {
    "validate": ["validate", ADAPTER, "--base", BASE, "--no-smoke"],
    "validate with errors": ["validate", ADAPTER, "--no-smoke"],  # exit 1 when read: shapes.unchecked
    "validate json": ["validate", ADAPTER, "--base", BASE, "--no-smoke", "--format", "json"],
    "validate github": ["validate", ADAPTER, "--base", BASE, "--no-smoke", "--format", "github"],
    "inspect": ["inspect", ADAPTER],
    "inspect json": ["inspect", ADAPTER, "--format", "json"],
    "normalize": ["normalize", ADAPTER, "--base", BASE, "-o", "out"],
    "normalize dry run": ["normalize", ADAPTER, "--base", BASE, "--dry-run"],
    "normalize json": ["normalize", ADAPTER, "--base", BASE, "--dry-run", "--format", "json"],
    "smoke": ["smoke", ADAPTER, "--base", BASE, "--device", "cpu"],
    "scan": ["scan", ADAPTER, "--base", BASE, "--no-smoke", "-o", "report.jsonl"],
    "schemas list": ["schemas", "list"],
    "schemas show": ["schemas", "show", "deepseek-v3"],
    "schemas check": ["schemas", "check"],
    "version": ["--version"],
    "help": ["--help"],
    "command help": ["validate", "--help"],
}


def assert_closed_quietly(result: subprocess.CompletedProcess) -> None:
    shown = f"exit {result.returncode}\nstderr:\n{result.stderr}"
    assert result.returncode == EXIT_OUTPUT_CLOSED, shown
    for word in ("Traceback", "Error:", "Exception ignored", "BrokenPipe"):
        assert word not in result.stderr, shown


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(WRITES_TO_STDOUT))
def test_141_stdout_whose_reader_is_gone(cli, name):
    """stdout is a pipe whose read end is closed, as `| head` leaves it once head has exited: every write fails."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            _console_script() + WRITES_TO_STDOUT[name],
            cwd=cli.workdir,
            env=cli.env,
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
    finally:
        os.close(write_end)
    assert_closed_quietly(result)


@pytest.mark.slow
def test_141_validate_piped_into_head(cli):
    """The report's first line is printed before the checks run; `head -1` exits after it, and the rest of the
    report meets a closed pipe (the issue's `lora-convert validate ... | head`). Eight copies of the adapter keep
    the validator writing for seconds after its first line, so even a head scheduled late on a loaded machine has
    closed the pipe before the last report is written."""
    copies = [str(shutil.copytree(ADAPTER, Path(cli.workdir) / f"adapter-{i}")) for i in range(8)]
    command = " ".join(shlex.quote(a) for a in _console_script() + ["validate", *copies, "--base", BASE])
    result = subprocess.run(
        ["bash", "-c", f"{command} | head -1; exit ${{PIPESTATUS[0]}}"],
        cwd=cli.workdir,
        env=cli.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.stdout == f"{copies[0]}  base: {BASE}\n", result.stdout
    assert_closed_quietly(result)


@pytest.mark.parametrize(
    "args, valid",
    [
        (
            ["normalize", ADAPTER, "--base", BASE, "-o", "out", "--layout", "fused"],
            "stacked, peft, mlx, gguf, sglang, vllm",
        ),
        (["scan", ADAPTER, "--normalize", "out", "--layout", "fused"], "stacked, peft, mlx, gguf, sglang, vllm"),
        (["validate", ADAPTER, "--base", BASE, "--engine", "fused"], "none, sglang, vllm"),
    ],
)
def test_2_unknown_layout_or_engine_lists_the_valid_names_once(fast, args, valid):
    """One message about the option given (`--layout`, not "Unknown engine"), listing every valid name once."""
    result = fast(*args)
    option = args[-2]
    assert_error(result, 2, f"{option} 'fused'", valid)
    assert result.stderr.count("Use one of") == 1, result.stderr
    assert result.stderr.count(valid) == 1, result.stderr
    assert "Unknown engine" not in result.stderr, result.stderr
    assert not (fast.workdir / "out").exists()
