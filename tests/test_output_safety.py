"""`normalize -o OUT [--force]` never destroys anything but its own previous output (issue 11, item 2).

The scene is the one from the issue: a folder `d/` holding the adapter `myad/`, the base `base/` and a user's
`notes.txt`, inside a folder `root/` that holds another bystander. Every case hashes every entry under `root/`
before and after: a refused run must leave the tree byte-identical (no temp folder left either), and a run that
writes may change only its own output folder.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lora_convert.cli import app
from lora_convert.io.output_folder import MANIFEST_FILE

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny-deepseek-v3"
STACKED_FILES = {"adapter_config.json", "adapter_model.safetensors", "lora_layout.json", MANIFEST_FILE}


@pytest.fixture
def root(tmp_path) -> Path:
    root = tmp_path / "root"
    d = root / "d"
    d.mkdir(parents=True)
    shutil.copytree(EXAMPLE / "adapter", d / "myad")
    shutil.copytree(EXAMPLE / "base", d / "base")
    (d / "notes.txt").write_text("a user's notes\n")
    (root / "top.txt").write_text("a file two levels above the adapter\n")
    return root


def tree(folder: Path) -> dict[str, str]:
    """Every entry under `folder` (hidden ones included): file -> sha256, folder -> 'dir', link -> its target."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = "link:" + str(p.readlink())
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run(cwd: Path, *args: str, monkeypatch):
    monkeypatch.chdir(cwd)
    return CliRunner().invoke(app, ["normalize", *args])


def refused(root: Path, cwd: Path, args: list[str], monkeypatch, *needles: str) -> str:
    """Run, assert exit 2 with every needle in the message and not a byte changed under root; return the message."""
    before = tree(root)
    result = run(cwd, *args, monkeypatch=monkeypatch)
    message = " ".join(result.output.split())  # rich may wrap a long message; compare on single spaces
    assert result.exit_code == 2, result.output
    assert "Error:" in message and "Traceback" not in message
    for needle in needles:
        assert needle in message, message
    assert tree(root) == before
    return message


# ------------------------------------------------------------------------------- OUT overlapping the input
@pytest.mark.parametrize("force", [[], ["--force"]])
def test_parent_of_the_input_is_refused(root, monkeypatch, force):
    refused(
        root,
        root,
        ["d/myad", "--base", "d/base", "-o", "d", *force],
        monkeypatch,
        f"({root / 'd'}) contains the input adapter folder d/myad ({root / 'd' / 'myad'})",
    )


def test_two_levels_up_is_refused(root, monkeypatch):
    refused(
        root,
        root / "d",
        ["myad", "--base", "base", "-o", str(root), "--force"],
        monkeypatch,
        f"The output folder {root} ",
        "contains the input adapter folder myad",
    )


def test_dot_from_inside_the_parent_is_refused(root, monkeypatch):
    refused(
        root,
        root / "d",
        ["myad", "--base", "base", "-o", ".", "--force"],
        monkeypatch,
        f"The output folder . ({root / 'd'}) contains the input adapter folder myad",
    )


def test_dot_dot_from_inside_the_adapter_is_refused(root, monkeypatch):
    refused(
        root,
        root / "d" / "myad",
        [".", "--base", "../base", "-o", "..", "--force"],
        monkeypatch,
        f"The output folder .. ({root / 'd'}) contains the input adapter folder .",
    )


def test_the_input_itself_is_refused(root, monkeypatch):
    refused(
        root,
        root / "d",
        ["myad", "--base", "base", "-o", "myad", "--force"],
        monkeypatch,
        "The output folder myad",
        "is the input adapter folder myad",
    )


def test_a_folder_inside_the_input_is_refused(root, monkeypatch):
    refused(
        root,
        root / "d",
        ["myad", "--base", "base", "-o", "myad/sub"],
        monkeypatch,
        "The output folder myad/sub",
        "is inside the input adapter folder myad",
    )


@pytest.mark.parametrize("out", ["link", "link/sub"])
def test_a_symlink_to_the_input_is_refused(root, monkeypatch, out):
    (root / "d" / "link").symlink_to("myad")
    refused(
        root,
        root / "d",
        ["myad", "--base", "base", "-o", out, "--force"],
        monkeypatch,
        f"({root / 'd' / 'myad'}",
        "the input adapter folder myad",
    )


def test_the_input_through_a_symlink_is_protected(root, monkeypatch):
    (root / "alias").symlink_to(root / "d" / "myad")
    refused(
        root,
        root,
        ["alias", "--base", "d/base", "-o", "d", "--force"],
        monkeypatch,
        "contains the input adapter folder alias",
    )


@pytest.mark.parametrize("out", ["base", "base/out", "."])
def test_the_base_folder_is_protected(root, monkeypatch, out):
    # The adapter lies elsewhere, so only the base is in the way (`.` is the folder holding the base).
    shutil.move(root / "d" / "myad", root / "myad")
    refused(
        root, root / "d", ["../myad", "--base", "base", "-o", out, "--force"], monkeypatch, "the base model folder base"
    )


# ------------------------------------------------------------------------------------------ what --force replaces
def test_an_unrelated_folder_is_refused_even_with_force(root, monkeypatch):
    other = root / "other"
    other.mkdir()
    (other / "thesis.tex").write_text("years of work")
    (other / "data.csv").write_text("1,2\n")
    refused(
        root,
        root,
        ["d/myad", "--base", "d/base", "-o", "other", "--force"],
        monkeypatch,
        "--force replaces only an empty folder or a previous lora-convert output",
        "data.csv, thesis.tex",
        f"no {MANIFEST_FILE}",
    )


def test_a_non_empty_folder_without_force_is_refused(root, monkeypatch):
    other = root / "other"
    other.mkdir()
    (other / "a.txt").write_text("x")
    refused(
        root, root, ["d/myad", "--base", "d/base", "-o", "other"], monkeypatch, "exists and is not empty", "--force"
    )


def test_a_file_as_output_is_refused(root, monkeypatch):
    refused(
        root,
        root / "d",
        ["myad", "--base", "base", "-o", "notes.txt", "--force"],
        monkeypatch,
        "notes.txt exists and is not a folder",
    )


def test_the_working_directory_is_refused(root, monkeypatch):
    # Even empty: the output is swapped in as a whole folder, which the folder a shell sits in cannot be.
    (root / "work").mkdir()
    refused(
        root,
        root / "work",
        ["../d/myad", "--base", "../d/base", "-o", "."],
        monkeypatch,
        f"The output folder . ({root / 'work'}) is the current working directory",
        f"cd {root}",
    )


def test_an_empty_folder_is_filled(root, monkeypatch):
    (root / "out").mkdir()
    before = tree(root)
    result = run(root, "d/myad", "--base", "d/base", "-o", "out", monkeypatch=monkeypatch)
    assert result.exit_code == 0, result.output
    assert {p.name for p in (root / "out").iterdir()} == STACKED_FILES
    after = tree(root)
    assert {k: v for k, v in after.items() if not k.startswith("out/")} == before


def test_a_previous_output_is_replaced(root, monkeypatch):
    first = run(root, "d/myad", "--base", "d/base", "-o", "out", "--layout", "sglang", monkeypatch=monkeypatch)
    assert first.exit_code == 0, first.output
    assert json.loads((root / "out" / MANIFEST_FILE).read_text())["layout"] == "sglang"
    before = {k: v for k, v in tree(root).items() if not k.startswith("out")}
    result = run(root, "d/myad", "--base", "d/base", "-o", "out", "--force", monkeypatch=monkeypatch)
    assert result.exit_code == 0, result.output
    # The sglang report is gone (the old output was replaced, not merged) and no temp or old folder is left.
    assert {p.name for p in (root / "out").iterdir()} == STACKED_FILES
    assert json.loads((root / "out" / MANIFEST_FILE).read_text())["layout"] == "stacked"
    assert {k: v for k, v in tree(root).items() if not k.startswith("out")} == before


def test_a_previous_output_with_a_user_file_is_refused(root, monkeypatch):
    first = run(root, "d/myad", "--base", "d/base", "-o", "out", monkeypatch=monkeypatch)
    assert first.exit_code == 0, first.output
    (root / "out" / "my-eval-results.json").write_text("{}")
    (root / "out" / "runs").mkdir()
    refused(
        root,
        root,
        ["d/myad", "--base", "d/base", "-o", "out", "--force"],
        monkeypatch,
        "is a previous lora-convert output but also holds my-eval-results.json, runs",
    )


def test_a_listed_name_that_is_now_a_folder_is_refused(root, monkeypatch):
    first = run(root, "d/myad", "--base", "d/base", "-o", "out", monkeypatch=monkeypatch)
    assert first.exit_code == 0, first.output
    (root / "out" / "lora_layout.json").unlink()
    (root / "out" / "lora_layout.json").mkdir()
    (root / "out" / "lora_layout.json" / "mine.txt").write_text("x")
    refused(
        root, root, ["d/myad", "--base", "d/base", "-o", "out", "--force"], monkeypatch, "also holds lora_layout.json"
    )


class _Interrupt:
    """A WriteProgress that stops the run (as Ctrl-C would) after the first group is written."""

    def __init__(self) -> None:
        self.advances = 0

    def start(self, total_bytes: int) -> None:
        pass

    def advance(self, nbytes: int) -> None:
        self.advances += 1
        if self.advances == 2:
            raise KeyboardInterrupt


@pytest.mark.parametrize("layout", ["stacked", "peft"])
def test_an_interrupted_run_keeps_the_previous_output(root, monkeypatch, layout):
    from lora_convert.pipeline.commands import normalize

    first = run(root, "d/myad", "--base", "d/base", "-o", "out", monkeypatch=monkeypatch)
    assert first.exit_code == 0, first.output
    before = tree(root)
    progress = _Interrupt()
    with pytest.raises(KeyboardInterrupt):
        normalize(
            root / "d" / "myad",
            root / "out",
            base=str(root / "d" / "base"),
            force=True,
            progress=progress,
            layout=layout,
        )
    assert progress.advances == 2  # it really stopped midway, after data had been written
    assert tree(root) == before  # the previous output intact, and neither a temp nor an old folder left


def test_library_accepts_paths_and_refuses_like_the_cli(root):
    from lora_convert.errors import UsageError
    from lora_convert.pipeline.commands import normalize

    before = tree(root)
    with pytest.raises(UsageError, match="contains the input adapter folder"):
        normalize(root / "d" / "myad", root / "d", base=str(root / "d" / "base"), force=True)
    assert tree(root) == before
    result = normalize(str(root / "d" / "myad"), str(root / "out"), base=str(root / "d" / "base"))
    assert result.output == root / "out" and {p.name for p in (root / "out").iterdir()} == STACKED_FILES
