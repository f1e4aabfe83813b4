"""Hostile and broken input (issue 4, item 7): each gives a finding or an error message and a non-zero exit code,
never a traceback, never a hang, never a change to the input. How fast each is refused is measured in
bench/hostile_timing.py (timings never appear in tests)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lora_convert.cli import app

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny-deepseek-v3"
CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
KEY_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
KEY_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


def st_bytes(header, data: bytes = b"", *, length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def good_header() -> dict:
    return {
        KEY_A: {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, 128]},
        KEY_B: {"dtype": "F32", "shape": [8, 4], "data_offsets": [128, 256]},
    }


def make(folder: Path, weights: bytes | None, config=CONFIG, *, weights_name="adapter_model.safetensors") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (folder / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if weights is not None:
        (folder / weights_name).write_bytes(weights)
    return folder


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode())
        if p.is_symlink():
            h.update(os.readlink(p).encode())
        elif p.is_file():
            h.update(p.read_bytes())
            h.update(str(p.stat().st_mtime_ns).encode())
    return h.hexdigest()


def run_validate(folder_or_spec, *extra: str, fmt: str = "json"):
    spec = str(folder_or_spec)
    before = digest(Path(spec)) if Path(spec).is_dir() else None
    result = CliRunner().invoke(app, ["validate", spec, "--format", fmt, "--no-smoke", *extra])
    if before is not None:
        assert digest(Path(spec)) == before, "validate changed its input"
    assert "Traceback" not in (result.output or "")
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    return result


def findings_of(result) -> list[str]:
    doc = json.loads(result.stdout)
    return [f["code"] for f in doc["findings"]]


# ---- safetensors files --------------------------------------------------------------------------------------
HOSTILE_FILES = {
    "empty": b"",
    "truncated-prefix": b"\x10\x00\x00",
    "truncated-data": st_bytes(good_header(), b"\x00" * 100),
    "header-longer-than-file": st_bytes(good_header(), b"\x00" * 256, length=10**9),
    "header-not-json": st_bytes(b"{this is not json", b""),
    "header-not-utf8": st_bytes(b"\xff\xfe\xfd", b""),
    "header-a-list": st_bytes([1, 2, 3]),
    "header-a-string": st_bytes("hello"),
    "entry-not-object": st_bytes({KEY_A: [1, 2]}),
    "offsets-overlap": st_bytes(
        {
            KEY_A: {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, 128]},
            KEY_B: {"dtype": "F32", "shape": [8, 4], "data_offsets": [64, 192]},
        },
        b"\x00" * 256,
    ),
    "offsets-past-file": st_bytes(
        {KEY_A: {"dtype": "F32", "shape": [4, 8], "data_offsets": [1000, 1128]}}, b"\x00" * 256
    ),
    "offsets-disagree-with-shape": st_bytes(
        {KEY_A: {"dtype": "F32", "shape": [4, 8], "data_offsets": [0, 64]}}, b"\x00" * 256
    ),
    "offsets-reversed": st_bytes({KEY_A: {"dtype": "F32", "shape": [0], "data_offsets": [10, 0]}}, b"\x00" * 16),
    "unknown-dtype": st_bytes({KEY_A: {"dtype": "F7", "shape": [4, 8], "data_offsets": [0, 128]}}, b"\x00" * 128),
    "dtype-not-a-string": st_bytes(
        {KEY_A: {"dtype": ["F32"], "shape": [4, 8], "data_offsets": [0, 128]}}, b"\x00" * 128
    ),
    "negative-shape": st_bytes({KEY_A: {"dtype": "F32", "shape": [-4, 8], "data_offsets": [0, 128]}}, b"\x00" * 128),
    "control-char-key": st_bytes(
        {"base_model.model.x\x1b[31m.lora_A.weight": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}},
        b"\x00" * 4,
    ),
    "deeply-nested-json": st_bytes(b"[" * 100000 + b"]" * 100000),
    "metadata-not-object": st_bytes(
        {"__metadata__": [1], KEY_A: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\x00" * 4
    ),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_FILES))
def test_hostile_safetensors(tmp_path, case):
    folder = make(tmp_path / case, HOSTILE_FILES[case])
    result = run_validate(folder)
    assert result.exit_code == 1, result.output
    codes = findings_of(result)
    assert codes == ["files.unreadable"], codes
    doc = json.loads(result.stdout)
    assert doc["ok"] is False
    message = doc["findings"][0]["message"]
    assert "adapter_model.safetensors" in message
    assert "\x1b" not in message  # control characters are escaped in messages


@pytest.mark.slow
def test_header_of_hundreds_of_megabytes_is_refused_without_reading(tmp_path):
    folder = tmp_path / "huge"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(CONFIG))
    path = folder / "adapter_model.safetensors"
    size = 300 * 1024 * 1024
    with open(path, "wb") as handle:  # sparse: takes no disk and no time
        handle.write(struct.pack("<Q", size))
        handle.truncate(size + 8)
    from lora_convert.errors import AdapterFormatError
    from lora_convert.io.tensor_files import read_safetensors_header

    with pytest.raises(AdapterFormatError, match="larger than"):
        read_safetensors_header(path)
    result = run_validate(folder)
    assert result.exit_code == 1 and findings_of(result) == ["files.unreadable"]


def test_fifo_is_refused_not_waited_on(tmp_path):
    folder = make(tmp_path / "fifo", None)
    os.mkfifo(folder / "adapter_model.safetensors")
    result = run_validate(folder)
    assert result.exit_code == 1 and findings_of(result) == ["files.unreadable"]


# ---- small JSON files that are FIFOs: refused unread, never waited on ----------------------------------------------
def run_bounded(*args, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The CLI in a subprocess with a deadline, so that a command blocked on a FIFO fails the test instead of hanging
    the suite."""
    env = {k: v for k, v in os.environ.items() if k != "HF_ENDPOINT"}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", NO_COLOR="1", COLUMNS="200")
    command = [sys.executable, "-m", "lora_convert", *map(str, args)]
    try:
        result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(map(str, args))} blocked (a FIFO was read instead of refused)")
    assert "Traceback" not in result.stderr, result.stderr
    return result


def _fifo_adapter(folder: Path, fifo: str) -> Path:
    """The example adapter with `fifo` a FIFO without a writer (the real file removed first where there is one)."""
    shutil.copytree(EXAMPLE / "adapter", folder)
    if fifo == "adapter_model.safetensors.index.json":  # a sharded adapter: the index is read, not the single file
        (folder / "adapter_model.safetensors").rename(folder / "adapter_model-00001-of-00001.safetensors")
    (folder / fifo).unlink(missing_ok=True)
    os.mkfifo(folder / fifo)
    return folder


@pytest.mark.parametrize(
    "fifo, code",
    [
        ("adapter_config.json", "config.unreadable"),
        ("adapter_model.safetensors.index.json", "files.unreadable"),
        ("lora_layout.json", "files.unreadable"),
    ],
)
@pytest.mark.slow
def test_fifo_json_in_adapter_is_refused(tmp_path, fifo, code):
    folder = _fifo_adapter(tmp_path / "ad", fifo)
    result = run_bounded("validate", folder, "--base", EXAMPLE / "base", "--no-smoke", "--format", "json")
    assert result.returncode == 1, result.stderr
    (found,) = json.loads(result.stdout)["findings"]
    assert found["code"] == code and f"{fifo} is not a regular file but a FIFO" in found["message"], found
    inspected = run_bounded("inspect", folder)
    assert inspected.returncode == 1 and f"{fifo} is not a regular file" in inspected.stderr, inspected.stderr
    normalized = run_bounded("normalize", folder, "--base", EXAMPLE / "base", "-o", tmp_path / "out")
    assert normalized.returncode == 1 and f"{fifo} is not a regular file" in normalized.stderr, normalized.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_fifo_added_tokens_is_a_finding(tmp_path):
    folder = _fifo_adapter(tmp_path / "ad", "added_tokens.json")
    result = run_bounded("validate", folder, "--base", EXAMPLE / "base", "--no-smoke", "--format", "json")
    found = [f for f in json.loads(result.stdout)["findings"] if f["code"] == "config.added-tokens-unreadable"]
    assert len(found) == 1 and "added_tokens.json is not a regular file but a FIFO" in found[0]["message"]


@pytest.mark.slow
def test_fifo_base_config_is_refused(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    os.mkfifo(base / "config.json")
    for spec in (base, base / "config.json"):  # the folder and the file itself
        result = run_bounded("validate", EXAMPLE / "adapter", "--base", spec, "--no-smoke", "--format", "json")
        assert result.returncode == 1, result.stderr
        assert "config.json is not a regular file but a FIFO" in result.stderr, result.stderr


@pytest.mark.slow
def test_fifo_manifest_is_not_a_previous_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "lora_convert_manifest.json")
    result = run_bounded(
        "normalize", EXAMPLE / "adapter", "--base", EXAMPLE / "base", "-o", out, "--force", cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr
    assert "lora_convert_manifest.json is not a lora-convert manifest" in result.stderr, result.stderr
    assert [p.name for p in out.iterdir()] == ["lora_convert_manifest.json"]  # left as it was


def test_read_small_text_refuses_folders_and_oversized_files(tmp_path):
    from lora_convert.errors import BaseConfigError
    from lora_convert.io.small_files import read_small_text

    with pytest.raises(BaseConfigError, match="not a regular file but a folder"):
        read_small_text(tmp_path, BaseConfigError)
    big = tmp_path / "big.json"
    big.write_text("[" + "0," * 50 + "0]")
    with pytest.raises(BaseConfigError, match="larger than 64 bytes"):
        read_small_text(big, BaseConfigError, max_bytes=64)
    assert read_small_text(big) == big.read_text()


# ---- adapter_config.json ------------------------------------------------------------------------------------
def _weights() -> bytes:
    return st_bytes(good_header(), b"\x00" * 256)


@pytest.mark.parametrize(
    "config, code",
    [
        (None, "config.unreadable"),
        ("", "config.unreadable"),
        ("   \n", "config.unreadable"),
        ("{not json", "config.unreadable"),
        ("\xff", "config.unreadable"),
        ("[1, 2]", "config.not-an-object"),
        (json.dumps({"peft_type": "LORA", "r": "eight", "lora_alpha": 8}), "config.wrong-type"),
        (json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": "x"}), "config.wrong-type"),
        (json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": 5}), "config.wrong-type"),
        (json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "rank_pattern": "q_proj"}), "config.wrong-type"),
        (json.dumps({"peft_type": "LORA", "r": 0, "lora_alpha": 8}), "config.rank-not-positive"),
        (json.dumps({"peft_type": "LORA", "lora_alpha": 8}), "config.missing-field"),
    ],
)
def test_hostile_config(tmp_path, config, code):
    folder = make(tmp_path / "c", _weights(), config=config)
    if config == "\xff":
        (folder / "adapter_config.json").write_bytes(b"\xff\xfe")
    result = run_validate(folder)
    assert result.exit_code == 1, result.output
    assert code in findings_of(result)


def test_config_wrong_types_all_reported(tmp_path):
    cfg = {"peft_type": 3, "r": True, "lora_alpha": None, "use_rslora": "yes", "modules_to_save": "lm_head", "bias": 7}
    folder = make(tmp_path / "c", _weights(), config=json.dumps(cfg))
    result = run_validate(folder)
    doc = json.loads(result.stdout)
    keys = {k for f in doc["findings"] if f["code"] == "config.wrong-type" for k in f["keys"]}
    assert {"peft_type", "r", "use_rslora", "modules_to_save", "bias"} <= keys
    assert result.exit_code == 1


# ---- pickles, links, hub ids ----------------------------------------------------------------------------------
class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_bin_needing_arbitrary_unpickling_is_refused(tmp_path):
    import torch

    folder = make(tmp_path / "bin", None)
    torch.save({"x": Evil()}, folder / "adapter_model.bin")
    result = run_validate(folder)
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert [f["code"] for f in doc["findings"]] == ["files.unreadable"]
    assert "arbitrary code" in doc["findings"][0]["message"]


@pytest.mark.parametrize("payload", [b"", b"not a pickle at all", b"\x80\x04K\x01."])
def test_broken_bin(tmp_path, payload):
    folder = make(tmp_path / "bin", payload, weights_name="adapter_model.bin")
    result = run_validate(folder)
    assert result.exit_code == 1 and findings_of(result) == ["files.unreadable"]


def test_symlink_outside_adapter_folder(tmp_path):
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(_weights())
    folder = make(tmp_path / "link", None)
    (folder / "adapter_model.safetensors").symlink_to(outside)
    result = run_validate(folder)
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert (
        doc["findings"][0]["code"] == "files.unreadable"
        and "outside the adapter folder" in doc["findings"][0]["message"]
    )


def test_symlinked_config_outside_folder(tmp_path):
    outside = tmp_path / "cfg.json"
    outside.write_text(json.dumps(CONFIG))
    folder = make(tmp_path / "link", _weights(), config=None)
    (folder / "adapter_config.json").symlink_to(outside)
    result = run_validate(folder)
    assert result.exit_code == 1 and findings_of(result) == ["files.unreadable"]


@pytest.mark.parametrize("spec", ["org/na me", "org/-bad", "org/name@", "a--b/c", "org/..", "org/name@bad revision"])
def test_malformed_hub_id(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["validate", spec, "--format", "json"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.stdout == ""


def test_missing_folder_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "Error:" in result.stderr


def test_control_characters_in_key_via_library(tmp_path):
    from lora_convert.errors import AdapterFormatError
    from lora_convert.io.tensor_files import read_safetensors_header

    path = tmp_path / "x.safetensors"
    path.write_bytes(HOSTILE_FILES["control-char-key"])
    with pytest.raises(AdapterFormatError, match="control characters"):
        read_safetensors_header(path)


def test_well_formed_hub_id_offline_is_an_environment_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = CliRunner().invoke(
        app, ["validate", "someorg/some-adapter", "--format", "json", "--cache-dir", str(tmp_path / "hf")]
    )
    assert result.exit_code == 3 and result.stdout == "" and "Traceback" not in result.output
