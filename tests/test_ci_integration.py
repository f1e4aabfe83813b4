"""The CI integration runs: the pre-commit hook's command line, and the composite action's script
(action/validate_changed.py) on real git repositories built here: a bare "origin", full and shallow clones,
branches, pushes and pull requests, with the real lora-convert console script on PATH. setup-python and the pip
install are GitHub's; the action's wiring is checked as text."""

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
import yaml  # a dependency of huggingface_hub, so always installed with lora-convert

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "action" / "validate_changed.py"
BIN = Path(sys.executable).parent

# A tiny Llama whose shapes match write_adapter's: hidden 16, 4 query heads and 1 KV head of 4 dimensions.
BASE_CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 16,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 4,
    "num_hidden_layers": 1,
    "intermediate_size": 32,
    "vocab_size": 64,
}


def write_base(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(BASE_CONFIG))
    return folder


def write_adapter(folder: Path, *, nan: bool = False, wrong_shape: bool = False, base: Path | None = None) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    t = {}
    for m, out in (("q_proj", 16), ("v_proj", 4)):
        t[f"base_model.model.model.layers.0.self_attn.{m}.lora_A.weight"] = torch.randn(4, 16, generator=g) / math.sqrt(
            16
        )
        t[f"base_model.model.model.layers.0.self_attn.{m}.lora_B.weight"] = torch.randn(out, 4, generator=g) * 0.01
    if nan:
        t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"][0, 0] = float("nan")
    if wrong_shape:  # v_proj's output is 4 (one KV head) in the base; 8 is two heads
        t["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"] = torch.randn(8, 4, generator=g) * 0.01
    save_file(t, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    if base is not None:
        config["base_model_name_or_path"] = str(base)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def env() -> dict:
    # The console script of this environment, as the action's install step puts it on PATH; no skip without it:
    # a missing script is a broken install.
    assert (BIN / "lora-convert").exists() and shutil.which("git"), "needs the lora-convert console script and git"
    e = dict(os.environ)
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    e["HF_HUB_OFFLINE"] = "1"
    # Git as on a clean runner: no user or system configuration, a fixed identity.
    e.update(
        {
            "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@t",
            "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@t",
            "GIT_CONFIG_GLOBAL": "/dev/null",
            "GIT_CONFIG_NOSYSTEM": "1",
        }
    )
    for name in ("GITHUB_BASE_REF", "GITHUB_OUTPUT", "GITHUB_EVENT_NAME"):
        e.pop(name, None)
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
    assert files.search("x/adapter_model.safetensors.index.json")  # a sharded adapter whose index changed
    assert not files.search("x/config.json") and not files.search("x/adapter_config.json.bak")


def test_hook_command_line_runs(tmp_path):
    base = write_base(tmp_path / "base")
    good = write_adapter(tmp_path / "good", base=base)
    bad = write_adapter(tmp_path / "bad", nan=True, base=base)
    h = hook()
    filenames = [
        str(good / "adapter_config.json"),
        str(good / "adapter_model.safetensors"),
        str(bad / "adapter_config.json"),
    ]
    command = h["entry"].split() + list(h.get("args", []))
    ok = subprocess.run(command + filenames[:2], capture_output=True, text=True, env=env(), timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.count("OK:") == 1  # the two files of one adapter are validated once
    failed = subprocess.run(command + filenames, capture_output=True, text=True, env=env(), timeout=120)
    assert failed.returncode == 1 and "data.nan" in failed.stdout and "Traceback" not in failed.stderr


def test_example_pre_commit_config_uses_the_hook():
    cfg = yaml.safe_load((ROOT / "examples" / "ci" / "pre-commit-config.yaml").read_text())
    assert cfg["repos"][0]["hooks"][0]["id"] == "lora-convert-validate"


# ---- the composite action: wiring ----------------------------------------------------------------------------------
def action() -> dict:
    return yaml.safe_load((ROOT / "action.yml").read_text())


def test_action_is_wiring_only():
    a = action()
    assert a["runs"]["using"] == "composite"
    steps = a["runs"]["steps"]
    assert steps[0]["uses"].startswith("actions/setup-python@")
    install = next(s for s in steps if s.get("name") == "Install lora-convert")
    assert install["env"]["ACTION_PATH"] == "${{ github.action_path }}" and '"$ACTION_PATH"' in install["run"]
    assert "-e" not in install["run"].split()  # a real (non-editable) install, as users get it
    for s in steps:  # inputs reach the shell only through env, never interpolated into the script
        assert "${{" not in s.get("run", "")
    (validate,) = [s for s in steps if s.get("id") == "validate"]
    assert validate["run"].strip() == 'python "$ACTION_PATH/action/validate_changed.py"'
    # every input reaches the script
    for name in a["inputs"]:
        if name != "python-version":
            key = "INPUT_" + name.upper().replace("-", "_")
            assert validate["env"][key] == "${{ inputs." + name + " }}"
    assert validate["env"]["EVENT_BEFORE"] == "${{ github.event.before }}"
    assert a["outputs"]["adapters"]["value"] == "${{ steps.validate.outputs.count }}"


def test_example_workflow_uses_the_action():
    wf = yaml.safe_load((ROOT / "examples" / "ci" / "validate-adapters.yml").read_text())
    steps = wf["jobs"]["validate"]["steps"]
    assert steps[0]["uses"].startswith("actions/checkout@") and steps[0]["with"]["fetch-depth"] == 0
    assert re.fullmatch(r"OWNER/lora-convert@v\d+\.\d+\.\d+", steps[1]["uses"])


# ---- the composite action: the script on real repositories ---------------------------------------------------------
def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True, env=env()).stdout.strip()


def commit(repo: Path, message: str) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "--allow-empty", "-m", message)
    return git(repo, "rev-parse", "HEAD")


class Run:
    def __init__(self, result: subprocess.CompletedProcess, outputs: dict):
        self.code = result.returncode
        self.stdout = result.stdout
        self.stderr = result.stderr
        self.outputs = outputs

    def annotations(self, level: str) -> list[str]:
        return [line for line in self.stdout.splitlines() if line.startswith(f"::{level} ")]

    def error_files(self) -> set[str]:
        return {m.group(1) for line in self.annotations("error") if (m := re.search(r",file=([^:]*)::", line))}

    def validated(self) -> int:  # lora-convert prints one verdict line per adapter it validated
        return self.stdout.count("lora-convert validate: ")

    def __repr__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.stdout}\n--- stderr\n{self.stderr}"


def run_action(repo: Path, tmp_path: Path, **inputs: str) -> Run:
    """Run the script as the action's step does: in the checkout, inputs as environment variables."""
    output = tmp_path / "github_output"
    output.write_text("")
    e = env()
    e["GITHUB_OUTPUT"] = str(output)
    e.update(
        {
            "INPUT_ADAPTERS": "",
            "INPUT_BASE_REF": "",
            "INPUT_BASE": str(tmp_path / "base"),
            "INPUT_ENGINE": "none",
            "INPUT_STRICT": "false",
            "INPUT_ARGS": "--no-smoke",
            "EVENT_BEFORE": "",
        }
    )
    e.update(inputs)
    result = subprocess.run([sys.executable, str(SCRIPT)], cwd=repo, capture_output=True, text=True, env=e, timeout=300)
    outputs = dict(line.split("=", 1) for line in output.read_text().splitlines())  # the last value of each wins
    return Run(result, outputs)


@pytest.fixture
def origin(tmp_path):
    """A bare origin whose main holds one good adapter and a README; returns a full clone of it."""
    write_base(tmp_path / "base")
    bare = tmp_path / "origin.git"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(bare)], check=True, env=env())
    seed = tmp_path / "seed"
    git(tmp_path, "clone", "-q", f"file://{bare}", str(seed))
    git(seed, "checkout", "-q", "-b", "main")
    write_adapter(seed / "adapters" / "old")
    (seed / "README.md").write_text("x")
    commit(seed, "first")
    git(seed, "push", "-q", "origin", "main")
    return seed


def test_pull_request_with_two_broken_adapters_fails_with_two_errors(origin, tmp_path):
    git(origin, "checkout", "-q", "-b", "feature")
    write_adapter(origin / "adapters" / "good")
    write_adapter(origin / "adapters" / "bad-nan", nan=True)
    write_adapter(origin / "adapters" / "bad-shape", wrong_shape=True)
    commit(origin, "add adapters")
    # main moves on after the fork: its changes are not the pull request's and are not validated
    git(origin, "checkout", "-q", "main")
    write_adapter(origin / "adapters" / "on-main", nan=True)
    commit(origin, "main moves")
    git(origin, "push", "-q", "origin", "main", "feature")
    git(origin, "checkout", "-q", "feature")

    run = run_action(origin, tmp_path, GITHUB_BASE_REF="main")
    assert run.code == 1, run
    assert run.outputs["count"] == "3" and run.validated() == 3, run
    assert run.error_files() == {"adapters/bad-nan/adapter_config.json", "adapters/bad-shape/adapter_config.json"}, run
    assert any(
        line.startswith("::error title=data.nan,file=adapters/bad-nan/adapter_config.json::")
        for line in run.annotations("error")
    ), run
    assert any("title=shapes." in line for line in run.annotations("error")), run
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize(
    "inputs",
    [
        {"INPUT_BASE_REF": "no-such-branch"},
        {"GITHUB_BASE_REF": "no-such-branch"},
        {"EVENT_BEFORE": "1234567890abcdef1234567890abcdef12345678"},
    ],
)
def test_a_missing_base_ref_fails(origin, tmp_path, inputs):
    write_adapter(origin / "adapters" / "new", nan=True)
    commit(origin, "second")
    run = run_action(origin, tmp_path, **inputs)
    assert run.code == 2, run
    (error,) = run.annotations("error")
    assert "Cannot find" in error and "fetch-depth: 0" in error, run
    assert run.outputs["count"] == "0" and run.validated() == 0


def test_nothing_changed_succeeds_with_a_notice(origin, tmp_path):
    before = git(origin, "rev-parse", "HEAD")
    (origin / "README.md").write_text("y")
    (origin / "adapters" / "old" / "notes.md").write_text("not an adapter file")
    commit(origin, "docs only")
    run = run_action(origin, tmp_path, EVENT_BEFORE=before)
    assert run.code == 0, run
    assert run.outputs["count"] == "0" and run.validated() == 0
    assert any("No changed PEFT adapter" in line for line in run.annotations("notice")), run


def test_non_ascii_and_space_folders_are_validated(origin, tmp_path):
    before = git(origin, "rev-parse", "HEAD")
    write_adapter(origin / "adapters" / "ünïcødé-日本", nan=True)
    write_adapter(origin / "adapters" / "with space")
    commit(origin, "second")
    run = run_action(origin, tmp_path, EVENT_BEFORE=before)
    assert run.code == 1, run
    assert run.outputs["count"] == "2" and run.validated() == 2, run
    assert run.error_files() == {"adapters/ünïcødé-日本/adapter_config.json"}, run
    assert "OK: adapters/with space" in run.stdout, run


def test_weights_without_config_are_an_error_and_deleted_adapters_are_skipped(origin, tmp_path):
    before = git(origin, "rev-parse", "HEAD")
    orphan = write_adapter(origin / "adapters" / "orphan")
    (orphan / "adapter_config.json").unlink()
    git(origin, "rm", "-q", "-r", "adapters/old")  # a deleted adapter is not validated
    commit(origin, "second")
    run = run_action(origin, tmp_path, EVENT_BEFORE=before)
    assert run.code == 1, run
    assert run.error_files() == {"adapters/orphan/adapter_model.safetensors"}, run
    assert run.outputs["count"] == "0" and run.validated() == 0, run
    assert "adapters/old: adapter removed" in run.stderr


def test_args_split_like_a_shell(origin, tmp_path):
    before = git(origin, "rev-parse", "HEAD")
    write_adapter(origin / "adapters" / "nan", nan=True)
    commit(origin, "second")
    # one line, two flags: --no-data skips the data scan, so the NaN goes unseen and the adapter passes
    run = run_action(origin, tmp_path, EVENT_BEFORE=before, INPUT_ARGS="--no-smoke --no-data")
    assert run.code == 0 and run.validated() == 1, run
    # multi-line, as YAML's `args: |` gives it, with a quoted path holding a space; the base comes from args only
    spaced = write_base(tmp_path / "my base")
    run = run_action(
        origin, tmp_path, EVENT_BEFORE=before, INPUT_BASE="", INPUT_ARGS=f"--no-smoke\n--base '{spaced}'\n"
    )
    assert run.code == 1 and "data.nan" in run.stdout and "against" in run.stdout, run
    # nothing is evaluated by a shell
    marker = tmp_path / "pwned"
    run = run_action(origin, tmp_path, EVENT_BEFORE=before, INPUT_ARGS=f"--no-smoke $(touch {marker})")
    assert run.code == 2 and not marker.exists(), run
    run = run_action(origin, tmp_path, EVENT_BEFORE=before, INPUT_ARGS="--no-smoke 'unclosed")
    assert run.code == 2 and "args" in run.annotations("error")[0] and run.validated() == 0, run


def test_explicit_adapters_input(origin, tmp_path):
    write_adapter(origin / "adapters" / "with space")
    commit(origin, "second")
    run = run_action(origin, tmp_path, INPUT_ADAPTERS="adapters/old\n'adapters/with space'")
    assert run.code == 0 and run.outputs["count"] == "2" and run.validated() == 2, run


def shallow_clone(origin: Path, tmp_path: Path, branch: str = "main") -> Path:
    clone = tmp_path / "shallow"
    git(tmp_path, "clone", "-q", "--depth", "1", "--branch", branch, f"file://{tmp_path / 'origin.git'}", str(clone))
    assert git(clone, "rev-parse", "--is-shallow-repository") == "true"
    return clone


def test_shallow_first_push_validates_every_adapter(origin, tmp_path):
    write_adapter(origin / "adapters" / "new", nan=True)
    commit(origin, "second")
    git(origin, "push", "-q", "origin", "main")
    clone = shallow_clone(origin, tmp_path)
    # the push created the branch: GitHub sends a `before` of all zeros, and HEAD~1 is not in the clone
    run = run_action(clone, tmp_path, EVENT_BEFORE="0" * 40)
    assert run.code == 1, run
    assert run.outputs["count"] == "2" and run.validated() == 2, run
    assert any("validating every adapter in the repository (2)" in line for line in run.annotations("notice")), run
    assert run.error_files() == {"adapters/new/adapter_config.json"}, run


def test_shallow_push_fetches_the_history_it_needs(origin, tmp_path):
    before = git(origin, "rev-parse", "HEAD")
    write_adapter(origin / "adapters" / "new", nan=True)
    commit(origin, "second")
    git(origin, "push", "-q", "origin", "main")
    clone = shallow_clone(origin, tmp_path)
    run = run_action(clone, tmp_path, EVENT_BEFORE=before)
    assert run.code == 1, run
    assert run.outputs["count"] == "1" and run.error_files() == {"adapters/new/adapter_config.json"}, run
    assert any("git fetch --unshallow" in line for line in run.annotations("notice")), run
    assert git(clone, "rev-parse", "--is-shallow-repository") == "false"


def test_shallow_pull_request_fetches_the_base_branch(origin, tmp_path):
    git(origin, "checkout", "-q", "-b", "feature")
    write_adapter(origin / "adapters" / "pr", wrong_shape=True)
    commit(origin, "pr")
    git(origin, "checkout", "-q", "main")
    write_adapter(origin / "adapters" / "on-main", nan=True)
    commit(origin, "main moves")
    git(origin, "push", "-q", "origin", "main", "feature")
    clone = shallow_clone(origin, tmp_path, branch="feature")
    run = run_action(clone, tmp_path, GITHUB_BASE_REF="main")
    assert run.code == 1, run
    assert run.outputs["count"] == "1" and run.error_files() == {"adapters/pr/adapter_config.json"}, run
