"""The domain exception hierarchy.

Library code raises these; only the CLI turns them into `Error: ...` messages and exit codes. Each error
carries one paragraph saying what went wrong (with the key, expected vs actual where it applies) and a hint
saying what to do next.
"""

from __future__ import annotations

# Exit codes shared by every command. 1 is reserved for "the adapter has errors" (findings or refusals); a bug in
# lora-convert itself is 4, so that CI never mistakes one for a verdict on the adapter.
EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_USAGE = 2
EXIT_ENVIRONMENT = 3
EXIT_INTERNAL = 4
# stdout (or stderr) closed by its reader, as `| head` does after its lines: what a shell reports for a program
# killed by SIGPIPE (128 + 13), nonzero so that `set -o pipefail` never reads a cut-off report as a pass.
EXIT_OUTPUT_CLOSED = 141

BUG_REPORT_HINT = (
    "This is a bug in lora-convert, not a problem of the adapter. Re-run with LORA_CONVERT_DEBUG=1 "
    "for the traceback and report it with the command you ran."
)


class LoraConvertError(Exception):
    """Base class: a problem the user can act on. `exit_code` says which kind."""

    exit_code = EXIT_FINDINGS

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(LoraConvertError):
    """Bad flags, a path that does not exist, an output directory in the way."""

    exit_code = EXIT_USAGE


class AdapterNotFoundError(UsageError):
    """The adapter source (folder or Hub id) could not be found."""


class EnvironmentProblem(LoraConvertError):
    """The machine lacks something the command needs (CUDA, triton, network for the Hub)."""

    exit_code = EXIT_ENVIRONMENT


class AdapterFormatError(LoraConvertError):
    """The adapter's files are malformed: a broken safetensors header, a bad config, an unsafe pickle."""


class AdapterConfigError(AdapterFormatError):
    """`adapter_config.json` is missing, not JSON, or has fields of the wrong type."""


class UnsupportedAdapterError(LoraConvertError):
    """The adapter uses something this command refuses to convert (DoRA, lora_bias, ...)."""


class NonFiniteValuesError(UnsupportedAdapterError):
    """A tensor normalize would write holds NaN or Inf (refused unless non-finite values are allowed)."""


class SchemaError(LoraConvertError):
    """A schema file or a base config does not fit the schema vocabulary."""


class BaseConfigError(LoraConvertError):
    """The base model config could not be resolved or does not match any schema."""


class InternalError(LoraConvertError):
    """A bug in lora-convert (an inconsistency between its own parts, e.g. an unregistered finding code)."""

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str, *, hint: str | None = BUG_REPORT_HINT):
        super().__init__(f"Internal error: {message}", hint=hint)
