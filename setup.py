"""Package discovery, the one part of the build pyproject.toml cannot say.

Every package under lora_convert/ is found by walking the folder, so a new subpackage ships without anyone
listing it. kernels/ and schemas/ live at the top of the repository but ship as lora_convert.kernels and
lora_convert.schemas; setuptools' declarative `packages.find` cannot map a folder outside lora_convert/ into it,
so their packages are found here and mapped with package_dir. Neither folder has an `__init__.py` (a regular
top-level `kernels` package in a checkout would shadow PyPI's `kernels`); setuptools copies the modules and JSON of
a listed package all the same, which tests/test_wheel_install.py checks on the built wheel. In a checkout,
lora_convert/__init__.py binds the same two folders (tests/test_import_path.py).
"""

from setuptools import find_packages, setup

MAPPED_FOLDERS = {"lora_convert.kernels": "kernels", "lora_convert.schemas": "schemas"}


def discover_packages() -> list[str]:
    packages = find_packages(include=["lora_convert", "lora_convert.*"])
    for package, folder in MAPPED_FOLDERS.items():
        packages.append(package)
        packages += [f"{package}.{sub}" for sub in find_packages(where=folder)]
    return packages


setup(packages=discover_packages(), package_dir=MAPPED_FOLDERS)
