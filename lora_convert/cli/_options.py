"""Options shared by several commands, declared once."""

from __future__ import annotations

from enum import Enum

import typer

from lora_convert.cli._output import OutputFormat

ADAPTER_HELP = (
    "The adapter: a local folder holding adapter_config.json and adapter_model.safetensors (or shards, or "
    "adapter_model.bin), or a Hugging Face Hub repo id such as `org/name` or `org/name@revision`. A folder whose "
    "adapter_config.json has mlx-lm's fields (lora_parameters and num_layers) is read as an mlx-lm adapter "
    "(adapters.safetensors; it needs --base: docs/formats.md). A .gguf file, or a folder holding one GGUF LoRA "
    "file, is read as a GGUF LoRA adapter (it needs --base, an HF config: docs/formats.md)."
)

AdapterArg = typer.Argument(..., help=ADAPTER_HELP, metavar="ADAPTER", show_default=False)
FormatOpt = typer.Option(
    OutputFormat.human, "--format", "-f", help="`human` tables, or one `json` document on stdout.", case_sensitive=False
)
CacheDirOpt: str | None = typer.Option(
    None, "--cache-dir", help="Hugging Face cache folder for Hub ids (default: HF_HOME's hub cache)."
)
TokenOpt: str | None = typer.Option(
    None, "--token", envvar="HF_TOKEN", help="Hub token for private repos (default: HF_TOKEN).", show_envvar=True
)
BaseOpt: str | None = typer.Option(
    None,
    "--base",
    "-b",
    help="The base model: a folder or config.json, a Hub id (only config.json is fetched), or a preset name "
    "(`lora-convert schemas list`). Default: the adapter's base_model_name_or_path.",
)


class Device(str, Enum):
    """Where kernels run: `auto` picks CUDA when present, else the Triton interpreter on the CPU."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
