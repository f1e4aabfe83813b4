"""Whether the smoke forward can run here, decided without importing torch or triton.

torch and triton are the `[smoke]` extra, not dependencies of the core: inspect, validate and normalize run without
them. Only the smoke forward needs them, and whether it can run is decided here with importlib.util.find_spec, which
only looks for the package (importing torch alone costs a second or more).
"""

from __future__ import annotations

import importlib.util

from lora_convert.errors import EnvironmentProblem

SMOKE_PACKAGES = ("torch", "triton")
SMOKE_INSTALL = "pip install 'lora-convert[smoke]'"


def missing_smoke_packages() -> list[str]:
    """The packages the smoke forward needs that are not installed here (empty when it can run)."""
    return [name for name in SMOKE_PACKAGES if importlib.util.find_spec(name) is None]


def not_installed_reason(missing: list[str]) -> str:
    """The verdict's "Not run" entry: the first missing package (torch, on a light install) and the command that
    installs both."""
    return f"{missing[0]} not installed: {SMOKE_INSTALL}"


def require_smoke_packages() -> None:
    """Raise EnvironmentProblem (exit 3) with the install command when torch or triton is missing."""
    missing = missing_smoke_packages()
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise EnvironmentProblem(
            f"The smoke forward needs torch and triton, and {' and '.join(missing)} {verb} not installed here.",
            hint=f"Install the smoke extra: {SMOKE_INSTALL} (Triton ships Linux wheels only).",
        )
