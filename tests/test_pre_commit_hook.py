"""The pre-commit hook as a user gets it: `pre-commit try-repo` builds the hook's own environment from this
repository (a non-editable `pip install` with every dependency) and runs `.pre-commit-hooks.yaml`'s hook on a real
git repository holding adapters.

The repository handed to try-repo is a committed copy of this working tree. try-repo on the checkout itself would
take committed files plus modified tracked ones, but not new untracked files, so during development it would test
a mix that exists nowhere; in CI (a fresh clone) the copy equals the checkout.

try-repo creates the hook's virtualenv in a temporary store of its own (PRE_COMMIT_HOME does not apply to it, so
nothing is reused between runs) and installs the light core into it: no torch or triton (they are the `[smoke]`
extra, and the hook passes --no-smoke). That takes about 10 s here, where it took 30 s to 3 minutes with torch
(docs/benchmarks.md, "The pre-commit hook's environment"). One run still covers a good adapter and two broken ones
in the same repository: the hook fails, and the per-adapter verdicts show which passed. A second test installs
the hook the way a user's `.pre-commit-config.yaml` does, into a PRE_COMMIT_HOME it can look into, and checks
that the environment holds neither torch nor triton.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import NOT_SOURCE

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "tiny-deepseek-v3"
HOOK_ID = "lora-convert-validate"

pytestmark = pytest.mark.slow


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, env=_git_env())


def _git_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(
        {
            "GIT_AUTHOR_NAME": "t",
            "GIT_AUTHOR_EMAIL": "t@t",
            "GIT_COMMITTER_NAME": "t",
            "GIT_COMMITTER_EMAIL": "t@t",
            "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_CONFIG_NOSYSTEM": "1",
        }
    )
    return env


def _committed_copy_of_checkout(dest: Path) -> Path:
    shutil.copytree(ROOT, dest, ignore=NOT_SOURCE)
    _git(dest, "init", "-q", "-b", "main")
    _git(dest, "add", "-A")
    _git(dest, "commit", "-q", "-m", "lora-convert working tree")
    return dest


def _copy_adapter(dest: Path, base: str) -> Path:
    shutil.copytree(EXAMPLE / "adapter", dest)
    config_path = dest / "adapter_config.json"
    config = json.loads(config_path.read_text())
    # The hook's args are the hook definition's ([--no-smoke]); the base comes from the adapter, as in a real repo.
    config["base_model_name_or_path"] = base
    config_path.write_text(json.dumps(config, indent=2))
    return dest


def _edit_tensors(adapter: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    path = adapter / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _nan_in_lora_a(tensors) -> None:
    key = next(k for k in sorted(tensors) if k.endswith("q_b_proj.lora_A.weight"))
    tensors[key][0, 0] = float("nan")


def _wrong_in_features(tensors) -> None:
    key = next(k for k in sorted(tensors) if k.endswith("q_b_proj.lora_A.weight"))
    tensors[key] = tensors[key][:, :-1].contiguous()  # one input column short of q_lora_rank


def _pre_commit(project: Path, home: Path, *args: str) -> subprocess.CompletedProcess:
    env = _git_env()
    env.update({"PRE_COMMIT_HOME": str(home), "HF_HUB_OFFLINE": "1", "NO_COLOR": "1", "COLUMNS": "200"})
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(
        [sys.executable, "-m", "pre_commit", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def _try_repo(hook_repo: Path, project: Path, home: Path, *, all_files: bool = True) -> subprocess.CompletedProcess:
    which = ["--all-files"] if all_files else []  # without it: the staged files, as at `git commit`
    return _pre_commit(project, home, "try-repo", str(hook_repo), HOOK_ID, *which, "--color", "never")


def test_hook_definition_as_pre_commit_reads_it():
    from pre_commit.clientlib import load_manifest

    (hook,) = [h for h in load_manifest(str(ROOT / ".pre-commit-hooks.yaml")) if h["id"] == HOOK_ID]
    assert hook["language"] == "python" and hook["entry"] == "lora-convert validate"
    assert hook["args"] == ["--no-smoke"] and hook["pass_filenames"] is True
    assert yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())[0]["id"] == HOOK_ID


def test_try_repo_installs_the_hook_and_catches_broken_adapters(tmp_path):
    hook_repo = _committed_copy_of_checkout(tmp_path / "lora-convert")

    project = tmp_path / "project"
    project.mkdir()
    _git(project, "init", "-q", "-b", "main")
    shutil.copytree(EXAMPLE / "base", project / "models" / "tiny-base")
    _copy_adapter(project / "adapters" / "good", "models/tiny-base")
    nan = _copy_adapter(project / "adapters" / "nan", "models/tiny-base")
    _edit_tensors(nan, _nan_in_lora_a)
    short = _copy_adapter(project / "adapters" / "short", "models/tiny-base")
    _edit_tensors(short, _wrong_in_features)
    _git(project, "add", "-A")  # --all-files runs on the files git tracks
    _git(project, "commit", "-q", "-m", "adapters")

    result = _try_repo(hook_repo, project, tmp_path / "pre-commit-home")
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "Failed" in result.stdout and "Traceback" not in out
    verdicts = [line for line in result.stdout.splitlines() if line.startswith(("OK", "FAIL"))]
    assert [v.split(":")[0] for v in verdicts if "adapters/good" in v] == ["OK"], verdicts
    assert [v.split(":")[0].split()[0] for v in verdicts if "adapters/nan" in v] == ["FAIL"], verdicts
    assert [v.split(":")[0].split()[0] for v in verdicts if "adapters/short" in v] == ["FAIL"], verdicts
    assert "data.nan" in result.stdout and "shapes.in-features" in result.stdout

    # A commit that changes only added_tokens.json (validate checks its ids against the base vocab, 128 here):
    # the hook runs on it and validates that adapter alone.
    (project / "adapters" / "good" / "added_tokens.json").write_text(json.dumps({"<new>": 130}))
    _git(project, "add", "adapters/good/added_tokens.json")
    staged = _try_repo(hook_repo, project, tmp_path / "pre-commit-home", all_files=False)
    out = staged.stdout + staged.stderr
    assert staged.returncode == 1 and "Failed" in staged.stdout and "tokens.added" in staged.stdout, out
    verdicts = [line for line in staged.stdout.splitlines() if line.startswith(("OK", "FAIL"))]
    assert len(verdicts) == 1 and verdicts[0].startswith("FAIL") and "adapters/good" in verdicts[0], out


def test_hook_environment_is_the_light_core(tmp_path):
    """What `pre-commit install-hooks` builds for a user's config: lora-convert without torch and triton."""
    hook_repo = _committed_copy_of_checkout(tmp_path / "lora-convert")
    rev = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=hook_repo, capture_output=True, text=True, check=True, env=_git_env()
    ).stdout.strip()
    project = tmp_path / "project"
    project.mkdir()
    _git(project, "init", "-q", "-b", "main")
    config = {"repos": [{"repo": str(hook_repo), "rev": rev, "hooks": [{"id": HOOK_ID}]}]}
    (project / ".pre-commit-config.yaml").write_text(yaml.safe_dump(config))
    home = tmp_path / "pre-commit-home"
    installed = _pre_commit(project, home, "install-hooks")
    assert installed.returncode == 0, installed.stdout + installed.stderr

    (python,) = home.glob("repo*/py_env-*/bin/python")
    probe = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.util as u, json; "
            "print(json.dumps({n: u.find_spec(n) is not None for n in ('lora_convert', 'numpy', 'torch', 'triton')}))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(probe.stdout) == {"lora_convert": True, "numpy": True, "torch": False, "triton": False}
