"""Synthetic scan records (the JSONL of `lora-convert scan --output`), seeded, for the fleet page's browser test and
its timing (bench/fleet_page.py): every status, two engine releases (some adapters checked against one only),
findings of real codes (lora_convert/codes.py) and engine outcomes of every kind, all bytes and all seconds
distinct (so "largest" and "slowest" have one right answer). A release's counts are None where it was asked for
but its rules could not all be evaluated (as lora_convert/scan/task.py records it); a release absent was not asked
for. The same (count, seed) gives the same records.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import lora_convert
from lora_convert.codes import ENGINE_OUTCOMES, ENGINE_PREFIX, REGISTRY
from lora_convert.scan.task import ScanTask, new_record

RELEASES = ("vllm==0.33.0", "sglang==0.5.23")
TEAMS = ("search", "support", "ads", "code", "legal", "med", "fin", "edu", "games", "voice")
FAMILIES = {  # family -> base
    "llama": "meta-llama/Llama-3.1-8B",
    "mixtral": "mistralai/Mixtral-8x7B-v0.1",
    "qwen3_moe": "Qwen/Qwen3-30B-A3B",
    "deepseek_v3": "deepseek-ai/DeepSeek-V3",
}
# (status, weight): mostly clean, a few of every kind of failure.
STATUS_WEIGHTS = (("ok", 60), ("findings", 26), ("error", 6), ("crashed", 4), ("timeout", 4))
ERROR_CODES = ("data.nan", "data.inf", "pairs.missing-B", "rank.a-b-mismatch", "shapes.out-features", "config.dora")
WARNING_CODES = ("data.zero-b", "data.magnitude-outlier", "config.rslora")
# Engine outcomes by how often a checked adapter gets them (exact most often; load failures rare).
OUTCOME_WEIGHTS = (("exact", 70), ("needs-flag", 6), ("ignored", 6), ("dropped", 8), ("wrong", 5), ("load-failure", 5))


def _rule_ids(release: str) -> dict[str, list[str]]:
    """{outcome: rule ids} of a release's rule file (lora_convert/engines/<engine>-<version>.json)."""
    path = Path(lora_convert.__file__).parent / "engines" / f"{release.replace('==', '-')}.json"
    by_outcome: dict[str, list[str]] = {}
    for rule in json.loads(path.read_text(encoding="utf-8"))["rules"]:
        by_outcome.setdefault(rule["outcome"], []).append(rule["id"])
    return by_outcome


RULE_IDS = {release: _rule_ids(release) for release in RELEASES}


def _finding(code: str, message: str, outcome: str | None = None) -> dict[str, Any]:
    """A finding of a registered code, or (with `outcome`) of a fired engine rule."""
    severity = (ENGINE_OUTCOMES[outcome][0] if outcome else REGISTRY[code].severity).value
    return {"code": code, "severity": severity, "message": message, "keys": []}


def _record(index: int, rng: random.Random, nbytes: int, seconds: float) -> dict[str, Any]:
    status = rng.choices([s for s, _ in STATUS_WEIGHTS], [w for _, w in STATUS_WEIGHTS])[0]
    family = rng.choice(sorted(FAMILIES))
    ident = f"{rng.choice(TEAMS)}/{family.replace('_', '-')}-{index:05d}"
    # the scan's own record builder: every key a real record has, in its order
    record = new_record(ScanTask(ident, f"/registry/{ident}", nbytes), status, seconds=seconds)
    if status in ("error", "crashed", "timeout"):
        kind = {"error": "AdapterFormatError", "crashed": "WorkerCrashed", "timeout": "Timeout"}[status]
        record["error"] = {"type": kind, "message": f"synthetic {status}"}
        record["exit_code"] = {"error": 2, "crashed": None, "timeout": None}[status]
        return record
    findings = []
    if status == "findings":
        findings += [_finding(c, f"synthetic {c}") for c in rng.sample(ERROR_CODES, rng.choice((1, 1, 2)))]
    if rng.random() < 0.2:
        findings.append(_finding(rng.choice(WARNING_CODES), "synthetic warning"))
    engines: dict[str, dict[str, int]] = {}
    for release in RELEASES if rng.random() < 0.85 else RELEASES[:1]:
        if rng.random() < 0.04:  # asked for, but its rules could not all be evaluated (engine-rules.unchecked)
            engines[release] = None
            continue
        outcome = rng.choices([o for o, _ in OUTCOME_WEIGHTS], [w for _, w in OUTCOME_WEIGHTS])[0]
        counts: dict[str, int] = {}
        if outcome != "exact":
            counts[outcome] = rng.randint(1, 4)
            if rng.random() < 0.3:  # a milder outcome beside it: the worst one must win
                counts["needs-flag"] = counts.get("needs-flag", 0) + 1
            engine = release.split("==")[0]
            rule = rng.choice(RULE_IDS[release].get(outcome) or [f"synthetic-{outcome}"])  # vllm has no "wrong" rule
            findings.append(_finding(f"{ENGINE_PREFIX}{engine}.{rule}", f"{release}: {outcome}", outcome))
        engines[release] = counts
    if status == "ok" and any(f["severity"] == "error" for f in findings):
        record["status"] = status = "findings"
    record.update(
        exit_code=0 if status == "ok" else 1,
        family=family,
        base=FAMILIES[family],
        rank=rng.choice((8, 16, 32, 64)),
        verdict="synthetic verdict",
        findings=findings,
        engines=engines,
        engine_outcomes=engines.get(RELEASES[0]) or {},
    )
    return record


def synthetic_records(count: int, seed: int = 27) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    sizes = rng.sample(range(1_000_000, 1_000_000 + 1_000 * count), count)  # distinct
    times = rng.sample(range(50, 50 + 7 * count), count)  # distinct milliseconds
    return [_record(i, rng, sizes[i], times[i] / 1000) for i in range(count)]


def write_jsonl(records: list[dict[str, Any]], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path
