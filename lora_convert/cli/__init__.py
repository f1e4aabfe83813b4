"""The `lora-convert` command line. Each command lives in its own module and only parses, calls one library
function and renders the result; errors are turned into messages and exit codes here, nowhere else."""

from __future__ import annotations

from lora_convert.cli._app import app, main

# Importing the command modules registers their commands on `app`.
from lora_convert.cli import inspect_cmd  # noqa: E402,F401
from lora_convert.cli import schemas_cmd  # noqa
from lora_convert.cli import normalize_cmd  # noqa: E402,F401
from lora_convert.cli import smoke_cmd  # noqa: E402,F401
from lora_convert.cli import validate_cmd  # noqa

__all__ = ["app", "main"]
