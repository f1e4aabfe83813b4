"""lora-convert without its `[smoke]` extra: the light core that the pre-commit hook and the Action install.

The wheel is built and installed into a fresh venv as in tests/test_wheel_install.py, but its dependencies come from
a filtered view of the test environment's site-packages: a folder of symlinks to every entry except torch, triton,
the NVIDIA runtime packages and the packages built on torch. So in the fresh venv `import torch` fails, as it does
after `pip install lora-convert`, and every command must either work without torch or say how to install it:
inspect, schemas, validate (smoke becomes a note) and normalize work; `smoke` and `validate --smoke` exit 3 with
the install command.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest

from helpers import OUTPUT_LAYOUTS
from test_wheel_install import Installed, _check, build_and_install

pytestmark = pytest.mark.slow

INSTALL_COMMAND = "pip install 'lora-convert[smoke]'"
# Top-level names in site-packages that the light install must not see: the `[smoke]` extra, what it pulls in,
# packages that import torch, and the test environment's own (editable) lora-convert.
HIDDEN_PREFIXES = (
    "torch",
    "functorch",
    "triton",
    "nvidia",
    "transformers",
    "peft",
    "accelerate",
    "lora_convert",
    "__editable__",
)


def _light_view(site_packages: list[str], dest: Path) -> Path:
    """A folder of symlinks to each entry of `site_packages` but the hidden ones (first folder wins, as on sys.path)."""
    dest.mkdir()
    for folder in site_packages:
        for entry in Path(folder).iterdir():
            name = entry.name.lower().replace("-", "_")
            if name.startswith(HIDDEN_PREFIXES) or (dest / entry.name).exists():
                continue
            (dest / entry.name).symlink_to(entry)
    return dest


@pytest.fixture(scope="module")
def light(tmp_path_factory) -> Installed:
    root = tmp_path_factory.mktemp("light")
    paths = sysconfig.get_paths()
    view = _light_view(sorted({paths["purelib"], paths["platlib"]}), root / "site-packages-without-smoke")
    return build_and_install(root / "install", [str(view)])


def test_torch_and_triton_cannot_be_imported(light):
    """The premise of every other test here: the fresh venv is a light install."""
    proc = light.python_code(
        "import importlib.util as u, json; print(json.dumps({n: u.find_spec(n) is not None for n in "
        "('torch', 'triton', 'numpy', 'safetensors', 'typer', 'lora_convert')}))"
    )
    _check(proc, "find_spec")
    assert json.loads(proc.stdout) == {
        "torch": False,
        "triton": False,
        "numpy": True,
        "safetensors": True,
        "typer": True,
        "lora_convert": True,
    }
    imported = light.python_code("import torch")
    assert imported.returncode != 0 and "No module named 'torch'" in imported.stderr


def test_help(light):
    proc = light.run("--help")
    _check(proc, "--help")
    for command in ("inspect", "normalize", "validate", "smoke", "schemas"):
        assert command in proc.stdout


def test_inspect(light):
    proc = light.run("inspect", "tiny-deepseek-v3/adapter")
    _check(proc, "inspect")
    assert "kv_a_proj_with_mqa" in proc.stdout and "q_b_proj" in proc.stdout


def test_schemas_list(light):
    proc = light.run("schemas", "list")
    _check(proc, "schemas list")
    assert "deepseek_v3" in proc.stdout and "deepseek-v3" in proc.stdout


def test_validate_reports_smoke_as_not_run(light):
    """The default smoke cannot run without torch: a note and a "Not run" entry that says how to install it."""
    text = light.run("validate", "tiny-deepseek-v3/adapter", "--base", "tiny-deepseek-v3/base")
    _check(text, "validate")
    verdict = text.stdout.strip().splitlines()[-1]
    assert verdict.startswith("OK") and "data" in verdict.split("Checked:")[1].split("Not run:")[0], verdict
    assert f"smoke (torch not installed: {INSTALL_COMMAND})" in verdict, verdict
    assert "Traceback" not in text.stderr

    proc = light.run("validate", "tiny-deepseek-v3/adapter", "--base", "tiny-deepseek-v3/base", "--format", "json")
    _check(proc, "validate --format json")
    report = json.loads(proc.stdout)
    smoke = [f for f in report["findings"] if f["code"].startswith("smoke.")]
    assert [(f["code"], f["severity"]) for f in smoke] == [("smoke.not-installed", "info")]
    assert INSTALL_COMMAND in smoke[0]["fix"]
    assert report["summary"]["checks"]["skipped"]["smoke"] == f"torch not installed: {INSTALL_COMMAND}"
    assert report["ok"] is True


@pytest.mark.parametrize(
    "args",
    [
        ["validate", "tiny-deepseek-v3/adapter", "--base", "tiny-deepseek-v3/base", "--smoke"],
        ["smoke", "tiny-deepseek-v3/adapter", "--base", "tiny-deepseek-v3/base"],
        ["smoke", "tiny-deepseek-v3/adapter", "--base", "tiny-deepseek-v3/base", "--device", "cpu"],
    ],
    ids=["validate --smoke", "smoke", "smoke --device cpu"],
)
def test_smoke_asked_for_is_an_environment_problem(light, args):
    proc = light.run(*args)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    error, hint = proc.stderr.split("Hint:", 1)
    assert error.lstrip().startswith("Error:") and "torch" in error, proc.stderr
    assert INSTALL_COMMAND in " ".join(hint.split()), proc.stderr


@pytest.mark.parametrize("layout, marker", OUTPUT_LAYOUTS)
def test_normalize(light, layout, marker):
    out = light.work / f"out-{layout}"
    proc = light.run(
        "normalize", "tiny-deepseek-v3/adapter", "--base", "tiny-deepseek-v3/base", "--layout", layout, "-o", out.name
    )
    _check(proc, f"normalize --layout {layout}")
    written = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", marker} <= written, written
    assert (out / "adapter_model.safetensors").stat().st_size > 0


def test_validate_of_a_normalized_output(light):
    """The light core reads back what it wrote (the data scan runs on the stacked tensors, without torch)."""
    out = light.work / "out-for-validate"
    _check(
        light.run("normalize", "tiny-deepseek-v3/adapter", "--base", "tiny-deepseek-v3/base", "-o", out.name),
        "normalize",
    )
    proc = light.run("validate", out.name, "--base", "tiny-deepseek-v3/base", "--format", "json")
    _check(proc, "validate OUT")
    report = json.loads(proc.stdout)
    assert report["ok"] is True and "data" in report["summary"]["checks"]["run"], report["summary"]


def test_ci_installs_the_light_core():
    """The Action installs the package without extras (the hook too: pre-commit's python language has none to
    add); the hook then skips the smoke forward explicitly."""
    import yaml

    root = Path(__file__).resolve().parent.parent
    steps = yaml.safe_load((root / "action.yml").read_text())["runs"]["steps"]
    (install,) = [s for s in steps if s.get("name") == "Install lora-convert"]
    assert install["run"].split()[-1] == '"$ACTION_PATH"', install["run"]  # no '[smoke]' after the path
    (hook,) = yaml.safe_load((root / ".pre-commit-hooks.yaml").read_text())
    assert hook["language"] == "python" and "--no-smoke" in hook["args"]
