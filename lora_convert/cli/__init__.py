"""The `lora-convert` command line. Each command lives in its own module and only parses, calls one library
function and renders the result; errors are turned into messages and exit codes here, nowhere else."""

from __future__ import annotations

# Importing the command modules registers their commands on `app`.
from lora_convert.cli import (
    engines_cmd,  # noqa: F401
    inspect_cmd,  # noqa: E402,F401
    normalize_cmd,  # noqa: E402,F401
    report_cmd,  # noqa: F401
    scan_cmd,  # noqa: F401
    schemas_cmd,  # noqa
    smoke_cmd,  # noqa: E402,F401
    validate_cmd,  # noqa
)
from lora_convert.cli._app import app, main

__all__ = ["app", "main"]
