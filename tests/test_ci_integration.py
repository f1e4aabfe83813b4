"""The CI integration runs: the pre-commit hook's command line, and the composite action's script
(action/validate_changed.py) on real git repositories built here: a bare "origin", full and shallow clones,
branches, pushes and pull requests, with the real lora-convert console script on PATH. setup-python and the pip
install are GitHub's; the action's wiring is checked as text.

The watched list (the files validate reads) is checked against what validate opens, and the hook's `files:` and
the example workflow's `paths:` against the list. The gate's fail-closed paths run real children: a real
`lora-convert validate` blocked on a Hub request to a socket that never answers, killed with SIGKILL by the test
(what the out-of-memory killer does) or stopped at `timeout-minutes`; and `lora-convert` wrappers first on PATH
for a crash (the real CLI's exit 4), a segfault, odd exit codes and an exit 0 without a verdict."""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml  # a dependency of huggingface_hub, so always installed with lora-convert

# Real git repositories and the action's script in subprocesses: not the unit layer (`make test-fast` skips this module).
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "action" / "validate_changed.py"
BIN = Path(sys.executable).parent
# What the examples put where a user pins lora-convert: no release tag exists yet, so a commit SHA.
PIN_PLACEHOLDER = "COMMIT_SHA"


def action_module():
    """action/validate_changed.py as a module: the home of the list of files validate reads."""
    spec = importlib.util.spec_from_file_location("validate_changed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


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


# The variables GitHub sets that make the link to the workflow run's page in the job summary.
RUN_LINK = {
    "GITHUB_SERVER_URL": "https://github.example",
    "GITHUB_REPOSITORY": "acme/adapters",
    "GITHUB_RUN_ID": "4242",
}
RUN_URL = "https://github.example/acme/adapters/actions/runs/4242"
EARLIER_SUMMARY = "## an earlier step's summary\n"


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
    # A runner's own variables (when these tests run in GitHub Actions) must not reach the action under test.
    for name in ("GITHUB_BASE_REF", "GITHUB_OUTPUT", "GITHUB_EVENT_NAME", "GITHUB_STEP_SUMMARY", *RUN_LINK):
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
    assert steps[1]["uses"] == f"OWNER/lora-convert@{PIN_PLACEHOLDER}"


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
            "INPUT_TIMEOUT_MINUTES": "30",
            "EVENT_BEFORE": "",
        }
    )
    e.update(inputs)
    result = subprocess.run([sys.executable, str(SCRIPT)], cwd=repo, capture_output=True, text=True, env=e, timeout=300)
    outputs = dict(line.split("=", 1) for line in output.read_text().splitlines())  # the last value of each wins
    return Run(result, outputs)


def with_summary(tmp_path: Path, name: str = "step_summary.md", link: bool = True) -> dict:
    """The environment of a step with a job summary file that an earlier step already wrote to."""
    path = tmp_path / name
    path.write_text(EARLIER_SUMMARY)
    return {"GITHUB_STEP_SUMMARY": str(path), **(RUN_LINK if link else {})}


def summary_of(tmp_path: Path, name: str = "step_summary.md") -> str:
    text = (tmp_path / name).read_text(encoding="utf-8")
    assert text.startswith(EARLIER_SUMMARY), text  # appended to, as GitHub expects, never overwritten
    return text[len(EARLIER_SUMMARY) :]


def table(summary: str, first_columns: str) -> list[dict[str, str]]:
    """The rows of the Markdown table whose header starts with `first_columns`, as {column: cell}; a cell splits
    only at an unescaped `|`, as GitHub's table parser does."""
    lines = summary.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(first_columns))

    def cells(line: str) -> list[str]:
        assert line.startswith("|") and line.endswith("|"), line
        return [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]

    header = cells(lines[start])
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        row = cells(line)
        assert len(row) == len(header), line
        rows.append(dict(zip(header, row, strict=True)))
    return rows


def adapter_rows(summary: str) -> dict[str, list[str]]:
    """adapter -> [verdict, errors, warnings, notes] of the summary's adapter table."""
    return {
        r["adapter"]: [r["verdict"], r["errors"], r["warnings"], r["notes"]]
        for r in table(summary, "| adapter | verdict |")
    }


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

    run = run_action(origin, tmp_path, GITHUB_BASE_REF="main", **with_summary(tmp_path))
    assert run.code == 1, run
    assert run.outputs["count"] == "3" and run.validated() == 3, run
    assert run.error_files() == {"adapters/bad-nan/adapter_config.json", "adapters/bad-shape/adapter_config.json"}, run
    assert any(
        line.startswith("::error title=data.nan,file=adapters/bad-nan/adapter_config.json::")
        for line in run.annotations("error")
    ), run
    assert any("title=shapes." in line for line in run.annotations("error")), run
    assert "Traceback" not in run.stderr
    # the job summary: the same verdicts, counted from the annotations each validator printed
    summary = summary_of(tmp_path)
    assert "**Failed** (exit 1)" in summary and "Passed" not in summary, summary
    assert "Adapters validated: 3 of 3" in summary, summary
    rows = adapter_rows(summary)
    assert set(rows) == {"adapters/good", "adapters/bad-nan", "adapters/bad-shape"}, summary
    assert rows["adapters/good"] == ["OK", "0", "0", "0"], summary
    for bad in ("adapters/bad-nan", "adapters/bad-shape"):
        errors = sum(1 for line in run.annotations("error") if f"file={bad}/" in line)
        assert rows[bad][:2] == ["FAIL (errors)", str(errors)] and errors >= 1, summary
    assert "| release |" not in summary, summary  # no engine asked: no engine table
    assert f"]({RUN_URL})" in summary and "Files changed" in summary, summary


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
    run = run_action(origin, tmp_path, EVENT_BEFORE=before, **with_summary(tmp_path, link=False))
    assert run.code == 0, run
    assert run.outputs["count"] == "0" and run.validated() == 0
    assert any("No changed PEFT adapter" in line for line in run.annotations("notice")), run
    summary = summary_of(tmp_path)
    assert "**Passed** (exit 0): no changed adapter to validate" in summary, summary
    assert "Adapters validated: 0" in summary and "No changed PEFT adapter" in summary, summary
    assert "| adapter | verdict |" not in summary and "/actions/runs/" not in summary, summary


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
    run = run_action(origin, tmp_path, EVENT_BEFORE=before, **with_summary(tmp_path))
    assert run.code == 1, run
    assert run.error_files() == {"adapters/orphan/adapter_model.safetensors"}, run
    assert run.outputs["count"] == "0" and run.validated() == 0, run
    assert "adapters/old: adapter removed" in run.stderr
    # nothing was validated and the step fails: the summary says so, and why
    summary = summary_of(tmp_path)
    assert "**Failed** (exit 1)" in summary and "Passed" not in summary, summary
    assert "Adapters validated: 0" in summary, summary
    assert "adapters/orphan/adapter\\_model.safetensors" in summary and "no adapter\\_config.json" in summary, summary


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


# ---- what triggers validation: every file validate reads ------------------------------------------------------------
def sample_names(pattern: str) -> list[str]:
    """File names a glob pattern of the watched list stands for (a `*` as PEFT's or the index's shard names)."""
    if "*" not in pattern:
        return [pattern]
    return [pattern.replace("*", "00001-of-00002"), pattern.replace("*", "x")]


def test_watched_list_covers_what_the_package_says_an_adapter_holds():
    from lora_convert.check import base_checkpoint, data
    from lora_convert.io import source
    from lora_convert.peft import adapter

    watched = action_module()
    names = [
        *source.ADAPTER_FILE_PATTERNS,  # what a Hub adapter download fetches: the adapter's own files
        adapter.SAFETENSORS_NAME,
        adapter.SAFETENSORS_INDEX_NAME,
        adapter.BIN_NAME,
        adapter.LAYOUT_NAME,
        data.NORMALIZE_REPORT,  # its presence turns data.zero-b into data.zero-fill
    ]
    for name in names:
        for sample in sample_names(name):
            assert watched.is_adapter_file(f"a/{sample}"), sample
    for name in (
        "config.json",
        base_checkpoint.SINGLE_FILE,
        base_checkpoint.INDEX_FILE,
        "model-00001-of-00003.safetensors",
    ):
        assert any(fnmatch.fnmatchcase(name, p) for p in watched.BASE_FILES), name
    assert not watched.is_adapter_file("a/notes.md") and not watched.is_adapter_file("a/config.json")


AUDIT = """
import sys
opened = []
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes)):
        opened.append(args[0] if isinstance(args[0], str) else args[0].decode())
sys.addaudithook(hook)
from lora_convert.api import validate_adapter
report = validate_adapter(sys.argv[1], base=sys.argv[2], engine="sglang", smoke=False)
assert report.summary["checks"]["run"], report.verdict()
print("\\n".join(opened))
"""


def test_every_file_validate_opens_is_watched(tmp_path):
    """The list is checked against what validate really opens (Python's audit hook sees every open), on adapters of
    every file kind: safetensors with added tokens, a sharded adapter with its index, a .bin adapter, a stacked
    output (lora_layout.json, the manifest, the report), against a local base with a sharded checkpoint."""
    from safetensors.torch import load_file, save_file

    watched = action_module()
    base = write_base(tmp_path / "base")
    tensors = {
        "model.layers.0.self_attn.q_proj.weight": torch.zeros(16, 16),
        "model.embed_tokens.weight": torch.zeros(64, 16),
    }
    save_file({k: v for k, v in tensors.items() if "q_proj" in k}, str(base / "model-00001-of-00002.safetensors"))
    save_file({k: v for k, v in tensors.items() if "embed" in k}, str(base / "model-00002-of-00002.safetensors"))
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: f"model-0000{1 if 'q_proj' in k else 2}-of-00002.safetensors" for k in tensors}})
    )
    plain = write_adapter(tmp_path / "plain", base=base)
    (plain / "added_tokens.json").write_text(json.dumps({"<new>": 3}))
    sharded = write_adapter(tmp_path / "sharded", base=base)
    weights = load_file(str(sharded / "adapter_model.safetensors"))
    (sharded / "adapter_model.safetensors").unlink()
    keys = sorted(weights)
    parts = {"adapter_model-00001-of-00002.safetensors": keys[:2], "adapter_model-00002-of-00002.safetensors": keys[2:]}
    for name, part in parts.items():
        save_file({k: weights[k] for k in part}, str(sharded / name))
    (sharded / "adapter_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: n for n, part in parts.items() for k in part}})
    )
    binary = write_adapter(tmp_path / "binary", base=base)
    torch.save(load_file(str(binary / "adapter_model.safetensors")), binary / "adapter_model.bin")
    (binary / "adapter_model.safetensors").unlink()
    stacked = tmp_path / "stacked"
    subprocess.run(
        [
            str(BIN / "lora-convert"),
            "normalize",
            str(plain),
            "-o",
            str(stacked),
            "--base",
            str(base),
            "--layout",
            "stacked",
        ],
        check=True,
        capture_output=True,
        env=env(),
        timeout=300,
    )
    assert (stacked / "lora_layout.json").is_file()
    for adapter in (plain, sharded, binary, stacked):
        result = subprocess.run(
            [sys.executable, "-c", AUDIT, str(adapter), str(base)],
            capture_output=True,
            text=True,
            env=env(),
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        opened = {Path(p).resolve() for p in result.stdout.splitlines() if p}
        read_here = sorted(p for p in opened if p.parent in (adapter.resolve(), base.resolve()))
        assert any(p.name == "adapter_config.json" for p in read_here), read_here  # the hook saw the reads
        for path in read_here:
            kind = "adapter" if path.parent == adapter.resolve() else "base"
            if kind == "adapter":
                assert watched.is_adapter_file(f"x/{path.name}"), f"validate reads {path.name}, which is not watched"
            else:
                assert any(fnmatch.fnmatchcase(path.name, p) for p in watched.BASE_FILES), path.name


def test_hook_pattern_and_workflow_paths_cover_the_watched_list():
    watched = action_module()
    files = re.compile(hook()["files"])
    for pattern in watched.ADAPTER_FILES:
        for sample in sample_names(pattern):
            assert files.search(f"adapters/a/{sample}") and files.search(sample), sample
    for other in ("x/notes.md", "x/config.json", "x/adapter_config.json.bak", "x/my_added_tokens.json"):
        assert not files.search(other), other
    wf = yaml.safe_load((ROOT / "examples" / "ci" / "validate-adapters.yml").read_text())
    trigger = wf.get("on") or wf.get(True)  # YAML 1.1 reads a bare `on` as true
    for event in ("pull_request", "push"):
        globs = trigger[event]["paths"]
        assert globs == watched.WORKFLOW_PATHS, event
        for pattern in (*watched.ADAPTER_FILES, *watched.BASE_FILES):
            for sample in sample_names(pattern):
                # GitHub's `**/` matches any folder depth, the top included
                assert any(fnmatch.fnmatchcase(sample, g.removeprefix("**/")) for g in globs), sample


def test_hook_command_takes_any_watched_file_as_its_adapter(tmp_path):
    """pre-commit passes the changed file names; each watched name means its adapter folder."""
    base = write_base(tmp_path / "base")
    adapter = write_adapter(tmp_path / "a", base=base)
    (adapter / "added_tokens.json").write_text(json.dumps({"<new>": 70}))  # past the base vocab of 64
    command = hook()["entry"].split() + list(hook().get("args", []))
    result = subprocess.run(
        command + [str(adapter / "added_tokens.json")], capture_output=True, text=True, env=env(), timeout=120
    )
    assert result.returncode == 1 and "tokens.added" in result.stdout, result.stdout + result.stderr


def test_a_change_to_only_added_tokens_is_validated(origin, tmp_path):
    git(origin, "checkout", "-q", "-b", "feature")
    (origin / "adapters" / "old" / "added_tokens.json").write_text(json.dumps({"<new>": 70}))  # vocab is 64
    commit(origin, "add a token")
    git(origin, "push", "-q", "origin", "main", "feature")
    run = run_action(origin, tmp_path, GITHUB_BASE_REF="main")
    assert run.code == 1, run
    assert run.outputs["count"] == "1" and run.validated() == 1, run
    assert any("title=tokens.added," in line for line in run.annotations("error")), run


@pytest.mark.parametrize("name", ["lora_layout.json", "lora_convert_report.json", "adapter_model.bin"])
def test_a_change_to_any_other_adapter_file_is_validated(origin, tmp_path, name):
    before = git(origin, "rev-parse", "HEAD")
    (origin / "adapters" / "old" / name).write_bytes(b"{}")
    commit(origin, f"change {name}")
    run = run_action(origin, tmp_path, EVENT_BEFORE=before)
    assert run.outputs["count"] == "1" and run.validated() == 1, run


def test_a_shard_the_index_names_is_watched(origin, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = origin / "adapters" / "old"
    weights = load_file(str(folder / "adapter_model.safetensors"))
    (folder / "adapter_model.safetensors").unlink()
    keys = sorted(weights)
    save_file({k: weights[k] for k in keys[:2]}, str(folder / "part-a.safetensors"))
    save_file({k: weights[k] for k in keys[2:]}, str(folder / "part-b.safetensors"))
    weight_map = {k: "part-a.safetensors" if k in keys[:2] else "part-b.safetensors" for k in keys}
    (folder / "adapter_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    before = commit(origin, "shard it")
    weights[keys[-1]][0, 0] = float("nan")
    save_file({k: weights[k] for k in keys[2:]}, str(folder / "part-b.safetensors"))
    commit(origin, "only part-b changes")
    run = run_action(origin, tmp_path, EVENT_BEFORE=before)
    assert run.code == 1 and run.validated() == 1 and "data.nan" in run.stdout, run


def test_a_change_to_a_base_in_the_repository_validates_its_adapters(origin, tmp_path):
    write_base(origin / "models" / "base")
    a = write_adapter(origin / "adapters" / "uses-base")
    config = json.loads((a / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "models/base"
    (a / "adapter_config.json").write_text(json.dumps(config))
    write_adapter(origin / "adapters" / "other", base=tmp_path / "base")
    before = commit(origin, "adapters on a base in the repository")
    (origin / "models" / "base" / "config.json").write_text(json.dumps({**BASE_CONFIG, "num_key_value_heads": 2}))
    commit(origin, "the base changes")
    run = run_action(origin, tmp_path, EVENT_BEFORE=before, INPUT_BASE="")
    assert run.code == 1 and run.outputs["count"] == "1" and run.validated() == 1, run
    assert run.error_files() == {"adapters/uses-base/adapter_config.json"}, run


def test_added_tokens_in_a_folder_that_is_no_adapter_is_not_a_change(origin, tmp_path):
    before = git(origin, "rev-parse", "HEAD")
    (origin / "models" / "tokenizer").mkdir(parents=True)
    (origin / "models" / "tokenizer" / "added_tokens.json").write_text("{}")
    commit(origin, "a tokenizer")
    run = run_action(origin, tmp_path, EVENT_BEFORE=before)
    assert run.code == 0 and run.validated() == 0, run
    assert any("No changed PEFT adapter" in line for line in run.annotations("notice")), run


# ---- the gate fails closed when the validator does not finish -------------------------------------------------------
class SilentHub:
    """A Hub endpoint that accepts connections and never answers: a real `lora-convert validate` asking it for a
    base config blocks in its request, at a point the test knows, until it is killed."""

    def __init__(self):
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(8)
        self.connected = threading.Event()
        self.held: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.held.append(conn)
            self.connected.set()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.getsockname()[1]}"

    def close(self):
        for conn in self.held:
            conn.close()
        self.server.close()


def children_of(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def start_blocked_action(origin: Path, tmp_path: Path, hub: SilentHub, etag_timeout: int, **inputs: str):
    """The action on a pull request that changed one adapter, validating it against a Hub base id that `hub`
    serves: the real validator child blocks in its request to `hub`."""
    git(origin, "checkout", "-q", "-b", "feature")
    write_adapter(origin / "adapters" / "new")
    commit(origin, "pr")
    git(origin, "push", "-q", "origin", "main", "feature")
    output = tmp_path / "github_output"
    output.write_text("")
    e = env()
    for name in ("HF_HUB_OFFLINE", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        e.pop(name, None)
    e.update(
        {
            "HF_ENDPOINT": hub.endpoint,
            "HF_HUB_ETAG_TIMEOUT": str(etag_timeout),
            "HF_HOME": str(tmp_path / "hf-home"),
            "NO_PROXY": "127.0.0.1",
            "GITHUB_OUTPUT": str(output),
            "GITHUB_BASE_REF": "main",
            "INPUT_ADAPTERS": "",
            "INPUT_BASE_REF": "",
            "INPUT_BASE": "some-org/some-base",  # no preset has this id: validate asks the Hub
            "INPUT_ENGINE": "none",
            "INPUT_STRICT": "false",
            "INPUT_ARGS": "--no-smoke",
            "EVENT_BEFORE": "",
            **inputs,
        }
    )
    return subprocess.Popen(
        [sys.executable, str(SCRIPT)], cwd=origin, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def test_a_validator_killed_by_sigkill_fails_the_step(origin, tmp_path):
    """What the out-of-memory killer does: SIGKILL to the real `lora-convert validate` child, mid-run."""
    hub = SilentHub()
    try:
        action_run = start_blocked_action(origin, tmp_path, hub, etag_timeout=300, **with_summary(tmp_path))
        assert hub.connected.wait(120), "the validator never reached the Hub request"
        (child,) = children_of(action_run.pid)
        assert "validate" in Path(f"/proc/{child}/cmdline").read_text()
        os.kill(child, signal.SIGKILL)
        stdout, stderr = action_run.communicate(timeout=120)
    finally:
        hub.close()
    run = Run(subprocess.CompletedProcess([], action_run.returncode, stdout, stderr), {})
    assert run.code != 0, run
    (error,) = [line for line in run.annotations("error") if "killed" in line]
    assert "killed by signal 9 (SIGKILL)" in error and "out-of-memory" in error and "adapters/new" in error, run
    summary = summary_of(tmp_path)
    assert f"**Failed** (exit {run.code})" in summary and "Passed" not in summary, summary
    assert "Adapters validated: 0 of 1" in summary, summary
    assert adapter_rows(summary) == {"adapters/new": ["killed (SIGKILL)", "-", "-", "-"]}, summary
    assert "killed by signal 9 (SIGKILL)" in summary and "out-of-memory" in summary, summary


def test_a_validator_past_the_timeout_fails_the_step(origin, tmp_path):
    hub = SilentHub()
    try:
        started = time.monotonic()
        # 0.05 minutes = 3 s; the child alone would wait 60 s for the Hub, then fail with exit 3
        action_run = start_blocked_action(
            origin, tmp_path, hub, etag_timeout=60, INPUT_TIMEOUT_MINUTES="0.05", **with_summary(tmp_path)
        )
        stdout, stderr = action_run.communicate(timeout=200)
        elapsed = time.monotonic() - started
    finally:
        hub.close()
    run = Run(subprocess.CompletedProcess([], action_run.returncode, stdout, stderr), {})
    assert run.code != 0, run
    assert any("did not finish within 0.05 minute(s)" in line for line in run.annotations("error")), run
    assert elapsed < 60, f"the validator was not stopped at the timeout ({elapsed:.0f} s)"
    assert not children_of(action_run.pid)
    summary = summary_of(tmp_path)
    assert "**Failed**" in summary and "Passed" not in summary, summary
    assert adapter_rows(summary) == {"adapters/new": ["timeout (0.05 min)", "-", "-", "-"]}, summary


def test_a_bad_timeout_input_fails(origin, tmp_path):
    run = run_action(origin, tmp_path, INPUT_ADAPTERS="adapters/old", INPUT_TIMEOUT_MINUTES="soon")
    assert run.code == 2 and "timeout-minutes" in run.annotations("error")[0] and run.validated() == 0, run


# `lora-convert` wrappers put first on PATH: the real command line, made to end the ways a validator can end badly.
WRAPPERS = {
    # the real CLI with a bug inside validate: its own "Internal error" path, exit 4
    "crash": "import lora_convert.api as api\n"
    "def broken(*a, **k):\n    raise RuntimeError('boom')\n"
    "api.validate_adapter = broken\n"
    "from lora_convert.cli import main\nmain()\n",
    "segfault": "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n",
    "odd-code": "raise SystemExit(70)\n",
    "silent-ok": "raise SystemExit(0)\n",  # exit 0 without a verdict: nothing says the adapter was validated
    "interrupted": "raise SystemExit(130)\n",
}
EXPECTED = {
    "crash": "exit 4: internal error",
    "segfault": "killed by signal 11 (SIGSEGV)",
    "odd-code": "exit code 70",
    "silent-ok": "printed no verdict",
    "interrupted": "exit code 130",
}
# ... and the adapter's verdict in the job summary
SUMMARY_VERDICT = {
    "crash": "not validated (exit 4: internal error)",
    "segfault": "killed (SIGSEGV)",
    "odd-code": "not validated (exit 70)",
    "silent-ok": "no verdict (exit 0)",
    "interrupted": "not validated (exit 130)",
}


@pytest.mark.parametrize("how", sorted(WRAPPERS))
def test_a_validator_that_ends_badly_fails_the_step(origin, tmp_path, how):
    wrapper_bin = tmp_path / "wrapper-bin"
    wrapper_bin.mkdir()
    script = wrapper_bin / "lora-convert"
    script.write_text(f"#!{sys.executable}\n" + WRAPPERS[how])
    script.chmod(0o755)
    before = git(origin, "rev-parse", "HEAD")
    write_adapter(origin / "adapters" / "new")
    commit(origin, "second")
    run = run_action(
        origin,
        tmp_path,
        EVENT_BEFORE=before,
        PATH=f"{wrapper_bin}{os.pathsep}{env()['PATH']}",
        **with_summary(tmp_path),
    )
    assert run.code != 0, run
    errors = [line for line in run.annotations("error") if "title=lora-convert action" in line]
    assert any(EXPECTED[how] in line and "adapters/new" in line for line in errors), run
    assert "Traceback" not in run.stderr, run
    summary = summary_of(tmp_path)
    assert f"**Failed** (exit {run.code})" in summary and "Passed" not in summary, summary
    assert adapter_rows(summary) == {"adapters/new": [SUMMARY_VERDICT[how], "-", "-", "-"]}, summary


# ---- the job summary -----------------------------------------------------------------------------------------------
def test_job_summary_of_a_passing_pull_request_and_none_without_the_variable(origin, tmp_path):
    git(origin, "checkout", "-q", "-b", "feature")
    write_adapter(origin / "adapters" / "good")
    commit(origin, "add an adapter")
    git(origin, "push", "-q", "origin", "main", "feature")
    run = run_action(origin, tmp_path, GITHUB_BASE_REF="main", **with_summary(tmp_path))
    assert run.code == 0, run
    summary = summary_of(tmp_path)
    assert summary.startswith("## lora-convert validate\n"), summary
    assert "**Passed** (exit 0): 1 adapter(s) validated, none with errors" in summary and "Failed" not in summary
    assert "Adapters validated: 1 of 1" in summary, summary
    assert adapter_rows(summary) == {"adapters/good": ["OK", "0", "0", "0"]}, summary
    assert f"[this workflow run's checks page]({RUN_URL})" in summary and "Files changed" in summary, summary

    # without GITHUB_STEP_SUMMARY (a local run, another CI), or with it empty: no summary file anywhere, no noise
    listing = sorted(p.name for p in tmp_path.iterdir())
    for value in (None, ""):
        inputs = {} if value is None else {"GITHUB_STEP_SUMMARY": value}
        run = run_action(origin, tmp_path, GITHUB_BASE_REF="main", **RUN_LINK, **inputs)
        assert run.code == 0 and run.validated() == 1 and run.stderr.count("summary") == 0, run
        assert sorted(p.name for p in tmp_path.iterdir()) == listing
        assert git(origin, "status", "--porcelain", "--ignored") == ""


def test_job_summary_engine_table(origin, tmp_path):
    before = git(origin, "rev-parse", "HEAD")
    rslora = write_adapter(origin / "adapters" / "rslora")
    config = json.loads((rslora / "adapter_config.json").read_text())
    (rslora / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True}))
    write_adapter(origin / "adapters" / "plain")
    commit(origin, "two adapters")
    # SGLang 0.5.23 ignores use_rslora (a `wrong` rule, an error); the plain adapter fires no rule
    run = run_action(origin, tmp_path, EVENT_BEFORE=before, INPUT_ENGINE="sglang", **with_summary(tmp_path))
    assert run.code == 1, run
    summary = summary_of(tmp_path)
    assert adapter_rows(summary)["adapters/rslora"][:2] == ["FAIL (errors)", "1"], summary
    rows = {r.pop("adapter"): r for r in table(summary, "| adapter | release |")}
    outcomes = ["exact", "wrong", "load-failure", "dropped", "ignored", "needs-flag"]
    assert rows["adapters/rslora"] == {
        "release": "SGLang 0.5.23",
        **{o: "1" if o == "wrong" else "0" for o in outcomes},
        "note": "",
    }, summary
    assert rows["adapters/plain"] == {
        "release": "SGLang 0.5.23",
        **dict.fromkeys(outcomes, "0"),
        "note": "no rule fired",
    }
    # the engine named in `args` (it comes last, so it wins): vLLM honours use_rslora (an `exact` rule)
    run = run_action(
        origin,
        tmp_path,
        EVENT_BEFORE=before,
        INPUT_ARGS="--no-smoke --engine=vllm",
        **with_summary(tmp_path, "vllm.md"),
    )
    assert run.code == 0, run
    rows = {r.pop("adapter"): r for r in table(summary_of(tmp_path, "vllm.md"), "| adapter | release |")}
    from lora_convert.engines.rules import engine_info

    newest = engine_info("vllm")["label"]  # `--engine vllm`: the newest release with a rule file
    assert rows["adapters/rslora"]["release"] == newest and rows["adapters/rslora"]["exact"] == "1", rows


def test_job_summary_escapes_names_and_messages(origin, tmp_path):
    before = git(origin, "rev-parse", "HEAD")
    write_adapter(origin / "adapters" / "a|b`c<d>*e", nan=True)
    commit(origin, "a name full of Markdown")
    run = run_action(origin, tmp_path, EVENT_BEFORE=before, **with_summary(tmp_path))
    assert run.code == 1 and run.validated() == 1, run
    summary = summary_of(tmp_path)
    escaped = "adapters/a\\|b\\`c\\<d\\>\\*e"
    # one row of five cells: the `|` in the name did not split it, and nothing in it became markup or HTML
    assert adapter_rows(summary) == {escaped: ["FAIL (errors)", "1", "0", "0"]}, summary
    assert "a|b`c<d>" not in summary, summary
    # a message of the action quoting user input: a base ref with markup and a line break stays one line
    run = run_action(
        origin, tmp_path, INPUT_BASE_REF="no|such`ref<x>\nsecond line", **with_summary(tmp_path, "gate.md")
    )
    assert run.code == 2, run
    summary = summary_of(tmp_path, "gate.md")
    assert "**Failed** (exit 2)" in summary and "Passed" not in summary, summary
    (line,) = [line for line in summary.splitlines() if "Cannot find" in line]
    assert "no\\|such\\`ref\\<x\\> second line" in line, summary
    assert not any(line.startswith("second line") for line in summary.splitlines()), summary


# ---- pinning -------------------------------------------------------------------------------------------------------
def test_examples_pin_a_commit_and_never_a_missing_tag():
    tags = subprocess.run(["git", "tag"], cwd=ROOT, capture_output=True, text=True, env=env())
    assert tags.returncode == 0, tags.stderr
    existing = set(tags.stdout.split())
    places = [*(ROOT / "examples" / "ci").iterdir(), ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    named: dict[str, list[str]] = {}
    for path in places:
        text = path.read_text(encoding="utf-8")
        for ref in re.findall(r"lora-convert@([^\s\"'`)]+)", text) + re.findall(r"^\s*rev:\s*(\S+)", text, flags=re.M):
            named.setdefault(ref, []).append(path.name)
    wrong = {
        ref: where
        for ref, where in named.items()
        if ref != PIN_PLACEHOLDER and ref not in existing and not re.fullmatch(r"[0-9a-f]{40}", ref)
    }
    assert not wrong, f"refs that are neither an existing tag nor a commit SHA: {wrong}"
    # both examples pin, and say how to pin
    for name in ("validate-adapters.yml", "pre-commit-config.yaml"):
        text = (ROOT / "examples" / "ci" / name).read_text()
        assert PIN_PLACEHOLDER in text and "commit SHA" in text, name
