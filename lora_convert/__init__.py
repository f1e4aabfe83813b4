"""lora-convert: validate PEFT LoRA adapters and normalize them into the fused, stacked serving layout.

Importing the package is cheap on purpose: torch and triton are imported only by the modules that compute.
"""

__version__ = "0.1.0"
