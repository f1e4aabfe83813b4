"""lora-convert as a user installs it: the wheel built from this checkout, installed into a fresh virtual
environment, run from a folder outside the checkout on a copy of the shipped example.

Why not `make test`'s editable install: it maps `lora_convert` onto the source tree, so a package left out of the
wheel (lora_convert.cli once was) still imports there. Here only the installed files can be found.

How the fresh environment gets its dependencies: the wheel is installed with `--no-deps`, and a `.pth` file in the
fresh venv names the site-packages of the interpreter running the tests (typer, numpy, ... and the `[smoke]` extra's
torch and triton: this module tests the full install; tests/test_light_install.py the core without the extra). A path line in
a `.pth` only appends that folder to sys.path; the `.pth` files inside it (among them the editable install's
finder hook) are not executed, so the checkout stays invisible, which `test_only_installed_files_are_used`
checks. Installing torch and triton into every fresh venv would add minutes and hundreds of MB per run; this way
the whole module takes about 15 s on a 2-core machine, most of it the CLI runs (each one imports torch).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from helpers import NOT_SOURCE, OUTPUT_LAYOUTS

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "tiny-deepseek-v3"
# Source folder -> where its files land in the wheel (setup.py's MAPPED_FOLDERS).
SHIPPED_SOURCES = {"lora_convert": "lora_convert", "kernels": "lora_convert/kernels", "schemas": "lora_convert/schemas"}

pytestmark = pytest.mark.slow


class Installed:
    """A fresh venv holding the wheel, and a working folder outside the checkout with a copy of the example."""

    def __init__(self, root: Path):
        self.root = root
        self.wheel: Path | None = None
        self.source: Path = root / "src"
        self.venv: Path = root / "venv"
        self.work: Path = root / "work"
        self.example: Path = self.work / "tiny-deepseek-v3"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def env(self) -> dict:
        env = {
            k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")
        }
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["HF_HUB_OFFLINE"] = "1"  # the example needs no network; a Hub lookup would be a bug
        env["TRITON_INTERPRET"] = "1"  # smoke on the CPU runs the Triton kernels in the interpreter, as the suite does
        env["NO_COLOR"] = "1"
        env["COLUMNS"] = "200"
        return env

    def run(self, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
        """The installed console script, as a user runs it."""
        return subprocess.run(
            [str(self.venv / "bin" / "lora-convert"), *args],
            cwd=self.work,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def python_code(self, code: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.python), "-c", code], cwd=self.work, env=self.env(), capture_output=True, text=True, timeout=300
        )


def _check(proc: subprocess.CompletedProcess, what: str) -> None:
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"


def suite_dependency_dirs() -> list[str]:
    """The site-packages of the interpreter running the tests: every dependency and extra `make test` installed."""
    return sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})


def build_and_install(root: Path, dependency_dirs: list[str]) -> Installed:
    """Build the wheel from a copy of the checkout, install it alone into a fresh venv under `root`, make the
    packages in `dependency_dirs` importable there (a `.pth` of path lines), and copy the example beside it."""
    inst = Installed(root)
    # Build from a copy: setuptools writes build/ and *.egg-info next to pyproject.toml, never into the checkout.
    shutil.copytree(ROOT, inst.source, ignore=NOT_SOURCE)
    dist = inst.root / "dist"
    # `python -m build` builds the sdist, then the wheel from the unpacked sdist, so a file the sdist leaves out
    # is missing from the wheel too. No isolation: the build backend (setuptools, in the test extra) comes from
    # this environment instead of a download on every run.
    _check(
        subprocess.run(
            [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(inst.source)],
            capture_output=True,
            text=True,
            timeout=300,
        ),
        "python -m build",
    )
    (inst.wheel,) = dist.glob("*.whl")

    _check(
        subprocess.run(
            [sys.executable, "-m", "venv", "--without-pip", str(inst.venv)], capture_output=True, text=True, timeout=120
        ),
        "python -m venv",
    )
    # This environment's pip installs into the fresh venv (pip --python), so the venv needs no pip of its own.
    _check(
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "--python",
                str(inst.python),
                "install",
                "--no-deps",
                "--no-index",
                "-q",
                str(inst.wheel),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        ),
        "pip install the wheel",
    )
    site = Path(
        subprocess.run(
            [str(inst.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    (site / "zz_test_dependencies.pth").write_text("".join(f"{p}\n" for p in dependency_dirs))

    inst.work.mkdir()
    shutil.copytree(EXAMPLE, inst.example)
    return inst


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    return build_and_install(tmp_path_factory.mktemp("wheel"), suite_dependency_dirs())


def _shipped_files(source: Path) -> set[str]:
    """Every module and JSON file under the shipped source folders, as wheel paths."""
    files = set()
    for folder, target in SHIPPED_SOURCES.items():
        for path in (source / folder).rglob("*"):
            if path.suffix in (".py", ".json") and "__pycache__" not in path.parts:
                files.add(f"{target}/{path.relative_to(source / folder).as_posix()}")
    return files


def test_wheel_holds_every_module_and_json(installed):
    names = set(zipfile.ZipFile(installed.wheel).namelist())
    expected = _shipped_files(installed.source)
    assert "lora_convert/cli/__init__.py" in expected and "lora_convert/kernels/availability.py" in expected
    missing = sorted(expected - names)
    assert not missing, f"left out of the wheel (see setup.py's package discovery): {missing}"
    assert not [n for n in names if n.split("/")[0] not in ("lora_convert",) and ".dist-info/" not in n], (
        "the wheel installs something besides lora_convert (e.g. a top-level `kernels`)"
    )


PROBE = r"""
import importlib, importlib.metadata as md, json, pkgutil, sys
from packaging.requirements import Requirement
import lora_convert
import lora_convert.kernels, lora_convert.schemas  # folders without __init__.py: walk_packages skips them
mods = {}
for package in (lora_convert, lora_convert.kernels):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        if info.name.endswith(".__main__"):
            continue  # importing it runs the CLI
        mods[info.name] = importlib.import_module(info.name).__file__
mods["lora_convert"] = lora_convert.__file__
for package in (lora_convert.kernels, lora_convert.schemas):
    (mods[package.__name__],) = package.__path__
dist = md.distribution("lora-convert")
unmet = []
for text in dist.requires or []:
    req = Requirement(text)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # an extra (test, proof) or another platform
    try:
        have = md.version(req.name)
    except md.PackageNotFoundError:
        unmet.append(f"{req} (not installed)")
        continue
    if not req.specifier.contains(have, prereleases=True):
        unmet.append(f"{req} (have {have})")
print(json.dumps({"modules": mods, "sys_path": sys.path, "meta_path": [repr(f) for f in sys.meta_path],
                  "dist": str(dist.locate_file("")), "requires": dist.requires, "unmet": unmet}))
"""


@pytest.fixture(scope="module")
def probe(installed) -> dict:
    proc = installed.python_code(PROBE)
    _check(proc, "importing every installed module")
    return json.loads(proc.stdout)


def test_only_installed_files_are_used(installed, probe):
    venv = installed.venv.resolve()
    modules = probe["modules"]
    for name in (
        "lora_convert",
        "lora_convert.cli",
        "lora_convert.kernels",
        "lora_convert.schemas",
        "lora_convert.arch.presets",
        "lora_convert.engines",
    ):
        assert name in modules, f"{name} is not importable from the installed wheel"
    outside = {n: f for n, f in modules.items() if not Path(f).resolve().is_relative_to(venv)}
    assert not outside, f"modules loaded from outside the fresh venv: {outside}"
    assert Path(probe["dist"]).resolve().is_relative_to(venv)
    root = ROOT.resolve()
    assert not [p for p in probe["sys_path"] if p and Path(p).resolve() == root], "the checkout is on sys.path"
    assert not [f for f in probe["meta_path"] if "editable" in f.lower()], "an editable-install finder is active"


def test_declared_dependencies_are_satisfied(probe):
    assert probe["requires"], "the wheel declares no dependencies"
    assert probe["unmet"] == []


def test_torch_and_triton_are_only_the_smoke_extra(probe):
    """The core installs without them (the pre-commit hook and the Action); `[smoke]` brings both."""
    heavy = [r for r in probe["requires"] if r.split(";")[0].strip().startswith(("torch", "triton"))]
    assert sorted(r.split(";")[0].split(">")[0].strip() for r in heavy) == ["torch", "triton"], probe["requires"]
    assert all('extra == "smoke"' in r for r in heavy), heavy


def test_help_and_version(installed, probe):
    help_ = installed.run("--help")
    _check(help_, "--help")
    for command in ("inspect", "normalize", "validate", "smoke", "schemas"):
        assert command in help_.stdout
    version = installed.run("--version")
    _check(version, "--version")
    init = installed.python_code("import lora_convert; print(lora_convert.__version__)")
    _check(init, "lora_convert.__version__")
    assert version.stdout.split() == ["lora-convert", init.stdout.strip()]


def test_inspect(installed):
    proc = installed.run("inspect", "tiny-deepseek-v3/adapter")
    _check(proc, "inspect")
    assert "kv_a_proj_with_mqa" in proc.stdout and "q_b_proj" in proc.stdout


def test_report_writes_the_fleet_page(installed):
    """The page's template, styles and script are package data: the wheel must ship them."""
    (installed.work / "scan.jsonl").write_text('{"id": "a", "status": "ok", "findings": [], "bytes": 7}\n')
    proc = installed.run("report", "scan.jsonl", "--html", "fleet.html")
    _check(proc, "report")
    page = (installed.work / "fleet.html").read_text()
    assert 'id="fleet-data"' in page and "function compare(" in page and "#adapters th" in page


def test_schemas_list_and_show(installed):
    listed = installed.run("schemas", "list")
    _check(listed, "schemas list")
    assert "deepseek_v3" in listed.stdout and "deepseek-v3" in listed.stdout  # a schema and a preset
    shown = installed.run("schemas", "show", "deepseek-v3")
    _check(shown, "schemas show deepseek-v3")
    assert "fused_qkv_a_proj_with_mqa" in shown.stdout


def test_validate_against_a_preset(installed):
    # The tiny example is not the real DeepSeek-V3: the shipped preset and schema must be found, and every shape
    # compared against the real dimensions fails.
    proc = installed.run(
        "validate", "tiny-deepseek-v3/adapter", "--base", "deepseek-v3", "--no-smoke", "--format", "json"
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is False
    assert any(f["code"].startswith("shapes.") and f["severity"] == "error" for f in report["findings"])
    assert "Traceback" not in proc.stderr


def test_validate_against_a_folder_base(installed):
    proc = installed.run("validate", "tiny-deepseek-v3/adapter", "--base", str(installed.example / "base"))
    _check(proc, "validate --base <folder>")
    assert "OK" in proc.stdout and "smoke.passed" in proc.stdout  # the default smoke ran through the kernels


@pytest.mark.parametrize("layout, marker", OUTPUT_LAYOUTS)
def test_normalize(installed, layout, marker):
    out = installed.work / f"out-{layout}"
    proc = installed.run(
        "normalize", "tiny-deepseek-v3/adapter", "--base", "tiny-deepseek-v3/base", "--layout", layout, "-o", out.name
    )
    _check(proc, f"normalize --layout {layout}")
    written = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", marker} <= written, written
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_smoke_on_cpu(installed):
    out = installed.work / "out-stacked-for-smoke"
    _check(
        installed.run("normalize", "tiny-deepseek-v3/adapter", "--base", "tiny-deepseek-v3/base", "-o", out.name),
        "normalize",
    )
    proc = installed.run(
        "smoke",
        out.name,
        "--original",
        "tiny-deepseek-v3/adapter",
        "--base",
        "tiny-deepseek-v3/base",
        "--device",
        "cpu",
    )
    _check(proc, "smoke")
    assert "PASS" in proc.stdout
