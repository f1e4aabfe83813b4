"""The engine proof's release cache (tests/engine_proof/releases.py) and per-release adaptations (adaptations.py):
fast checks on a wheel built here; the runs themselves are tests/test_proof_vllm.py and test_proof_sglang.py."""

from __future__ import annotations

import zipfile

import pytest

from engine_proof import adaptations, releases


def _wheel(path, engine="vllm", version="9.9.0"):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{engine}/__init__.py", "__version__ = '9.9.0'\n")
        zf.writestr(f"{engine}/configs/moe.json", "{}")
        zf.writestr(f"{engine}/_C.abi3.so", b"\x7fELF")
        zf.writestr(f"{engine}/kernels/include/op.h", "// header")
        zf.writestr(f"{engine}-{version}.dist-info/METADATA", f"Name: {engine}\nVersion: {version}\n")
        zf.writestr(f"{engine}-{version}.dist-info/RECORD", "")
        zf.writestr("other_package/x.py", "")
    return path


def test_extract_keeps_python_data_folders_and_metadata_only(tmp_path, monkeypatch):
    monkeypatch.setenv(releases.CACHE_ENV, str(tmp_path / "cache"))
    wheel = _wheel(tmp_path / "vllm-9.9.0-cp38-abi3-manylinux_2_28_x86_64.whl")
    folder = releases.extract("vllm==9.9.0", wheel, releases.release_dir("vllm==9.9.0"))
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert files == [
        ".complete",
        "vllm-9.9.0.dist-info/METADATA",
        "vllm/__init__.py",
        "vllm/configs/moe.json",
    ]
    assert (folder / "vllm" / "kernels" / "include").is_dir()  # the folder, not its header
    assert releases.cached("vllm==9.9.0") == folder


def test_a_folder_extracted_under_another_rule_or_unfinished_is_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv(releases.CACHE_ENV, str(tmp_path))
    folder = releases.release_dir("sglang==9.9.0")
    folder.mkdir(parents=True)
    assert releases.cached("sglang==9.9.0") is None  # no marker: half-finished
    (folder / ".complete").write_text("rule-0 sglang-9.9.0.whl\n")
    assert releases.cached("sglang==9.9.0") is None


def test_every_release_with_a_rule_file_is_proven():
    from lora_convert.engines.rules import releases as rule_files

    assert releases.proof_releases() == [r.spec for r in rule_files()]
    assert {"vllm==0.33.0", "vllm==0.34.0", "sglang==0.5.22", "sglang==0.5.23"} <= set(releases.proof_releases())


@pytest.mark.parametrize(
    ("name", "inside", "outside"),
    [
        ("cpu-triton-check", ["0.34.0", "0.35.1"], ["0.33.0"]),
        ("cpu-activation-ops", ["0.30.0", "0.32.0"], ["0.29.9", "0.33.0"]),
        ("qwen3-asr-config-registered", ["0.5.19"], ["0.5.20"]),
    ],
)
def test_an_adaptation_applies_to_its_releases_only(name, inside, outside):
    adaptation = next(a for a in adaptations.ADAPTATIONS if a.name == name)
    assert all(adaptation.applies_to(adaptation.engine, v) for v in inside)
    assert not any(adaptation.applies_to(adaptation.engine, v) for v in outside)
    assert not adaptation.applies_to("other-engine", inside[0])


def test_every_adaptation_says_why_and_the_installed_releases_need_none():
    assert all(len(a.why) > 80 for a in adaptations.ADAPTATIONS)
    assert adaptations.applicable("vllm", "0.33.0") == []
    assert adaptations.applicable("sglang", "0.5.23") == []
