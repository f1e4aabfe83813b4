"""Builds llama-cpp-python from its sdist once per machine, caches the wheel and llama.cpp's own converters.

The GGUF proof (tests/test_gguf_proof.py) runs llama.cpp itself, through llama-cpp-python, on a base converted by
llama.cpp's own `convert_hf_to_gguf.py`. PyPI has no CPU wheel of llama-cpp-python for Linux, so the sdist is built
here (cmake + a C/C++ compiler; tests, examples, tools, server and the multimodal library off) and the wheel is kept:

    <cache>/llama-cpp/<version>/llama_cpp_python-<version>-*.whl   the built wheel
    <cache>/llama-cpp/<version>/site/                                 the wheel installed (pip --target) with the
                                                                      one dependency the venv lacks (diskcache)
    <cache>/llama-cpp/<version>/llama.cpp/convert_hf_to_gguf.py       llama.cpp's own converters and the gguf-py
    <cache>/llama-cpp/<version>/llama.cpp/convert_lora_to_gguf.py     package they import (newer than PyPI's
    <cache>/llama-cpp/<version>/llama.cpp/conversion/...              (the converters' model classes)
    <cache>/llama-cpp/<version>/llama.cpp/gguf-py/gguf/...            `gguf`), from the sdist's vendor/llama.cpp
    <cache>/llama-cpp/<version>/llama.cpp/src/llama-adapter.cpp       the adapter loader, read by people (cited)

`<cache>` is $LORA_CONVERT_PROOF_CACHE, else ~/.cache/lora-convert-proof (tests/engine_proof/releases.py). A folder
without its `.complete` marker is rebuilt. The venv stays exactly the lock (tests/test_lock.py): the proof runs
llama.cpp in a subprocess with `site/` first on PYTHONPATH (tests/gguf_proof/run_llama.py), on the venv's numpy and
jinja2.

Script mode: `make llama-cpp` builds in the foreground when not cached, else prints where it is. `make test` runs
`--background` instead: the build starts in a detached process at low priority (`nice`) and the suite runs beside
it. The suite is one pytest process, so the build takes the core it leaves idle; the GGUF tests run last
(tests/conftest.py moves them) and wait for the build (`wait_for_build`). One builder at a time: a builder holds
`<cache>/llama-cpp/<version>.lock` (flock) while it builds; its output goes to `<version>.build.log` beside it, and a
failure leaves `<version>.failed` with the reason.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

VERSION = "0.3.36"
PACKAGE = "llama-cpp-python"
# Off: everything of llama.cpp the Python binding does not load (the libllama/libggml shared libraries are all
# it needs). GGML_NATIVE off: the wheel runs on any x86-64/arm64 CPU the cache folder is copied to.
CMAKE_ARGS = (
    "-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF "
    "-DLLAVA_BUILD=OFF -DLLAMA_BUILD_MTMD=OFF -DLLAMA_CURL=OFF -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF"
)
# What of the sdist's vendor/llama.cpp the proof reads: the two converters (their model classes live in
# `conversion/`), gguf-py, and the adapter loader source.
VENDORED = (
    "convert_hf_to_gguf.py",
    "convert_lora_to_gguf.py",
    "conversion/",
    "gguf-py/",
    "src/llama-adapter.cpp",
    "LICENSE",
)
# llama-cpp-python's one dependency the venv does not have (llama_cpp/llama_cache.py imports it); pinned here
DISKCACHE = "diskcache==5.6.3"
_COMPLETE = ".complete"


def cache_root() -> Path:
    return Path(os.environ.get("LORA_CONVERT_PROOF_CACHE") or Path.home() / ".cache" / "lora-convert-proof")


def build_dir(version: str = VERSION) -> Path:
    return cache_root() / "llama-cpp" / version


def cached(version: str = VERSION) -> Path | None:
    """The version's cache folder when its build finished, else None."""
    folder = build_dir(version)
    return folder if (folder / _COMPLETE).exists() else None


def llama_cpp_tree(version: str = VERSION) -> Path | None:
    """The vendored llama.cpp files (converters, gguf-py) of a finished build, or None."""
    folder = cached(version)
    return None if folder is None else folder / "llama.cpp"


def site_dir(version: str = VERSION) -> Path | None:
    """The folder to put first on PYTHONPATH to import llama_cpp, or None when not built."""
    folder = cached(version)
    return None if folder is None else folder / "site"


def _run(cmd: list[str], **kwargs) -> None:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True, **kwargs)


def _extract_vendored(sdist: Path, dest: Path) -> None:
    prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            if not member.name.startswith(prefix) or not member.isfile():
                continue
            rel = member.name[len(prefix) :]
            if any(rel == v or (v.endswith("/") and rel.startswith(v)) for v in VENDORED):
                member.name = rel
                tar.extract(member, dest, filter="data")


def build(version: str = VERSION) -> Path:
    """Download the sdist, build its wheel and extract the vendored files into a fresh cache folder."""
    folder = build_dir(version)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    pip = [sys.executable, "-m", "pip"]
    _run([*pip, "download", "-q", "--no-deps", "--no-binary=:all:", "-d", str(partial), f"{PACKAGE}=={version}"])
    sdist = next(partial.glob("llama_cpp_python-*.tar.gz"))
    env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
    _run([*pip, "wheel", "--no-deps", "-w", str(partial), str(sdist)], env=env)
    wheel = next(partial.glob("llama_cpp_python-*.whl"))
    _run([*pip, "install", "-q", "--no-deps", "--target", str(partial / "site"), str(wheel), DISKCACHE])
    _extract_vendored(sdist, partial / "llama.cpp")
    sdist.unlink()
    (partial / _COMPLETE).write_text(f"{PACKAGE}=={version}\n")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return folder


def _side_file(suffix: str, version: str = VERSION) -> Path:
    return cache_root() / "llama-cpp" / f"{version}{suffix}"


def _locked(version: str = VERSION, *, wait: bool):
    """The builder's lock, held open (release: close it); None when another process holds it and `wait` is off."""
    path = _side_file(".lock", version)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = path.open("w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        handle.close()
        return None
    return handle


def _builder_running(version: str = VERSION) -> bool:
    """Whether another process holds the builder's lock right now."""
    probe = _locked(version, wait=False)
    if probe is None:
        return True
    probe.close()
    return False


def build_once(version: str = VERSION) -> Path:
    """Build unless cached, as the one builder (waits for another builder to finish first). Records a failure in
    `<version>.failed` and re-raises it."""
    lock = _locked(version, wait=True)
    try:
        folder = cached(version)
        if folder is not None:
            return folder
        failed = _side_file(".failed", version)
        failed.unlink(missing_ok=True)
        try:
            return build(version)
        except (subprocess.CalledProcessError, OSError, StopIteration) as exc:
            failed.write_text(f"{PACKAGE}=={version} could not be built: {exc}\n")
            raise
    finally:
        lock.close()


def start_background_build(version: str = VERSION) -> str:
    """Start the build in a detached low-priority process unless cached or already building; says which."""
    if cached(version) is not None:
        return f"{PACKAGE}=={version}: cached at {build_dir(version)}"
    if _builder_running(version):
        return f"{PACKAGE}=={version}: a build is already running (log: {_side_file('.build.log', version)})"
    _side_file(".failed", version).unlink(missing_ok=True)  # a new try: the waiters must not read the last failure
    log = _side_file(".build.log", version).open("w")
    subprocess.Popen(
        ["nice", "-n", "10", sys.executable, __file__, "--build"],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    return f"{PACKAGE}=={version}: building in the background (log: {_side_file('.build.log', version)})"


def wait_for_build(timeout_s: float, version: str = VERSION) -> Path:
    """The finished build's folder: waits for a running builder (at most `timeout_s`), builds in this process when
    none runs. Raises RuntimeError with the reason when the build failed or the wait ran out."""
    deadline = time.monotonic() + timeout_s
    while True:
        folder = cached(version)
        if folder is not None:
            return folder
        if not _builder_running(version):  # either it failed, or it never started
            failed = _side_file(".failed", version)
            if failed.exists():
                log = _side_file(".build.log", version)
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"{failed.read_text().strip()} (log {log}):\n{tail}")
            try:
                return build_once(version)
            except (subprocess.CalledProcessError, OSError, StopIteration) as exc:
                raise RuntimeError(f"{PACKAGE}=={version} could not be built: {exc}") from exc
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{PACKAGE}=={version}: the background build did not finish within {timeout_s:.0f} s "
                f"(log: {_side_file('.build.log', version)})"
            )
        time.sleep(5)


def main(argv: list[str]) -> int:
    if argv == ["--background"]:
        print(start_background_build(), file=sys.stderr)
        return 0
    try:
        build_once()
    except (subprocess.CalledProcessError, OSError, StopIteration) as exc:
        # Without cmake or a C++ compiler the GGUF proof skips (tests/test_gguf_proof.py); CI, which sets
        # LORA_CONVERT_REQUIRE_PROOF=1, fails there instead. The background builder (--build) always fails loudly.
        if os.environ.get("LORA_CONVERT_REQUIRE_PROOF") or argv == ["--build"]:
            raise
        print(f"warning: {PACKAGE}=={VERSION} could not be built ({exc}); the GGUF proof will skip", file=sys.stderr)
        return 0
    print(f"{PACKAGE}=={VERSION}: {build_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
