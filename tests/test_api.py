"""The public Python API (docs/api.md): str and pathlib.Path arguments, the documented result objects, typed
errors for bad input, a cheap `import lora_convert`, and the examples of docs/api.md run as written."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lora_convert
from lora_convert.errors import AdapterNotFoundError, EnvironmentProblem, UsageError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "tiny-deepseek-v3"
ADAPTER = EXAMPLE / "adapter"
BASE = EXAMPLE / "base"


def _forms(path: Path):
    """The same path as a str and as a pathlib.Path."""
    return [str(path), path]


# ------------------------------------------------------------------------------------------------- the names
def test_public_names_are_functions_not_submodules():
    from lora_convert import inspect_adapter, normalize_adapter, validate_adapter

    assert callable(inspect_adapter) and callable(validate_adapter) and callable(normalize_adapter)
    # importing the submodules of the same stem must not shadow the API functions
    import lora_convert.check.validate  # noqa: F401
    import lora_convert.convert.normalize  # noqa: F401
    import lora_convert.pipeline.inspect_report  # noqa: F401

    assert lora_convert.normalize_adapter is normalize_adapter
    assert lora_convert.ValidationReport is lora_convert.check.validate.ValidationReport
    assert lora_convert.NormalizeResult is lora_convert.convert.normalize.NormalizeResult
    assert {"inspect_adapter", "validate_adapter", "normalize_adapter"} <= set(dir(lora_convert))
    assert lora_convert.__version__ == "0.2.0"


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError):
        lora_convert.no_such_function  # noqa: B018


def test_import_is_cheap_in_a_fresh_interpreter():
    code = (
        "import sys, json, lora_convert\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'triton') or m in "
        "('lora_convert.api', 'lora_convert.check.validate', 'lora_convert.convert.normalize', 'lora_convert.peft.adapter')]\n"
        "print(json.dumps(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert json.loads(out.stdout) == []


def test_first_use_of_the_api_still_does_not_import_torch():
    # resolving the name loads lora_convert.api, which itself must stay light
    code = (
        "import sys, lora_convert\nlora_convert.normalize_adapter\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'triton')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------------------------- inspect
@pytest.mark.parametrize("adapter", _forms(ADAPTER), ids=["str", "Path"])
def test_inspect_adapter(adapter):
    info = lora_convert.inspect_adapter(adapter)
    assert isinstance(info, lora_convert.InspectResult)
    assert info.adapter == str(ADAPTER)
    assert info.origin == "local"
    assert info.module_count == len(info.modules) > 0
    assert info.config["r"] == json.loads((ADAPTER / "adapter_config.json").read_text())["r"]
    assert info.expert_layout == "fused-3d"
    assert info.ok
    doc = info.to_json()
    assert doc["schema_version"] == 1 and doc["module_count"] == info.module_count
    doc["module_count"] = -1  # a copy: the result is not changed through it
    assert info.to_json()["module_count"] == info.module_count


def test_inspect_adapter_reports_an_invalid_config_without_raising(tmp_path):
    adapter = shutil.copytree(ADAPTER, tmp_path / "adapter")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["r"] = 0
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    info = lora_convert.inspect_adapter(adapter)
    assert not info.ok
    assert info.config["valid"] is False and "r" in info.config["invalid_fields"]
    assert info.config["r"] is None  # not a value invented from the tensors
    assert info.module_count > 0  # the tensors are still listed


def test_inspect_result_matches_the_cli_json():
    from typer.testing import CliRunner

    from lora_convert.cli import app

    cli = CliRunner().invoke(app, ["inspect", str(ADAPTER), "--format", "json"])
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.stdout) == lora_convert.inspect_adapter(ADAPTER).to_json()


# ---------------------------------------------------------------------------------------------- validate
@pytest.mark.parametrize("form", [0, 1], ids=["str", "Path"])
def test_validate_adapter(form):
    report = lora_convert.validate_adapter(_forms(ADAPTER)[form], base=_forms(BASE)[form], smoke=False)
    assert isinstance(report, lora_convert.ValidationReport)
    assert report.ok, report.verdict()
    assert report.base is not None
    assert "shapes" in report.summary["checks"]["run"]
    assert report.to_json()["ok"] is True


def test_validate_adapter_reports_engine_errors_as_findings():
    report = lora_convert.validate_adapter(ADAPTER, base=BASE, engine="sglang", smoke=False, data_scan=False)
    assert not report.ok
    assert any(f.code.startswith("engine.sglang.") for f in report.errors)


@pytest.mark.parametrize("allow_unchecked", [False, True])
def test_validate_adapter_passes_allow_unchecked_through(allow_unchecked):
    report = lora_convert.validate_adapter(ADAPTER, smoke=False, data_scan=False, allow_unchecked=allow_unchecked)
    assert report.allow_unchecked is allow_unchecked
    assert report.ok is allow_unchecked  # without a base the shapes are unchecked: an error unless allowed
    assert "shapes" not in report.summary["checks"]["run"]


# --------------------------------------------------------------------------------------------- normalize
@pytest.mark.parametrize("form", [0, 1], ids=["str", "Path"])
def test_normalize_adapter(form, tmp_path):
    out = tmp_path / "out"
    result = lora_convert.normalize_adapter(_forms(ADAPTER)[form], _forms(out)[form], base=_forms(BASE)[form])
    assert isinstance(result, lora_convert.NormalizeResult)
    assert Path(result.output) == out
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert result.summary_json()["groups"] == len(result.plan.groups) > 0
    # the output is an adapter the API can read back
    assert lora_convert.inspect_adapter(out).stacked


@pytest.mark.parametrize("layout", ["sglang", "peft", "STACKED"])
def test_normalize_adapter_dry_run_needs_no_output(layout, tmp_path):
    result = lora_convert.normalize_adapter(ADAPTER, base=BASE, layout=layout, dry_run=True)
    assert result.output is None
    assert result.layout == layout.lower()


class _Recorder:
    def __init__(self):
        self.total = None
        self.advanced = []

    def start(self, total_bytes):
        self.total = total_bytes

    def advance(self, nbytes):
        self.advanced.append(nbytes)


@pytest.mark.parametrize("layout", ["stacked", "peft"])
def test_normalize_adapter_reports_progress_in_bytes(layout, tmp_path):
    progress = _Recorder()
    result = lora_convert.normalize_adapter(ADAPTER, tmp_path / "out", base=BASE, layout=layout, progress=progress)
    assert progress.total == result.bytes_out > 0
    assert sum(progress.advanced) == progress.total


def test_normalize_adapter_never_writes_into_its_input(tmp_path):
    adapter = shutil.copytree(ADAPTER, tmp_path / "adapter")
    before = {p.name: p.read_bytes() for p in adapter.iterdir()}
    for out in (adapter, adapter / "sub", tmp_path):
        with pytest.raises(UsageError):
            lora_convert.normalize_adapter(adapter, out, base=BASE, force=True)
    assert {p.name: p.read_bytes() for p in adapter.iterdir()} == before


# --------------------------------------------------------------------------------------- typed bad input
@pytest.mark.parametrize(
    "call",
    [
        lambda out: lora_convert.normalize_adapter(ADAPTER, out, base=BASE, layout="fused"),
        lambda out: lora_convert.normalize_adapter(ADAPTER, out, base=BASE, dtype="int8"),
        lambda out: lora_convert.normalize_adapter(ADAPTER, out, base=BASE, rank=0),
        lambda out: lora_convert.normalize_adapter(ADAPTER, out, base=BASE, rank=True),
        lambda out: lora_convert.normalize_adapter(ADAPTER, out, base=BASE, rank="8"),
        lambda out: lora_convert.normalize_adapter(ADAPTER, base=BASE),  # no output, no dry run
        lambda out: lora_convert.normalize_adapter(ADAPTER, 42, base=BASE),
        lambda out: lora_convert.normalize_adapter(ADAPTER, out, base=BASE, progress=lambda group, nbytes: None),
        lambda out: lora_convert.validate_adapter(ADAPTER, base=BASE, engine="tgi"),
        lambda out: lora_convert.validate_adapter(ADAPTER, base=BASE, device="tpu"),
        lambda out: lora_convert.validate_adapter(ADAPTER, base=BASE, tp=0),
        lambda out: lora_convert.validate_adapter(ADAPTER, base=3.5),
        lambda out: lora_convert.inspect_adapter(None),
        lambda out: lora_convert.inspect_adapter(b"examples"),
    ],
    ids=[
        "layout",
        "dtype",
        "rank-0",
        "rank-bool",
        "rank-str",
        "no-output",
        "output-int",
        "progress-callable",
        "engine",
        "device",
        "tp",
        "base-float",
        "adapter-none",
        "adapter-bytes",
    ],
)
def test_bad_arguments_raise_usage_error_and_write_nothing(call, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UsageError) as info:
        call(out)
    assert info.value.exit_code == 2 and info.value.message
    assert not out.exists()


@pytest.mark.parametrize("function", ["inspect_adapter", "validate_adapter", "normalize_adapter"])
def test_missing_adapter_folder(function, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(AdapterNotFoundError):
        getattr(lora_convert, function)(str(missing), *([tmp_path / "o"] if function == "normalize_adapter" else []))


def test_a_path_object_is_never_taken_for_a_hub_id(tmp_path, monkeypatch):
    # "org/name" as a str is a Hub id; as a Path that does not exist it is a missing folder, with no Hub access
    import lora_convert.io.source as source

    fetched = []

    def fake_download(spec, repo_id, revision, **kw):
        fetched.append(repo_id)
        raise EnvironmentProblem("offline in this test")

    monkeypatch.setattr(source, "download_adapter", fake_download)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AdapterNotFoundError):
        lora_convert.inspect_adapter(Path("org/name"))
    assert fetched == []
    with pytest.raises(EnvironmentProblem):
        lora_convert.inspect_adapter("org/name")
    assert fetched == ["org/name"]


def test_library_errors_are_typed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(UsageError):  # an output folder in the way
        lora_convert.normalize_adapter(ADAPTER, out, base=BASE)
    assert (out / "keep.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------- docs/api.md examples
def _python_blocks() -> list[str]:
    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_docs_have_an_example_per_function():
    blocks = _python_blocks()
    assert len(blocks) >= 3
    for name in ("inspect_adapter", "validate_adapter", "normalize_adapter"):
        assert any(f"lora_convert.{name}(" in b for b in blocks), name


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_docs_example_runs(index, tmp_path):
    # The examples are written to run from a checkout's root: give them one with the example adapter only.
    shutil.copytree(EXAMPLE, tmp_path / "examples" / "tiny-deepseek-v3")
    code = _python_blocks()[index]
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"example {index} failed:\n{code}\n--- stderr:\n{run.stderr}"


@pytest.mark.parametrize(
    "function, argv",
    [
        ("inspect_adapter", ["inspect", str(ADAPTER)]),
        ("validate_adapter", ["validate", str(ADAPTER), "--base", str(BASE), "--no-smoke"]),
        ("normalize_adapter", ["normalize", str(ADAPTER), "--base", str(BASE), "--dry-run"]),
    ],
)
def test_cli_commands_call_the_api(function, argv, monkeypatch):
    """The CLI is a thin shell over the public API: each command makes exactly one call to its API function."""
    from typer.testing import CliRunner

    import lora_convert.api as api
    from lora_convert.cli import app

    calls = []
    real = getattr(api, function)
    monkeypatch.setattr(api, function, lambda *a, **k: calls.append(a) or real(*a, **k))
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert len(calls) == 1
