"""`--lora-target-modules` as each engine reads it: vLLM matches a module by its name or a packed parent/child of
it in the base class's own packed_modules_mapping (data per class: lora_convert/engines/vllm-server-args.json
`packed_by_class`, each citing the release's file:line); SGLang compares the adapter's own target_modules
(adapter_config.json, normalized) with the flag's list, not the modules the adapter holds."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers import case_base_dir, case_dir
from lora_convert.engines.rules import resolve_engine
from lora_convert.engines.server_args import packed_mapping, release_flags
from lora_convert.pipeline.commands import predict, validate

QWEN3_5 = "v5_qwen3_5"
LLAMA = "v5_llama"


def _validate(case: str, engine: str, flags: str, adapter=None):
    return validate(
        str(adapter or case_dir(case) / "adapter"),
        base=str(case_base_dir(case)),
        engine=engine,
        server_args=flags,
        smoke=False,
        data_scan=False,
    )


def _finding(report, code: str):
    found = [f for f in report.findings if f.code == code]
    return found[0] if found else None


@pytest.mark.parametrize("release", ["vllm==0.33.0", "vllm==0.34.0"])
def test_vllm_reads_the_base_class_packed_mapping(release):
    """Qwen3.5's in_proj_qkv and in_proj_z are members of vLLM's packed in_proj_qkvz (qwen3_5.py's
    packed_modules_mapping): listing in_proj_qkvz serves them; the generic qkv/gate_up mapping would not."""
    flag = release_flags(resolve_engine(release))["--lora-target-modules"]
    assert packed_mapping(flag, ("Qwen3_5ForCausalLM",))["in_proj_qkvz"] == ["in_proj_qkv", "in_proj_z"]
    assert "in_proj_qkvz" not in packed_mapping(flag, ("NoSuchClassForCausalLM",))
    excluded = _finding(
        _validate(QWEN3_5, release, "--lora-target-modules in_proj_qkvz"), "server-args.target-excluded"
    )
    assert excluded is not None and "in_proj_qkv," not in excluded.message and "in_proj_z" not in excluded.message
    assert "in_proj_b" in excluded.message  # a member of in_proj_ba, which is not listed
    predicted = predict(
        release, case_dir(QWEN3_5) / "adapter", case_base_dir(QWEN3_5), "--lora-target-modules in_proj_qkvz"
    )
    served = {m for m, v in predicted.modules.items() if v == "exact"}
    assert any(m.endswith("in_proj_qkv") for m in served) and any(m.endswith("in_proj_z") for m in served)


def test_every_packed_class_mapping_cites_its_release():
    for release in ("vllm==0.30.0", "vllm==0.33.0", "vllm==0.34.0"):
        by_class = release_flags(resolve_engine(release))["--lora-target-modules"].params["packed_by_class"]
        assert by_class and all(e["source"].startswith("vllm==") and ".py:" in e["source"] for e in by_class.values())


def test_sglang_compares_the_adapters_target_modules_not_its_modules(tmp_path):
    """An adapter whose target_modules lists a name it holds no module for is refused by SGLang when the flag
    leaves that name out (lora_manager.py: the normalized target_modules must be a subset); its modules alone would
    pass."""
    adapter = tmp_path / "adapter"
    shutil.copytree(case_dir(LLAMA) / "adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    held = sorted({t.rsplit(".", 1)[-1] for t in config["target_modules"]})
    config["target_modules"] = [*held, "embed_tokens"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    flags = "--lora-target-modules " + " ".join(held)
    refused = _finding(_validate(LLAMA, "sglang", flags, adapter), "server-args.target-refused")
    assert refused is not None and "embed_tokens are not in --lora-target-modules" in refused.message


def test_sglang_does_not_check_an_all_linear_adapter_against_the_flag(tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(case_dir(LLAMA) / "adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["target_modules"] = "all-linear"
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    report = _validate(LLAMA, "sglang", "--lora-target-modules qkv_proj", adapter)
    assert _finding(report, "server-args.target-refused") is None
