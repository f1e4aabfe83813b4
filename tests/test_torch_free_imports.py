"""The core commands run without torch or triton: `inspect`, `validate --no-smoke` (data scan included),
`normalize` in every layout and `schemas`.

Each command runs in a fresh interpreter in which importing torch or triton is impossible (a meta-path finder
refuses them and records the attempt, so even a guarded `try: import torch` counts). The command must succeed as
usual and nothing may have tried to import either; a last check confirms the finder really blocks torch.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import case_base_dir, case_dir

# Every core command in a subprocess: not the unit layer (`make test-fast` skips this module).
pytestmark = pytest.mark.slow

RUNNER = r"""
import json, sys

BLOCKED = ("torch", "triton")
attempts = []


class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            attempts.append(name)
            raise ImportError(f"{name} is blocked in this test")
        return None


sys.meta_path.insert(0, Refuse())
sys.argv = ["lora-convert", *json.loads(sys.argv[1])]
from lora_convert.cli import main

code = 0
try:
    main()
except SystemExit as exc:
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
sys.stderr.write("\nRESULT " + json.dumps({"code": code, "attempts": attempts, "loaded": loaded}) + "\n")
"""


def run_blocked(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(args)], capture_output=True, text=True, timeout=300)
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    result["output"] = proc.stdout + proc.stderr
    return result


CASE = "v5_deepseek_v3"  # PEFT 3-D experts, MLA: every kind of group and the 3-D transposes


def _commands(tmp_path) -> dict[str, list[str]]:
    adapter, base = str(case_dir(CASE) / "adapter"), str(case_base_dir(CASE))
    return {
        "inspect": ["inspect", adapter],
        "validate": ["validate", adapter, "--base", base, "--no-smoke"],
        "validate-engine": ["validate", adapter, "--base", base, "--no-smoke", "--engine", "sglang"],
        "normalize-stacked": ["normalize", adapter, "--base", base, "-o", str(tmp_path / "s"), "--dtype", "bf16"],
        "normalize-sglang": ["normalize", adapter, "--base", base, "-o", str(tmp_path / "g"), "--layout", "sglang"],
        "normalize-peft": [
            "normalize",
            adapter,
            "--base",
            base,
            "-o",
            str(tmp_path / "p"),
            "--layout",
            "peft",
            "--dtype",
            "fp16",
            "--drop-unsupported",
        ],
        "schemas-list": ["schemas", "list"],
        "schemas-show": ["schemas", "show", "deepseek-v3"],
    }


@pytest.mark.parametrize(
    "name",
    [
        "inspect",
        "validate",
        "validate-engine",
        "normalize-stacked",
        "normalize-sglang",
        "normalize-peft",
        "schemas-list",
        "schemas-show",
    ],
)
def test_core_command_never_imports_torch_or_triton(name, tmp_path):
    result = run_blocked(_commands(tmp_path)[name])
    # validate exits 1 on this fixture's findings for an engine (errors), 0 otherwise: never 3 (environment) or 4
    assert result["code"] in (0, 1), result["output"]
    assert result["attempts"] == [] and result["loaded"] == [], result["output"]
    if name.startswith("normalize"):
        out = tmp_path / {"normalize-stacked": "s", "normalize-sglang": "g", "normalize-peft": "p"}[name]
        assert (out / "adapter_model.safetensors").stat().st_size > 0


def test_the_blocker_blocks():
    """The finder does refuse torch: a command that needs it (reading a legacy .bin) reports exit 3."""
    result = run_blocked(["inspect", str(case_dir("v5_deepseek_v3_bin") / "adapter")])
    assert result["attempts"] and result["code"] == 3, result["output"]
    assert "pip install 'lora-convert[smoke]'" in result["output"]


DEFAULT_SMOKE_RUNNER = r"""
import json, sys

from lora_convert.check import smoke as smoke_check

smoke_check.SMOKE_CPU_LIMIT_BYTES = 0  # every adapter is "large": the default smoke is off on a CPU
driver = json.loads(sys.argv[2])
smoke_check.gpu_driver_present = lambda: driver
sys.argv = ["lora-convert", *json.loads(sys.argv[1])]
from lora_convert.cli import main

try:
    main()
except SystemExit:
    pass
sys.stderr.write("\nRESULT " + json.dumps({"torch": "torch" in sys.modules}) + "\n")
"""


@pytest.mark.parametrize("driver", [False, True], ids=["no-gpu-driver", "gpu-driver"])
def test_plain_validate_of_a_large_adapter_decides_the_default_smoke_without_torch(driver):
    """Plain `validate` (default smoke) of an adapter above the CPU smoke limit on a machine with no GPU driver:
    smoke is off by default there, decided from the driver's device files, without importing torch (issue 16:
    `python -X importtime -m lora_convert validate ...` shows no torch). With a driver, torch is asked."""
    pytest.importorskip("torch")
    args = ["validate", str(case_dir(CASE) / "adapter"), "--base", str(case_base_dir(CASE)), "--format", "json"]
    proc = subprocess.run(
        [sys.executable, "-c", DEFAULT_SMOKE_RUNNER, json.dumps(args), json.dumps(driver)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    result = json.loads(next(ln for ln in proc.stderr.splitlines() if ln.startswith("RESULT ")).removeprefix("RESULT "))
    assert result["torch"] is driver, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    skipped = [f for f in report["findings"] if f["code"] == "smoke.skipped"]
    assert skipped and "off by default" in skipped[0]["message"], report["findings"]


INSPECT_RUNNER = r"""
import json, sys
sys.argv = ["lora-convert", "inspect", sys.argv[1]]
from lora_convert.cli import main
try:
    main()
except SystemExit:
    pass
sys.stderr.write("\nLOADED " + json.dumps(sorted(sys.modules)) + "\n")
"""


def test_inspect_imports_only_the_reading_stages():
    """`inspect` reads headers: it loads neither numpy nor the check, convert and smoke stages (the commands import
    their stages when they run: lora_convert/pipeline/commands.py), which were a quarter of its time on a 94,000-tensor
    adapter (docs/benchmarks.md)."""
    adapter = str(case_dir(CASE) / "adapter")
    proc = subprocess.run([sys.executable, "-c", INSPECT_RUNNER, adapter], capture_output=True, text=True, timeout=300)
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith("LOADED "))
    loaded = json.loads(line.removeprefix("LOADED "))
    assert "lora_convert.peft.adapter" in loaded  # the runner really ran inspect
    stages = ("lora_convert.check.", "lora_convert.convert.", "lora_convert.smoke.", "numpy")
    assert not [m for m in loaded if m.startswith(stages) or m == "numpy"], proc.stderr[-2000:]
