"""Run an engine's proof harness for one release: `python tests/engine_proof/run_release.py vllm==0.34.0 --truth
OUT.json --workdir DIR [CASE ...]`.

The installed release runs from site-packages; any other from its cached sources (releases.py), put first on
sys.path before anything imports the engine, so that `import vllm` and importlib.metadata (hence lora-convert's
`vllm==installed`, used for the prediction and the `--layout` output) both name the release under proof. The
process checks that they do before it runs anything. Then the release's adaptations (adaptations.py) are applied
and the engine's harness (vllm_0_33_0.py, sglang_0_5_23.py) runs on the cases.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
HARNESSES = {"vllm": "vllm_0_33_0", "sglang": "sglang_0_5_23"}


def _put_release_first(release: str) -> None:
    from engine_proof import releases

    if releases.is_installed(release):
        return
    folder = releases.cached(release)
    if folder is None:
        raise SystemExit(f"{release} is neither installed nor cached; run `make proof-cache`")
    sys.path.insert(0, str(folder))


def _check_release(engine: str, version: str) -> None:
    """The engine that imports, and the one importlib.metadata reports, are the release under proof."""
    import importlib
    import importlib.util
    from importlib import metadata

    module = importlib.import_module(engine) if engine == "vllm" else None  # SGLang needs the harness's stubs first
    seen = {"importlib.metadata": metadata.version(engine).split("+", 1)[0]}
    spec = importlib.util.find_spec(engine)
    seen["package"] = str(Path(spec.origin).parent)
    if module is not None:
        seen["__version__"] = module.__version__.split("+", 1)[0]
    if seen["importlib.metadata"] != version or seen.get("__version__", version) != version:
        raise SystemExit(f"{engine}=={version} wanted, but this process runs {seen}")
    print(f"{engine}=={version} from {seen['package']}", file=sys.stderr)


def main(argv: list[str]) -> int:
    release, rest = argv[0], argv[1:]
    if "--workdir" in rest:
        Path(rest[rest.index("--workdir") + 1]).mkdir(parents=True, exist_ok=True)
    engine, _, version = release.partition("==")
    sys.path[:0] = [str(HERE.parent)]  # tests/: `helpers` and `engine_proof` (never the repository root)
    _put_release_first(release)
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    _check_release(engine, version)

    import importlib
    import importlib.util

    from engine_proof.adaptations import apply_all

    harness = importlib.import_module(f"engine_proof.{HARNESSES[engine]}")
    if engine == "sglang":
        harness._setup_process()
    apply_all(engine, version)
    if engine == "sglang":  # its own flag for the cases
        cases = [a for a in rest if not a.startswith("--") and not _is_value(rest, a)]
        options = [a for a in rest if a not in cases]
        rest = options + [x for case in cases for x in ("--case", case)]
    return harness.main(rest)


def _is_value(argv: list[str], arg: str) -> bool:
    i = argv.index(arg)
    return i > 0 and argv[i - 1] in ("--truth", "--workdir")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
