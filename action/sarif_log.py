"""The action's `sarif` input: one SARIF 2.1.0 log of every adapter the action validated, for
github/codeql-action/upload-sarif (code scanning).

Each validator run (one per adapter, see validate_changed.py) also writes its own log (`lora-convert validate
--sarif FILE`, beside its `--format github` annotations); this module merges them into one run of one tool, as
code scanning wants (several runs of one tool and category in one upload are refused): the rules of all of them,
each once, the results in the order of the adapters, and one invocation whose notifications say which adapters the
gate could not validate. Nothing validated (no changed adapter, or the gate stopped before) still writes a log,
with no results, so that the upload step has a file and closes the alerts of adapters that are fixed.
Standard library only.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path


class SarifCollector:
    """The per-adapter logs of one action run, merged into the file the `sarif` input names ("" = none)."""

    def __init__(self, target: str = "") -> None:
        self.target: Path | None = None
        self._folder: Path | None = None
        self._logs: list[Path] = []
        self._not_validated: list[str] = []
        self.set_target(target)

    def set_target(self, target: str) -> None:
        # Absolute now: the action changes into the top of the checkout before validating.
        self.target = Path(target).resolve() if target.strip() else None

    def args(self, adapter: str) -> list[str]:
        """The validator's extra arguments for `adapter`: `--sarif <its own log>`."""
        if self.target is None:
            return []
        if self._folder is None:
            self._folder = Path(tempfile.mkdtemp(prefix="lora-convert-sarif-"))
        log = self._folder / f"{len(self._logs):05d}.sarif"
        self._logs.append(log)
        return ["--sarif", str(log)]

    def not_validated(self, adapter: str, why: str) -> None:
        """The gate's reason an adapter was not validated (its error annotation), for the log's notifications."""
        if self.target is not None:
            self._not_validated.append(f"{adapter}: not validated: {why}")

    def write(self) -> Path | None:
        if self.target is None:
            return None
        merged = merge([_read(p) for p in self._logs], self._not_validated)
        if self._folder is not None:  # the per-adapter logs: this run's own temporary folder
            shutil.rmtree(self._folder, ignore_errors=True)
        self.target.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.target.with_name(f".{self.target.name}.tmp")
        tmp.write_text(json.dumps(merged, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.target)
        return self.target


def _read(path: Path) -> dict | None:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # the validator stopped before writing it: the gate says why (not_validated)
        return None
    return document if isinstance(document, dict) and document.get("runs") else None


def merge(logs: list[dict | None], not_validated: list[str]) -> dict:
    """One log with one run: every log's rules (each id once, sorted), results (rule indexes renumbered) and
    notifications, then the gate's own."""
    runs = [run for log in logs if log for run in log["runs"]]
    driver = {"name": "lora-convert"}
    if runs:
        driver.update({k: v for k, v in runs[0]["tool"]["driver"].items() if k != "rules"})
    rules: dict[str, dict] = {}
    for run in runs:
        for rule in run["tool"]["driver"].get("rules", []):
            rules.setdefault(rule["id"], rule)
    order = sorted(rules)
    index = {rule_id: i for i, rule_id in enumerate(order)}
    results, notifications, successful = [], [], True
    for run in runs:
        for result in run.get("results", []):
            results.append({**result, "ruleIndex": index[result["ruleId"]]} if "ruleIndex" in result else result)
        for invocation in run.get("invocations", []):
            successful = successful and invocation.get("executionSuccessful", True)
            notifications += invocation.get("toolExecutionNotifications", [])
    notifications += [{"level": "error", "message": {"text": text}} for text in not_validated]
    invocation: dict = {"executionSuccessful": successful and not not_validated}
    if notifications:
        invocation["toolExecutionNotifications"] = notifications
    run = {
        "tool": {"driver": {**driver, "rules": [rules[r] for r in order]}},
        "invocations": [invocation],
        "columnKind": "utf16CodeUnits",
        "results": results,
    }
    return {"version": "2.1.0", "runs": [run]}
