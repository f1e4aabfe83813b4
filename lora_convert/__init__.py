"""lora-convert: validate PEFT LoRA adapters and normalize them into the fused, stacked serving layout.

Importing the package is cheap on purpose: torch and triton are imported only by the modules that compute, and
the public API below (docs/api.md) is loaded on first use through the module-level `__getattr__`.
"""

__version__ = "0.2.0"

# The public API, resolved lazily. These names cannot be `inspect`/`validate`/`normalize`: those are submodules,
# and importing a submodule rebinds the package attribute of the same name to the module.
_API = {
    "inspect_adapter": "lora_convert.api",
    "validate_adapter": "lora_convert.api",
    "normalize_adapter": "lora_convert.api",
    "scan_adapters": "lora_convert.api",
    "InspectResult": "lora_convert.api",
    "ValidationReport": "lora_convert.check.validate",
    "NormalizeResult": "lora_convert.convert.normalize",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        # AttributeError (not ImportError) lets `from lora_convert import <submodule>` fall back to importing it.
        raise AttributeError(f"module 'lora_convert' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_API))
