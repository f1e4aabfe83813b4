"""lora-convert: validate PEFT LoRA adapters and normalize them into the fused, stacked serving layout.

Importing the package is cheap on purpose: torch and triton are imported only by the modules that compute, and
the public API below (docs/api.md) is loaded on first use through the module-level `__getattr__`.
"""

__version__ = "0.2.0"


def _bind_checkout_folders() -> None:
    """Make `lora_convert.kernels` / `lora_convert.schemas` the checkout's top-level kernels/ and schemas/.

    A wheel ships those folders inside this package (setup.py maps them), and then there is nothing to do. In a
    checkout (editable install, no install at all, or Python started in the repository root next to an installed
    wheel, where `./lora_convert` wins) they sit beside the package: each is bound here, by its location, as a
    namespace subpackage. Neither folder has an `__init__.py`, so neither is ever a top-level package that could
    shadow another distribution's (PyPI has a `kernels`, which transformers imports); nothing touches sys.path.
    """
    import importlib.machinery
    import importlib.util
    import os
    import sys

    package_dir = os.path.dirname(os.path.abspath(__file__))
    checkout_root = os.path.dirname(package_dir)
    for folder in ("kernels", "schemas"):
        name = f"{__name__}.{folder}"
        if name in sys.modules or os.path.isdir(os.path.join(package_dir, folder)):
            continue
        # PathFinder on the root alone finds only the folder (never another `kernels` on sys.path), and gives the
        # namespace spec the import system itself would build, so importlib.resources reads it as usual.
        spec = importlib.machinery.PathFinder.find_spec(name, [checkout_root])
        if spec is None:
            continue  # neither shipped nor beside: importing it fails with "No module named lora_convert.<folder>"
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        if spec.loader is not None:  # set by module_from_spec for a namespace package (its exec does nothing)
            spec.loader.exec_module(module)
        globals()[folder] = module


_bind_checkout_folders()

# The public API, resolved lazily. These names cannot be `inspect`/`validate`/`normalize`: those are submodules,
# and importing a submodule rebinds the package attribute of the same name to the module.
_API = {
    "inspect_adapter": "lora_convert.api",
    "validate_adapter": "lora_convert.api",
    "normalize_adapter": "lora_convert.api",
    "scan_adapters": "lora_convert.api",
    "fleet_page": "lora_convert.api",
    "FleetPage": "lora_convert.api",
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
