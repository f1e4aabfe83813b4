"""The CI integration runs: the pre-commit hook's command line, and the composite action's own shell steps on a
real git repository (setup-python and the pip install are GitHub's; their command lines are checked as text)."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
needs_cli = pytest.mark.skipif(not (BIN / "lora-convert").exists(), reason="the lora-convert console script is not installed")
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def write_adapter(folder: Path, *, nan: bool = False) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    t = {}
    for m, out in (("q_proj", 16), ("v_proj", 4)):
        t[f"base_model.model.model.layers.0.self_attn.{m}.lora_A.weight"] = torch.randn(4, 16, generator=g) / math.sqrt(16)
        t[f"base_model.model.model.layers.0.self_attn.{m}.lora_B.weight"] = torch.randn(out, 4, generator=g) * 0.01
    if nan:
        t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"][0, 0] = float("nan")
    save_file(t, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                            "target_modules": ["q_proj", "v_proj"]}))
    return folder


def env() -> dict:
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e["HF_HUB_OFFLINE"] = "1"
    return e


# ---- pre-commit ---------------------------------------------------------------------------------------------------
def hook() -> dict:
    hooks = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    (h,) = [h for h in hooks if h["id"] == "lora-convert-validate"]
    return h


def test_hook_definition():
    h = hook()
    assert h["entry"] == "lora-convert validate" and h["language"] == "python" and h["pass_filenames"] is True
    files = re.compile(h["files"])
    assert files.search("adapters/a/adapter_config.json") and files.search("adapter_config.json")
    assert files.search("x/adapter_model.safetensors") and files.search("x/adapter_model-00001-of-00002.safetensors")
    assert not files.search("x/config.json") and not files.search("x/adapter_config.json.bak")


@needs_cli
def test_hook_command_line_runs(tmp_path):
    good = write_adapter(tmp_path / "good")
    bad = write_adapter(tmp_path / "bad", nan=True)
    h = hook()
    filenames = [str(good / "adapter_config.json"), str(good / "adapter_model.safetensors"), str(bad / "adapter_config.json")]
    command = h["entry"].split() + list(h.get("args", []))
    ok = subprocess.run(command + filenames[:2], capture_output=True, text=True, env=env(), timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.count("OK:") == 1  # the two files of one adapter are validated once
    failed = subprocess.run(command + filenames, capture_output=True, text=True, env=env(), timeout=120)
    assert failed.returncode == 1 and "data.nan" in failed.stdout and "Traceback" not in failed.stderr


def test_example_pre_commit_config_uses_the_hook():
    cfg = yaml.safe_load((ROOT / "examples" / "ci" / "pre-commit-config.yaml").read_text())
    assert cfg["repos"][0]["hooks"][0]["id"] == "lora-convert-validate"


# ---- the composite action ------------------------------------------------------------------------------------------
def action() -> dict:
    return yaml.safe_load((ROOT / "action.yml").read_text())


def step(name: str) -> dict:
    return next(s for s in action()["runs"]["steps"] if s.get("name") == name or s.get("id") == name)


def test_action_definition():
    a = action()
    assert a["runs"]["using"] == "composite"
    steps = a["runs"]["steps"]
    assert steps[0]["uses"].startswith("actions/setup-python@")
    install = step("Install lora-convert")
    assert install["env"]["ACTION_PATH"] == "${{ github.action_path }}" and '"$ACTION_PATH"' in install["run"]
    for s in steps:  # inputs reach the shell only through env, never interpolated into the script
        assert "${{ inputs." not in s.get("run", "")
    assert "git diff --name-only" in step("find")["run"] and "--format github" in step("Validate")["run"]


def _bash(script: str, cwd: Path, extra_env: dict) -> subprocess.CompletedProcess:
    e = env()
    e.update(extra_env)
    return subprocess.run(["bash", "-c", script], cwd=cwd, capture_output=True, text=True, env=e, timeout=180)


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                   env={**env(), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                        "GIT_COMMITTER_EMAIL": "t@t", "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_CONFIG_NOSYSTEM": "1"})


@needs_cli
@needs_git
def test_action_steps_run_on_a_repository(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q", "-b", "main")
    write_adapter(repo / "adapters" / "old")
    (repo / "README.md").write_text("x")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "first")
    write_adapter(repo / "adapters" / "new good")  # a space in the folder name
    write_adapter(repo / "adapters" / "new-bad", nan=True)
    (repo / "README.md").write_text("y")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "second")

    runner_temp = tmp_path / "runner"
    runner_temp.mkdir()
    output = tmp_path / "github_output"
    find = _bash(step("find")["run"], repo, {"RUNNER_TEMP": str(runner_temp), "GITHUB_OUTPUT": str(output),
                                               "INPUT_ADAPTERS": "", "INPUT_BASE_REF": "", "EVENT_BEFORE": ""})
    assert find.returncode == 0, find.stderr
    outputs = dict(line.split("=", 1) for line in output.read_text().splitlines())
    assert outputs["count"] == "2"
    listed = Path(outputs["list"]).read_text().splitlines()
    assert listed == ["adapters/new good", "adapters/new-bad"]

    validate = _bash(step("Validate")["run"], repo, {"LIST": outputs["list"], "INPUT_BASE": "", "INPUT_ENGINE": "sglang",
                                                     "INPUT_STRICT": "false", "INPUT_ARGS": "--no-smoke"})
    assert validate.returncode == 1, validate.stdout + validate.stderr
    annotations = [line for line in validate.stdout.splitlines() if line.startswith("::")]
    assert any(line.startswith("::error title=data.nan,file=adapters/new-bad/adapter_config.json::") for line in annotations)
    assert validate.stdout.count("lora-convert validate: ") == 2

    # explicit adapters input, and a push whose `before` is the first commit
    output.write_text("")
    first = subprocess.run(["git", "rev-parse", "HEAD~1"], cwd=repo, capture_output=True, text=True).stdout.strip()
    find2 = _bash(step("find")["run"], repo, {"RUNNER_TEMP": str(runner_temp), "GITHUB_OUTPUT": str(output),
                                                "INPUT_ADAPTERS": "", "INPUT_BASE_REF": "", "EVENT_BEFORE": first})
    assert find2.returncode == 0 and "count=2" in output.read_text()
    output.write_text("")
    find3 = _bash(step("find")["run"], repo, {"RUNNER_TEMP": str(runner_temp), "GITHUB_OUTPUT": str(output),
                                                "INPUT_ADAPTERS": "adapters/old", "INPUT_BASE_REF": "", "EVENT_BEFORE": ""})
    assert find3.returncode == 0 and "count=1" in output.read_text()
    ok = _bash(step("Validate")["run"], repo, {"LIST": str(runner_temp / "lora-convert-adapters.txt"), "INPUT_BASE": "",
                                               "INPUT_ENGINE": "none", "INPUT_STRICT": "false", "INPUT_ARGS": "--no-smoke"})
    assert ok.returncode == 0, ok.stdout + ok.stderr


def test_example_workflow_uses_the_action():
    wf = yaml.safe_load((ROOT / "examples" / "ci" / "validate-adapters.yml").read_text())
    steps = wf["jobs"]["validate"]["steps"]
    assert steps[0]["uses"].startswith("actions/checkout@") and steps[0]["with"]["fetch-depth"] == 0
    assert steps[1]["uses"].endswith("/lora-convert@v0.1.0")
