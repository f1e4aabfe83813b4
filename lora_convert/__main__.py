"""`python -m lora_convert`: the same command line as `lora-convert`."""

from lora_convert.cli import main

main()
