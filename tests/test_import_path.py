"""One import path: `lora_convert.kernels` and `lora_convert.schemas` resolve the same way installed, editable or
run from the checkout root, and the repository's top-level `kernels/` folder never shadows another distribution.

The checkout keeps kernels/ and schemas/ at its top (the design's folders); they have no `__init__.py`, so neither
can be imported as a top-level package that wins over a real one (PyPI's `kernels`, which transformers imports),
and `lora_convert/__init__.py` binds them as its subpackages when they are not inside the package (a checkout).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_wheel_install import build_and_install, suite_dependency_dirs

ROOT = Path(__file__).resolve().parent.parent


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(HF_HUB_OFFLINE="1", TRITON_INTERPRET="1", NO_COLOR="1", COLUMNS="200", **extra)
    return env


def _python(python: Path | str, code: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(python), "-c", code], cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=300
    )


def _ok(proc: subprocess.CompletedProcess, what: str) -> str:
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


# What a user of the checkout touches: the package, its schemas (through the schema loader), the kernels'
# modules (found, not imported: that needs triton) and the light availability module.
CHECKOUT_PROBE = r"""
import importlib.util, json
import lora_convert
from lora_convert.arch.schema import list_schemas, load_schema
import lora_convert.kernels.availability as availability
import lora_convert.schemas
shrink = importlib.util.find_spec("lora_convert.kernels.shrink")
print(json.dumps({
    "package": lora_convert.__file__,
    "schemas": list_schemas(),
    "deepseek": load_schema("deepseek_v3").family,
    "shrink": shrink.origin if shrink else None,
    "availability": availability.__file__,
    "schema_path": list(lora_convert.schemas.__path__),
}))
"""


def _assert_checkout_probe(out: str, root: Path) -> None:
    probe = json.loads(out)
    root = root.resolve()
    assert Path(probe["package"]).resolve() == root / "lora_convert" / "__init__.py"
    assert "deepseek_v3" in probe["schemas"] and len(probe["schemas"]) > 10
    assert probe["deepseek"] == "deepseek_v3"
    assert probe["shrink"] and Path(probe["shrink"]).resolve() == root / "kernels" / "shrink.py"
    assert Path(probe["availability"]).resolve() == root / "kernels" / "availability.py"
    assert [Path(p).resolve() for p in probe["schema_path"]] == [root / "schemas"]


def test_top_level_folders_are_not_regular_packages():
    # A regular package (with __init__.py) named `kernels` on sys.path wins over any other distribution's.
    for folder in ("kernels", "schemas"):
        assert (ROOT / folder).is_dir()
        assert not (ROOT / folder / "__init__.py").exists(), f"{folder}/__init__.py makes `import {folder}` ours"


def test_checkout_without_any_install(tmp_path):
    """A source copy imported with nothing installed: the copy's own folders serve lora_convert.kernels/.schemas."""
    import shutil

    from helpers import NOT_SOURCE

    copy = tmp_path / "src"
    shutil.copytree(ROOT, copy, ignore=NOT_SOURCE)
    # -I: isolated (no user site, no PYTHONPATH), -S: no site-packages, so the editable install is invisible;
    # the probe needs no third-party package. cwd first on sys.path is what `python -c` gives a user.
    code = "import sys; sys.path.insert(0, '.'); " + CHECKOUT_PROBE
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", code], cwd=copy, capture_output=True, text=True, timeout=120
    )
    _assert_checkout_probe(_ok(proc, "import from a bare source copy"), copy)


def test_editable_install_binds_the_checkout_folders():
    """The suite's own interpreter (the editable install of `make setup`), from the checkout root and elsewhere."""
    for cwd in (ROOT, ROOT / "tests"):
        _assert_checkout_probe(_ok(_python(sys.executable, CHECKOUT_PROBE, cwd), f"import from {cwd}"), ROOT)


def test_nothing_puts_the_checkout_root_on_sys_path():
    """Not the editable install's .pth/finder (a fresh interpreter of the suite's environment, started elsewhere)."""
    root = ROOT.resolve()
    code = "import sys, json; print(json.dumps(sys.path))"
    paths = json.loads(_ok(_python(sys.executable, code, ROOT / "tests"), "sys.path of a fresh interpreter"))
    assert not [p for p in paths if p and Path(p).resolve() == root], paths


# Hugging Face's `kernels` (a dependency of transformers >= 5): the distribution's package must be what
# `import kernels` finds, both from the checkout root (cwd first on sys.path) and with the root put on
# sys.path explicitly; transformers' hub-kernels integration imports names our folder never had.
PYPI_KERNELS_PROBE = r"""
import importlib.metadata as md, json
import kernels
from kernels import CUDAProperties  # what transformers 5.25 imported and failed on when ./kernels won
from transformers.utils.import_utils import is_kernels_available
print(json.dumps({"file": kernels.__file__, "dist": str(md.distribution("kernels").locate_file("")),
                  "transformers_sees_it": is_kernels_available()}))
"""


@pytest.mark.slow  # a subprocess that imports transformers: about a second each
@pytest.mark.parametrize("root_on_path", [False, True], ids=["cwd-is-root", "root-on-PYTHONPATH"])
def test_pypi_kernels_package_wins_next_to_the_checkout(root_on_path):
    pytest.importorskip("transformers", reason="the proof extra (transformers) is part of `make setup`")
    env = {"PYTHONPATH": str(ROOT)} if root_on_path else {}
    probe = json.loads(_ok(_python(sys.executable, PYPI_KERNELS_PROBE, ROOT, **env), "import PyPI's kernels"))
    kernels_file = Path(probe["file"]).resolve()
    assert not kernels_file.is_relative_to((ROOT / "kernels").resolve()), (
        f"our kernels/ shadowed PyPI's: {kernels_file}"
    )
    assert kernels_file.is_relative_to(Path(probe["dist"]).resolve())
    assert probe["transformers_sees_it"] is True
    # And the project still finds its own kernels beside it.
    _assert_checkout_probe(_ok(_python(sys.executable, CHECKOUT_PROBE, ROOT, **env), "lora_convert beside it"), ROOT)


@pytest.mark.slow
def test_transformers_hub_kernels_imports_from_the_checkout_root():
    """The exact failure of issue 22: transformers' integration, imported with the checkout root on sys.path."""
    pytest.importorskip("transformers", reason="the proof extra (transformers) is part of `make setup`")
    code = "import transformers.integrations.hub_kernels as h; print(h.__name__)"
    out = _ok(_python(sys.executable, code, ROOT, PYTHONPATH=str(ROOT)), "import transformers' hub_kernels")
    assert out.strip() == "transformers.integrations.hub_kernels"


# -------------------------------------------------------------------- a non-editable install, used from the root
@pytest.fixture(scope="module")
def wheel_installed(tmp_path_factory):
    return build_and_install(tmp_path_factory.mktemp("wheel-root"), suite_dependency_dirs())


@pytest.mark.slow
def test_installed_wheel_then_run_from_the_checkout_root(wheel_installed):
    """`./lora_convert` wins over the installed one when Python runs from the root (docs/api.md's examples do)."""
    python = wheel_installed.python
    _assert_checkout_probe(_ok(_python(python, CHECKOUT_PROBE, ROOT), "import lora_convert from the root"), ROOT)
    proc = subprocess.run(
        [str(python), "-m", "lora_convert", "schemas", "list"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "deepseek_v3" in _ok(proc, "python -m lora_convert schemas list (from the root)")


@pytest.mark.slow
def test_installed_wheel_elsewhere_uses_only_its_files(wheel_installed):
    """Away from the checkout the wheel's own lora_convert/kernels and lora_convert/schemas serve."""
    probe = json.loads(_ok(_python(wheel_installed.python, CHECKOUT_PROBE, wheel_installed.work), "installed import"))
    package = Path(probe["package"]).resolve().parent
    assert package.is_relative_to(wheel_installed.venv.resolve())
    assert Path(probe["shrink"]).resolve() == package / "kernels" / "shrink.py"
    assert [Path(p).resolve() for p in probe["schema_path"]] == [package / "schemas"]
    assert "deepseek_v3" in probe["schemas"]


@pytest.mark.slow
def test_gpu_tests_collect_from_a_source_copy_with_the_wheel_installed(wheel_installed):
    """`pytest -m gpu` from a source copy (the device machine's way) with the wheel installed must collect."""
    proc = subprocess.run(
        [
            str(wheel_installed.python),
            "-m",
            "pytest",
            "-m",
            "gpu",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_kernels.py",
            "tests/test_smoke.py",
        ],
        cwd=wheel_installed.source,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = _ok(proc, "pytest -m gpu --collect-only")
    assert "test_gpu_suite" in out and "ERROR" not in out, out
