"""One adapter is read and planned once per command: the prepared adapter (lora_convert/pipeline/prepared.py) flows
through validate's checks, the engine prediction, the smoke forward, scan and normalize.

Counted by construction: every `Adapter` (what reading an adapter's headers and config makes) and every `Plan`
(what planning makes) built anywhere in the process, through the real CLI."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from helpers import case_base_dir, case_dir
from lora_convert.cli import app
from lora_convert.convert.plan import Plan
from lora_convert.peft.adapter import Adapter

CASE = "v5_llama"


@pytest.fixture
def built(monkeypatch):
    """{"Adapter": n, "Plan": n}: how many of each were constructed while the test ran."""
    counts = {"Adapter": 0, "Plan": 0}
    for cls in (Adapter, Plan):
        original = cls.__init__

        def counting(self, *args, _original=original, _name=cls.__name__, **kwargs):
            counts[_name] += 1
            _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", counting)
    return counts


def _invoke(*args: str) -> dict:
    result = CliRunner().invoke(app, [*args, "--format", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_validate_with_engine_and_smoke_reads_and_plans_once(built, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    adapter, base = str(case_dir(CASE) / "adapter"), str(case_base_dir(CASE))
    doc = _invoke("validate", adapter, "--base", base, "--engine", "sglang", "--smoke", "--device", "cpu")
    codes = {f["code"] for f in doc["findings"]}
    # both consumers of the plan really ran: the engine's module-group rules and the smoke forward
    assert "smoke.passed" in codes, codes
    assert {"engine", "smoke"} <= set(doc["summary"]["checks"]["run"]), doc["summary"]["checks"]
    assert built == {"Adapter": 1, "Plan": 1}


def test_a_scan_task_over_two_engine_releases_and_normalize_reads_once(built, tmp_path):
    # what one scan worker does with one adapter (a scan runs tasks in worker processes, where nothing is counted)
    from lora_convert.engines.rules import resolve_engine
    from lora_convert.scan.task import ScanOptions, ScanTask, run_task

    task = ScanTask("one", str(case_dir(CASE) / "adapter"), 0, output=str(tmp_path / "out"))
    options = ScanOptions(
        base=str(case_base_dir(CASE)),
        engine="sglang",
        more_engines=("vllm",),
        layout="vllm",
        normalize_root=str(tmp_path),
    )
    record = run_task(task, options)
    assert record["status"] == "ok" and record["normalize"]["output"] == task.output, record
    assert set(record["engines"]) == {resolve_engine("sglang").spec, resolve_engine("vllm").spec}, record["engines"]
    # one read; one plan for the engines' module-group rules (drop_unsupported) and one for the conversion
    assert built == {"Adapter": 1, "Plan": 2}


def test_normalize_reads_and_plans_once(built, tmp_path):
    adapter, base = str(case_dir(CASE) / "adapter"), str(case_base_dir(CASE))
    _invoke("normalize", adapter, "-o", str(tmp_path / "out"), "--base", base, "--layout", "vllm")
    assert built == {"Adapter": 1, "Plan": 1}
