"""The proof's runs inside a pytest session: tests/test_proof_vllm.py and test_proof_sglang.py are parametrized over
(release, fixture) for every release with a rule file; the first test that needs a run starts the runs of every
release the session selected (both engines, side by side: runs.ProofRuns), each on the fixtures selected for it
(all of them when the release's recorded-truth test is selected).

A release that cannot run here (engine not installed, sources not cached) is skipped, with the reason; under
LORA_CONVERT_REQUIRE_PROOF=1 (CI) it fails instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine_proof import runs

_STATE: dict = {}


def require_proof() -> bool:
    return bool(os.environ.get("LORA_CONVERT_REQUIRE_PROOF"))


def _selected(session) -> dict[str, set[str] | None]:
    """release -> the fixture cases the session's selected tests need (None: all)."""
    wanted: dict[str, set[str] | None] = {}
    runnable: dict[str, bool] = {}
    for item in session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        release = params.get("release")
        if not isinstance(release, str) or "==" not in release:  # not an `<engine>==<version>` another test names so
            continue
        if release not in runnable:
            runnable[release] = runs.unavailable(release) is None
        if not runnable[release]:
            continue
        case = params.get("case")
        if case is None:
            wanted[release] = None
        elif wanted.get(release, set()) is not None:
            wanted.setdefault(release, set()).add(case)
    return wanted


def _start(request) -> runs.ProofRuns:
    root = request.getfixturevalue("tmp_path_factory").mktemp("engine-proof")
    selected = _selected(request.session)
    return runs.ProofRuns({r: tuple(sorted(c)) if c else () for r, c in selected.items()}, root)


def release_run(request, release: str) -> tuple[dict, Path]:
    """The live run of `release` in this session (its recorded form, and the folder it ran in)."""
    why = runs.unavailable(release)
    if why:
        if require_proof():
            pytest.fail(f"{why}; CI (LORA_CONVERT_REQUIRE_PROOF=1) requires the proof of {release}")
        pytest.skip(why)
    if "runs" not in _STATE:
        _STATE["runs"] = _start(request)
    proof = _STATE["runs"]
    return proof.result(release), proof.workdir(release)


def case_row(request, release: str, case: str) -> tuple[dict, Path | None]:
    """One fixture's row of the live run of `release`, and the base the release was given for it."""
    record, workdir = release_run(request, release)
    row = record["cases"][case]
    assert "harness_error" not in row, f"the {release} harness failed on {case}: {row['harness_error']}"
    if "cannot_run" in row["original"]:  # declared: the harness got no base built (common.check_cannot_run)
        return row, None
    return row, runs.live_path(row["served_base"], workdir)
