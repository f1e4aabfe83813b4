"""The engine releases the proof runs, and a cache of each release's Python sources.

Every release with a rule file in lora_convert/engines/ (`lora_convert.engines.rules.releases()`) is proven by its
own loader code. The release installed in the venv (tests/engine_proof/requirements.txt, `make setup`) runs from
site-packages as it always did. Every other release runs from a cached copy of its wheel's Python package:

    <cache>/<engine>-<version>/<engine>/...              the package's `.py` files, the data files they read, and
                                                         its folder tree
    <cache>/<engine>-<version>/<engine>-<version>.dist-info/METADATA    so that importlib.metadata (and so
                                                         `--engine <engine>==installed`) names this release
    <cache>/wheels/                                      where the wheel is downloaded to, removed once extracted

`<cache>` is $LORA_CONVERT_PROOF_CACHE, else ~/.cache/lora-convert-proof. The harness runs such a release in its own
process with that folder first on sys.path (run_release.py), on the venv's other packages (torch, transformers,
...): the same environment the installed release runs on.

Only the Python package is extracted, never the native parts of the wheel: the CUDA kernels (`vllm/_C.abi3.so`,
`*_C.so`, flash-attention) are not importable on a CPU even for the installed release (vLLM prints "Failed to import
from vllm._C" and goes on), and C++/CUDA headers are not read by Python. That keeps one release at 50-80 MB instead
of 120-800 MB unpacked.

Script mode: `python tests/engine_proof/releases.py [ENGINE==VERSION ...]` fetches and extracts every release that
is not installed (default: all with a rule file) and prints where each one runs from; `make setup` calls it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

CACHE_ENV = "LORA_CONVERT_PROOF_CACHE"
# What of a wheel's package is extracted: Python sources and the text data files the package reads at import or
# while building a model (vLLM's fused-MoE tuning JSON, chat templates, SGLang's model configs). Not: `.so`
# extensions, C/C++/CUDA sources and headers, binaries.
DATA_SUFFIXES = frozenset({".py", ".json", ".jinja", ".jinja2", ".yaml", ".yml", ".txt", ".typed", ".toml", ".ini"})
_COMPLETE = ".complete"  # written last: a folder without it is a half-finished extraction and is redone
# What `wanted` extracts, by number: a folder extracted under another rule is extracted again. Raise it whenever
# `wanted` or DATA_SUFFIXES changes.
EXTRACT_RULE = "1"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lora-convert-proof")


def proof_releases(engine: str | None = None) -> list[str]:
    """`vllm==0.33.0`, ... for every rule file (of `engine`), oldest first."""
    from lora_convert.engines.rules import releases

    return [r.spec for r in releases() if engine is None or r.engine == engine]


def split(release: str) -> tuple[str, str]:
    engine, _, version = release.partition("==")
    return engine, version


def installed_version(engine: str) -> str | None:
    """The version of `engine` installed in this Python (its local label left out), or None."""
    try:
        return metadata.version(engine).split("+", 1)[0]
    except metadata.PackageNotFoundError:
        return None


def is_installed(release: str) -> bool:
    engine, version = split(release)
    return installed_version(engine) == version


def release_dir(release: str) -> Path:
    engine, version = split(release)
    return cache_root() / f"{engine}-{version}"


def cached(release: str) -> Path | None:
    """The release's extracted folder if it is complete, else None."""
    marker = release_dir(release) / _COMPLETE
    if marker.exists() and marker.read_text().split()[0] == f"rule-{EXTRACT_RULE}":
        return marker.parent
    return None


def ensure_cached(release: str) -> Path:
    """The release's extracted folder, downloading and extracting the wheel first if needed."""
    folder = cached(release)
    if folder is not None:
        return folder
    wheel = fetch_wheel(release, cache_root() / "wheels")
    folder = extract(release, wheel, release_dir(release))
    wheel.unlink()  # 240-340 MB for a vLLM release; the extracted folder is what the proof runs on
    return folder


def fetch_wheel(release: str, dest: Path) -> Path:
    """`pip download --no-deps` of the release's wheel into `dest` (pip's cache keeps a re-download cheap, and a
    wheel already in `dest` is not fetched again)."""
    engine, version = split(release)
    dest.mkdir(parents=True, exist_ok=True)
    found = _wheel_in(dest, engine, version)
    if found is None:
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(dest)]
        proc = subprocess.run([*cmd, release], capture_output=True, text=True)
        found = _wheel_in(dest, engine, version)
        if proc.returncode != 0 or found is None:
            raise RuntimeError(f"pip download {release} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return found


def _wheel_in(folder: Path, engine: str, version: str) -> Path | None:
    wheels = sorted(folder.glob(f"{engine}-{version}-*.whl"))
    return wheels[0] if wheels else None


def wanted(member: str, engine: str, version: str) -> bool:
    """Whether a wheel member is extracted: the package's Python and data files, and the METADATA of its dist-info."""
    if member == f"{engine}-{version}.dist-info/METADATA":
        return True
    return member.startswith(f"{engine}/") and Path(member).suffix in DATA_SUFFIXES


def extract(release: str, wheel: Path, folder: Path) -> Path:
    """Extract the wanted members of `wheel` into `folder` (through a sibling temporary folder, renamed when done)."""
    engine, version = split(release)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        zf.extractall(partial, [m for m in names if wanted(m, engine, version)])
    # the package's folders are kept even where no file of them is: code checks that they exist (SGLang's JIT kernel
    # path, sglang/kernels/jit/utils/compile/paths.py, wants its `include` and `csrc` folders at import)
    for member in names:
        if member.startswith(f"{engine}/"):
            (partial / member).parent.mkdir(parents=True, exist_ok=True)
    (partial / _COMPLETE).write_text(f"rule-{EXTRACT_RULE} {wheel.name}\n")
    shutil.rmtree(folder, ignore_errors=True)  # an unfinished earlier extraction (no marker) of this release only
    partial.rename(folder)
    return folder


def main(argv: list[str]) -> int:
    for release in argv or proof_releases():
        where = "installed" if is_installed(release) else ensure_cached(release)
        print(f"{release}: {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
