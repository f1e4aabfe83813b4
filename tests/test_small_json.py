"""Hostile small files (issue 22, item 5): every JSON file the tool reads goes through one reader
(lora_convert/io/small_files.py), so that deep nesting (valid JSON that makes the decoder recurse past Python's
limit), bytes that are not UTF-8, text that is not JSON, the wrong top-level type and a Git LFS pointer in place of
the file each end in that file's own error or finding, named, with the README's exit code: never exit 4."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lora_convert.cli import app

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny-deepseek-v3"
BASE = EXAMPLE / "base"

LFS_POINTER = (
    b"version https://git-lfs.github.com/spec/v1\n"
    b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    b"size 2336927755\n"
)
HOSTILE = {
    "deep-nesting": b"[" * 100_000 + b"]" * 100_000,
    "deep-objects": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "not-utf8": b'{"r": "\xff\xfe"}',
    "not-json": b'{"r": 4,',
    "a-list": b"[1, 2, 3]",
    "lfs-pointer": LFS_POINTER,
}
# What the message says for each case (the file's own name is checked separately).
SAYS = {
    "deep-nesting": "nested too deeply",
    "deep-objects": "nested too deeply",
    "not-utf8": "not UTF-8",
    "not-json": "not valid JSON",
    "a-list": "expected a JSON object",
    "lfs-pointer": "is a Git LFS pointer, not the file",
}


def invoke(*args) -> object:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    assert "Internal error" not in result.output, result.output
    assert result.exit_code != 4, result.output
    return result


def adapter_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "adapter"
    shutil.copytree(EXAMPLE / "adapter", folder)
    return folder


def findings(result) -> list[dict]:
    return json.loads(result.stdout)["findings"]


def validate(folder, base=BASE):
    return invoke("validate", folder, "--base", base, "--no-smoke", "--format", "json")


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_adapter_config(tmp_path, case):
    folder = adapter_copy(tmp_path)
    (folder / "adapter_config.json").write_bytes(HOSTILE[case])
    result = validate(folder)
    assert result.exit_code == 1, result.output
    (found,) = [f for f in findings(result) if f["code"].startswith("config.")]
    if case == "a-list":  # parsed, then judged as a config: the existing finding
        assert found["code"] == "config.not-an-object", found
        return
    assert found["code"] == "config.unreadable", found
    assert "adapter_config.json" in found["message"] and SAYS[case] in found["message"], found
    for command in (["inspect", folder], ["normalize", folder, "--base", BASE, "-o", tmp_path / "out"]):
        result = invoke(*command)
        assert result.exit_code == 1 and "adapter_config.json" in result.stderr, result.output
        assert SAYS[case] in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_base_config(tmp_path, case):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_bytes(HOSTILE[case])
    for spec in (base, base / "config.json"):
        result = validate(EXAMPLE / "adapter", spec)
        assert result.exit_code == 1, result.output
        assert "config.json" in result.stderr and SAYS[case] in result.stderr, result.stderr
        assert result.stderr.count("Error:") == 1


def _sharded_copy(tmp_path: Path) -> Path:
    folder = adapter_copy(tmp_path)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model-00001-of-00001.safetensors")
    return folder


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_adapter_shard_index(tmp_path, case):
    folder = _sharded_copy(tmp_path)
    (folder / "adapter_model.safetensors.index.json").write_bytes(HOSTILE[case])
    result = validate(folder)
    assert result.exit_code == 1, result.output
    (found,) = findings(result)
    assert found["code"] == "files.unreadable", found
    assert "adapter_model.safetensors.index.json" in found["message"], found
    assert SAYS[case] in found["message"], found


def test_adapter_shard_index_that_is_good_still_reads(tmp_path):
    folder = _sharded_copy(tmp_path)
    from safetensors import safe_open

    with safe_open(folder / "adapter_model-00001-of-00001.safetensors", "np") as f:
        keys = list(f.keys())
    index = {"metadata": {}, "weight_map": dict.fromkeys(keys, "adapter_model-00001-of-00001.safetensors")}
    (folder / "adapter_model.safetensors.index.json").write_text(json.dumps(index))
    result = validate(folder)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_lora_layout(tmp_path, case):
    folder = adapter_copy(tmp_path)
    (folder / "lora_layout.json").write_bytes(HOSTILE[case])
    result = validate(folder)
    assert result.exit_code == 1, result.output
    (found,) = findings(result)
    assert found["code"] == "files.unreadable", found
    assert "lora_layout.json" in found["message"] and SAYS[case] in found["message"], found


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_added_tokens(tmp_path, case):
    folder = adapter_copy(tmp_path)
    (folder / "added_tokens.json").write_bytes(HOSTILE[case])
    result = validate(folder)
    assert result.exit_code == 0, result.output  # a warning: the rest of the adapter is checked
    (found,) = [f for f in findings(result) if f["code"] == "config.added-tokens-unreadable"]
    assert "added_tokens.json" in found["message"] and SAYS[case] in found["message"], found


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_output_manifest(tmp_path, case):
    out = tmp_path / "out"
    out.mkdir()
    (out / "lora_convert_manifest.json").write_bytes(HOSTILE[case])
    result = invoke("normalize", EXAMPLE / "adapter", "--base", BASE, "-o", out, "--force")
    assert result.exit_code == 2, result.output
    assert "lora_convert_manifest.json is not a lora-convert manifest" in result.stderr, result.stderr
    assert SAYS[case] in result.stderr, result.stderr
    assert [p.name for p in out.iterdir()] == ["lora_convert_manifest.json"]  # left as it was


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_base_checkpoint_index(tmp_path, case):
    base = tmp_path / "base"
    base.mkdir()
    shutil.copy(BASE / "config.json", base / "config.json")
    (base / "model.safetensors.index.json").write_bytes(HOSTILE[case])
    result = validate(EXAMPLE / "adapter", base)
    assert result.exit_code == 0, result.output  # a warning: the base's tensors are unchecked, the adapter is
    (found,) = [f for f in findings(result) if f["code"] == "base.checkpoint-unreadable"]
    assert "model.safetensors.index.json" in found["message"] and SAYS[case] in found["message"], found


@pytest.mark.parametrize("case", ["deep-nesting", "deep-objects"])
def test_scan_report_line(tmp_path, case):
    from lora_convert.errors import UsageError
    from lora_convert.scan.report import read_report

    report = tmp_path / "r.jsonl"
    report.write_bytes(b'{"id": "a"}\n' + HOSTILE[case] + b'\n{"id": "b"}\n')
    with pytest.raises(UsageError, match="line 2 is not a scan record"):
        read_report(report)
    result = invoke("scan", EXAMPLE / "adapter", "--output", report, "--resume", "--no-data")
    assert result.exit_code == 2 and "line 2 is not a scan record" in result.stderr, result.output


# ---- Git LFS pointers in place of tensor files ----------------------------------------------------------------
def test_lfs_pointer_safetensors(tmp_path):
    folder = adapter_copy(tmp_path)
    (folder / "adapter_model.safetensors").write_bytes(LFS_POINTER)
    result = validate(folder)
    assert result.exit_code == 1, result.output
    (found,) = findings(result)
    assert found["code"] == "files.unreadable", found
    message = found["message"]
    assert "adapter_model.safetensors is a Git LFS pointer, not the file" in message, message
    assert "git lfs pull" in message and "2336927755 bytes" in message, message
    assert "bytes long" not in message  # not read as a header length
    result = invoke("normalize", folder, "--base", BASE, "-o", tmp_path / "out")
    assert result.exit_code == 1 and "Git LFS pointer" in result.stderr and "git lfs pull" in result.stderr
    assert not (tmp_path / "out").exists()


def test_lfs_pointer_bin(tmp_path):
    folder = adapter_copy(tmp_path)
    (folder / "adapter_model.safetensors").unlink()
    (folder / "adapter_model.bin").write_bytes(LFS_POINTER)
    result = invoke("inspect", folder)
    assert result.exit_code == 1, result.output
    assert "adapter_model.bin is a Git LFS pointer, not the file" in result.stderr, result.stderr


def test_lfs_pointer_base_shard(tmp_path):
    """A base checkpoint shard that is a pointer: its tensors are unchecked, and the finding says why."""
    base = tmp_path / "base"
    base.mkdir()
    shutil.copy(BASE / "config.json", base / "config.json")
    (base / "model.safetensors").write_bytes(LFS_POINTER)
    result = validate(EXAMPLE / "adapter", base)
    assert result.exit_code == 0, result.output
    (found,) = [f for f in findings(result) if f["code"] == "base.checkpoint-unreadable"]
    assert "model.safetensors is a Git LFS pointer" in found["message"], found


def test_parse_json_and_read_small_json_units(tmp_path):
    from lora_convert.errors import BaseConfigError
    from lora_convert.io.small_files import json_type_name, lfs_pointer_problem, parse_json, read_small_json

    assert parse_json(b'{"a": [1]}', "x", BaseConfigError) == {"a": [1]}
    with pytest.raises(BaseConfigError, match="x is empty"):
        parse_json(b" \n", "x", BaseConfigError)
    path = tmp_path / "f.json"
    path.write_text("[1]")
    assert read_small_json(path, BaseConfigError, expect=None) == [1]
    assert read_small_json(path, BaseConfigError, expect=list) == [1]
    with pytest.raises(BaseConfigError, match=r"f\.json holds a JSON array at the top level; expected a JSON object"):
        read_small_json(path, BaseConfigError)
    assert [json_type_name(v) for v in ({}, [], "", 1, 1.5, True, None)] == [
        "object",
        "array",
        "string",
        "number",
        "number",
        "boolean",
        "null or missing",
    ]
    assert lfs_pointer_problem(b"version 1\n", "f") is None
    assert "size unknown" in lfs_pointer_problem(b"version https://git-lfs.github.com/spec/v1\n", "f")
