"""`--base` resolution: local folder / config.json, preset, Hub repo id (config.json only), adapter fallback."""

from __future__ import annotations

import json
from importlib import resources

import huggingface_hub
import pytest
from huggingface_hub import errors as hub_errors

from lora_convert.arch.base_config import find_preset, list_presets, resolve_base, unwrap_text_config
from lora_convert.errors import BaseConfigError, EnvironmentProblem, UsageError

LLAMA = {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64}


def test_list_presets():
    presets = {p["name"]: p for p in list_presets()}
    shipped = [f for f in resources.files("lora_convert.arch.presets").iterdir() if f.name.endswith(".json")]
    assert len(presets) == len(shipped) >= 28  # one per file, none lost (28 shipped as of issue 14)
    assert presets["kimi-k2.5"] == {"name": "kimi-k2.5", "hub_ids": ["moonshotai/Kimi-K2.5"], "model_type": "kimi_k25"}


def test_local_folder_and_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    for spec in (str(tmp_path), str(tmp_path / "config.json")):
        base = resolve_base(spec)
        assert base.origin == "local" and base.config == LLAMA and base.text_config is base.config


def test_local_folder_without_config(tmp_path):
    (tmp_path / "weights.bin").write_text("")
    with pytest.raises(BaseConfigError, match="without config.json .*weights.bin"):
        resolve_base(str(tmp_path))


def test_local_bad_json(tmp_path):
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(BaseConfigError, match="not valid JSON"):
        resolve_base(str(tmp_path))
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(BaseConfigError, match="holds a JSON array at the top level; expected a JSON object"):
        resolve_base(str(tmp_path))


def test_preset_by_name_is_case_insensitive_and_unwraps_text_config():
    base = resolve_base("Kimi-K2.5")
    assert base.origin == "preset" and base.name == "kimi-k2.5"
    assert base.text_config["n_routed_experts"] == 384
    assert base.text_config is base.config["text_config"]
    assert resolve_base("kimi-k2.5").config is not base.config  # a private copy each time


def test_adapter_base_name_matches_a_preset_hub_id():
    base = resolve_base(None, adapter_base_name="deepseek-ai/deepseek-r1")
    assert base.origin == "preset" and base.name == "deepseek-v3"
    assert "base_model_name_or_path" in base.source_note


def test_explicit_hub_id_downloads_config_only(tmp_path, monkeypatch):
    calls = []

    def fake_download(repo_id, filename, **kw):
        calls.append((repo_id, filename, kw))
        path = tmp_path / "config.json"
        path.write_text(json.dumps(LLAMA))
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    base = resolve_base("org/model@v1", cache_dir=tmp_path / "cache", token="tok")
    assert base.origin == "hub" and base.name == "org/model@v1" and base.config == LLAMA
    assert calls == [
        ("org/model", "config.json", {"revision": "v1", "cache_dir": str(tmp_path / "cache"), "token": "tok"})
    ]


def _raising(exc):
    def fake_download(*args, **kw):
        raise exc

    return fake_download


def test_hub_offline_falls_back_to_a_preset_listing_the_repo(monkeypatch):
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _raising(hub_errors.LocalEntryNotFoundError("offline")))
    base = resolve_base("mistralai/Mixtral-8x7B-v0.1")
    assert base.origin == "preset" and base.name == "mixtral-8x7b"
    assert "unreachable" in base.source_note


def test_hub_offline_without_preset_is_an_environment_problem(monkeypatch):
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _raising(hub_errors.LocalEntryNotFoundError("offline")))
    with pytest.raises(EnvironmentProblem, match="not in the local Hugging Face cache") as exc:
        resolve_base("org/unknown-model")
    assert exc.value.hint and "HF_HUB_OFFLINE" in exc.value.hint and "schemas list" in exc.value.hint


def test_hub_missing_config_json(monkeypatch):
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _raising(hub_errors.EntryNotFoundError("404")))
    with pytest.raises(BaseConfigError, match="has no config.json"):
        resolve_base("org/an-adapter-repo")


def test_adapter_base_name_falls_through_to_the_hub(monkeypatch):
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _raising(hub_errors.LocalEntryNotFoundError("offline")))
    with pytest.raises(EnvironmentProblem, match="matches no preset"):
        resolve_base(None, adapter_base_name="org/private-base")


@pytest.mark.parametrize("spec", ["./missing/dir", "/no/such/config.json", "not a repo id!", "a/b/c", "no-such-preset"])
def test_unresolvable_spec(spec):
    # An explicit --base that names nothing is a usage error (exit 2) ...
    with pytest.raises(UsageError) as exc:
        resolve_base(spec)
    assert exc.value.hint and "preset" in exc.value.hint
    # ... while the same name in the adapter's config is the adapter's problem.
    with pytest.raises(BaseConfigError):
        resolve_base(None, adapter_base_name=spec)


def test_nothing_to_go_on_is_a_usage_error():
    with pytest.raises(UsageError, match="No base model"):
        resolve_base(None)
    with pytest.raises(UsageError, match="--base is empty"):
        resolve_base("  ")


def test_find_preset_and_unwrap():
    assert find_preset("meta-llama/Llama-3.1-8B")["name"] == "llama-3.1-8b"
    assert find_preset("meta-llama/Llama-3.1-8B", hub_ids=False) is None
    assert unwrap_text_config({"text_config": {"a": 1}}) == {"a": 1}
    assert unwrap_text_config({"llm_config": {"a": 2}}) == {"a": 2}
    assert unwrap_text_config({"a": 3}) == {"a": 3}
