"""The locked environment (requirements/constraints.txt): `make setup` installs exactly what it pins.

pip's `-c` fixes the version of every package it names, but a package the lock does not name (a dependency added
to pyproject.toml without `make lock`) would install at whatever version resolves that day; and a stale `.venv`
keeps packages the lock has dropped. Either way the suite would no longer run on what CI ran on.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sysconfig
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "constraints.txt"
ENGINE_REQUIREMENTS = ROOT / "tests" / "engine_proof" / "requirements.txt"
NOT_LOCKED = {"lora-convert", "pip"}  # the project itself; the venv's own installer
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = PIN.match(line)
        assert match, f"{path.name}:{number}: not a `name==version` pin: {raw!r}"
        pins[canonicalize_name(match[1])] = match[2]
    return pins


def _installed() -> dict[str, str]:
    """What this environment's site-packages holds (not whatever else a test may have put on sys.path)."""
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    return {
        canonicalize_name(d.metadata["Name"]): d.version
        for d in md.distributions(path=site)
        if canonicalize_name(d.metadata["Name"]) not in NOT_LOCKED
    }


def test_the_lock_pins_the_test_stack():
    pins = _pins(LOCK)
    for name in ("torch", "triton", "transformers", "peft", "ray", "pytest", "hypothesis", "ruff", "pre-commit"):
        assert name in pins, f"{name} is not locked"
    assert Version(pins["torch"]).local == "cpu", "the lock must name the CPU build of torch (no CUDA packages)"
    assert not [n for n in pins if n.startswith("nvidia-")], "a CUDA package is locked"


def test_the_environment_is_exactly_the_lock():
    pins, installed = _pins(LOCK), _installed()
    unpinned = sorted(set(installed) - set(pins))
    differ = sorted(
        f"{n} {installed[n]} (lock: {pins[n]})"
        for n in installed
        if n in pins and Version(installed[n]) != Version(pins[n])
    )
    missing = sorted(set(pins) - set(installed))
    assert not (unpinned or differ or missing), (
        "this environment is not requirements/constraints.txt: "
        f"not in the lock {unpinned}, other versions {differ}, not installed {missing}. "
        "A stale .venv: `make clean setup`; a new dependency: `make lock`."
    )


def test_the_engine_requirements_agree_with_the_lock():
    pins, engines = _pins(LOCK), _pins(ENGINE_REQUIREMENTS)
    disagree = sorted(f"{n}: {v} vs lock {pins.get(n)}" for n, v in engines.items() if pins.get(n) != v)
    assert not disagree, f"tests/engine_proof/requirements.txt and the lock disagree: {disagree}"
