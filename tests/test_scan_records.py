"""The scan record's additions of issue 27 (base, rank, engines per release, finding keys), on PEFT-written adapters
run through `run_task` in this process, and the engine releases `scan --engine` names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_convert.engines.rules import resolve_engine
from lora_convert.errors import UsageError
from lora_convert.scan.task import MAX_KEYS, ScanOptions, ScanTask, run_task

NEWEST_VLLM = resolve_engine("vllm").spec  # what `--engine vllm` means: the newest release with a rule file
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "tiny-deepseek-v3"
ADAPTER, BASE = EXAMPLE / "adapter", EXAMPLE / "base"

pytestmark = pytest.mark.slow  # each validates a real adapter (some tenths of a second)


def _run(**options) -> dict:
    record = run_task(ScanTask("ds", str(ADAPTER), 0), ScanOptions(data_scan=False, **options))
    json.dumps(record)  # a record is plain JSON
    return record


def _fired(record: dict, engine: str) -> list[str]:
    return [f["code"] for f in record["findings"] if f["code"].startswith(f"engine.{engine}.")]


def test_a_record_has_its_base_rank_and_each_release_it_was_checked_for():
    record = _run(base=str(BASE), engine="vllm", more_engines=("sglang",))
    config = json.loads((ADAPTER / "adapter_config.json").read_text())
    assert record["base"] == str(BASE)
    assert record["rank"] == max([config["r"], *config.get("rank_pattern", {}).values()])
    assert set(record["engines"]) == {NEWEST_VLLM, "sglang==0.5.23"}
    # the first release is validate's: engine_outcomes (kept for old readers) is its entry
    assert record["engines"][NEWEST_VLLM] == record["engine_outcomes"]
    for engine, release in (("vllm", NEWEST_VLLM), ("sglang", "sglang==0.5.23")):
        fired = _fired(record, engine)
        assert fired and sum(record["engines"][release].values()) == len(fired)
    # the second release's errors make the adapter fail, as its own validate would
    assert record["status"] == "findings" and "sglang==0.5.23" in record["verdict"]


def test_every_finding_carries_its_keys():
    record = _run(base=str(BASE), engine="vllm")
    assert all(isinstance(f["keys"], list) and len(f["keys"]) <= MAX_KEYS for f in record["findings"])
    fired = [f for f in record["findings"] if f["code"].startswith("engine.vllm.")]
    assert fired and all(k.startswith("base_model.model.") for f in fired for k in f["keys"])


def test_an_engine_named_with_its_release_counts_its_outcomes():
    # engine_outcomes looked for `engine.vllm==0.33.0.` codes and counted none
    record = _run(base=str(BASE), engine="vllm==0.33.0")
    assert _fired(record, "vllm")
    assert record["engine_outcomes"] and record["engines"]["vllm==0.33.0"] == record["engine_outcomes"]


def test_a_release_whose_rules_could_not_be_evaluated_is_null():
    record = _run(engine="vllm")  # its config names a base that is not here: no plan, so not every rule ran
    assert any(f["code"] == "engine-rules.unchecked" for f in record["findings"])
    assert record["engines"] == {NEWEST_VLLM: None}


def test_without_an_engine_the_record_has_no_releases():
    record = _run(base=str(BASE))
    assert record["engines"] == {} and record["engine_outcomes"] == {}


def test_scan_engines_all_repeated_and_none():
    from lora_convert.api import _scan_engines
    from lora_convert.engines.rules import installed_engines

    assert _scan_engines("none") == [] and _scan_engines(["none"]) == []
    assert _scan_engines("all") == installed_engines()
    assert _scan_engines(["vllm", NEWEST_VLLM, "sglang", "all"]) == ["vllm", "sglang"]
    with pytest.raises(UsageError):
        _scan_engines(["vllm", "nope"])


def test_resuming_an_old_report_keeps_its_records_and_pages_them(tmp_path):
    """A report written before these keys existed: --resume reads it, appends new records, and the page shows both."""
    from lora_convert import scan_adapters

    report, page = tmp_path / "scan.jsonl", tmp_path / "fleet.html"
    old = {"id": "old/one", "adapter": "/gone", "status": "findings", "exit_code": 1, "family": "llama",
           "verdict": "FAIL", "findings": [{"code": "data.nan", "severity": "error", "message": "m"}],
           "checks": {"run": [], "skipped": {}}, "engine_outcomes": {}, "normalize": None, "seconds": 1.0,
           "bytes": 5, "error": None}  # fmt: skip
    report.write_text(json.dumps(old) + "\n")
    result = scan_adapters(ADAPTER, base=BASE, engine="vllm", data_scan=False, jobs=1, output=report, resume=True,
                           html=page)  # fmt: skip
    assert result.resumed == 1 and {r["id"] for r in result.records} == {"old/one", "adapter"}
    text = page.read_text()
    assert '"old/one"' in text and '"adapter"' in text and 'data-total="findings">2<' in text
