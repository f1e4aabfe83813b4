"""SARIF 2.1.0 (the OASIS Static Analysis Results Interchange Format) for findings: what GitHub code scanning and
other SARIF viewers read.

One log, one run, tool `lora-convert`: one rule per finding code that occurs (its texts and level from the codes
registry, lora_convert/codes.py, or for `engine.<engine>.<rule>` from that engine's rule file), one result per
finding, located at the adapter's files: `adapter_config.json` for a config field, the weights file that holds a
tensor (the shard, from the header index) with the tensor key as a logical location. Paths inside the working
directory are relative to it under the base id SRCROOT (code scanning resolves them against the checkout); others
are absolute file URIs; a Hub adapter without a local folder has no location. An adapter that could not be
checked is a tool execution notification, never a result. The output is a pure function of its input (sorted, no
timestamps, no host names), so that two runs compare byte for byte.

Both `validate` (reports) and `scan` (its records, lora_convert/scan/sarif.py) render through `sarif_log`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_convert import __version__
from lora_convert.codes import AREAS, ENGINE_OUTCOMES, ENGINE_PREFIX, REGISTRY
from lora_convert.errors import LoraConvertError, UsageError
from lora_convert.io.report_file import check_report_path, write_report_file
from lora_convert.io.small_files import parse_json

SARIF_VERSION = "2.1.0"
TOOL_NAME = "lora-convert"
SRCROOT = "SRCROOT"
# A finding severity (the registry's, lora_convert/codes.py) -> the SARIF level.
LEVEL = {"error": "error", "warning": "warning", "info": "note"}
ORDER = {"error": 0, "warning": 1, "info": 2}
CODES_DOC = "docs/validate.md, section `lora-convert validate` (the table of finding codes)"
MAX_LOGICAL = 20  # tensor keys named per location, as a scan record keeps at most 20 keys per finding
CONFIG_NAME = "adapter_config.json"
INDEX_NAME = "adapter_model.safetensors.index.json"
SINGLE_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
FINGERPRINT = "loraConvertFinding/v1"


@dataclass(frozen=True)
class SarifAdapter:
    """One adapter's part of the log: its findings, or why it could not be checked."""

    name: str  # what identifies the adapter (the folder as given, a scan id, a Hub id)
    folder: Path | None  # the local folder that was read, for locations; None: no local files (a Hub id)
    # findings in their JSON form (Finding.to_json(), or a scan record's findings): code, severity, message, and
    # where present keys, expected, actual, fix
    findings: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None  # it was not checked: a tool execution notification


# ------------------------------------------------------------------------------------------------------ rules
_AREA_OF = {c.code: area for area in AREAS for c in area.codes}


def _code_rule(code: str, severity: str) -> dict[str, Any]:
    entry = REGISTRY.get(code)
    if entry is None:  # an engine code of a rule no installed rule file has any more (an old scan record)
        return _rule(code, severity, f"Finding {code}.", f"Finding {code}.", "", [])
    area = _AREA_OF[code]
    return _rule(
        code, entry.severity.value, entry.meaning, f"{entry.meaning} Checked: {area.checks}.", entry.action, [area.name]
    )


def _engine_rule(code: str, severity: str) -> dict[str, Any]:
    """The rule of `engine.<engine>.<rule id>` from the newest installed release of that engine that has it."""
    from lora_convert.engines.rules import engine_info, load_rules, releases

    engine, _, rule_id = code[len(ENGINE_PREFIX) :].partition(".")
    for release in reversed([r for r in releases() if r.engine == engine]):
        rule = next((r for r in load_rules(release.spec) if r.get("id") == rule_id), None)
        if rule is None:
            continue
        label = engine_info(release.spec).get("label") or release.spec
        outcome = rule["outcome"]
        level, meaning = ENGINE_OUTCOMES[outcome]
        # The message is a template of the rule file: its {placeholders} are filled per adapter.
        template = _placeholders(rule["message"])
        action = " ".join(p for p in (_placeholders(rule.get("fix") or ""), f"Source: {rule.get('source')}.") if p)
        return _rule(code, level.value, f"{label}, {outcome}: {meaning}.", f"{label}: {template}.", action, ["engine"])
    return _code_rule(code, severity)


def _placeholders(template: str) -> str:
    """A rule file's message or fix template with its {placeholders} (filled per adapter) shown as <placeholders>."""
    return re.sub(r"\{(\w+)\}", r"<\1>", template)


def _rule(code: str, severity: str, short: str, full: str, action: str, tags: list[str]) -> dict[str, Any]:
    help_text = f"{action} " if action else ""
    help_text += f"The meaning of every code: {CODES_DOC}."
    return {
        "id": code,
        "shortDescription": {"text": short},
        "fullDescription": {"text": full},
        "help": {"text": help_text},
        "defaultConfiguration": {"level": LEVEL.get(severity, "error")},
        "properties": {"tags": ["lora-convert", *tags]},
    }


def rule_for(code: str, severity: str) -> dict[str, Any]:
    """The reportingDescriptor of one finding code (`severity`: a finding's, for a code no registry knows)."""
    if code.startswith(ENGINE_PREFIX):
        return _engine_rule(code, severity)
    return _code_rule(code, severity)


# -------------------------------------------------------------------------------------------------- locations
class _Files:
    """An adapter folder's files as SARIF locations: tensor key -> weights file, config field -> its line."""

    def __init__(self, folder: Path, cwd: Path) -> None:
        self.folder = folder
        self.cwd = cwd
        self._tensor_files: dict[str, str] | None = None
        self._config_lines: dict[str, int] | None = None

    def artifact(self, name: str) -> dict[str, Any]:
        path = self.folder / name
        try:
            relative = path.resolve().relative_to(self.cwd)
        except (ValueError, OSError):
            return {"uri": path.resolve().as_uri()}
        return {"uri": relative.as_posix(), "uriBaseId": SRCROOT}

    def tensor_files(self) -> dict[str, str]:
        """Tensor key -> the file (name in the folder) that holds it, from the shard index or the one header."""
        if self._tensor_files is None:
            self._tensor_files = _tensor_files(self.folder)
        return self._tensor_files

    def config_line(self, field_name: str) -> int | None:
        if self._config_lines is None:
            self._config_lines = _config_lines(self.folder / CONFIG_NAME)
        return self._config_lines.get(field_name)

    def unlisted_key_file(self, key: str) -> str:
        """The file of a key no safetensors header lists: a dotted name that is no config field is a tensor of a
        legacy adapter_model.bin (whose keys are not listed without unpickling it); anything else is the config's."""
        if "." in key and self.config_line(key) is None and (self.folder / BIN_NAME).is_file():
            return BIN_NAME
        return CONFIG_NAME

    def weights_name(self) -> str | None:
        for name in (INDEX_NAME, SINGLE_NAME, BIN_NAME):
            if (self.folder / name).is_file():
                return name
        return None


def _tensor_files(folder: Path) -> dict[str, str]:
    from lora_convert.io.small_files import read_small_json
    from lora_convert.io.tensor_files import read_safetensors_header

    try:
        if (folder / SINGLE_NAME).is_file():
            tensors, _ = read_safetensors_header(folder / SINGLE_NAME)
            return dict.fromkeys(tensors, SINGLE_NAME)
        if (folder / INDEX_NAME).is_file():
            weight_map = read_small_json(folder / INDEX_NAME).get("weight_map")
            if isinstance(weight_map, dict):
                names = {str(v) for v in weight_map.values() if "/" not in str(v) and (folder / str(v)).is_file()}
                return {str(k): str(v) for k, v in weight_map.items() if str(v) in names}
    except LoraConvertError:  # a malformed file is a finding of its own (files.unreadable), located at the folder
        pass
    return {}


def _config_lines(path: Path) -> dict[str, int]:
    """Field name -> the line of its first `"name":` in adapter_config.json (1-based)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    except OSError:
        return {}
    lines: dict[str, int] = {}
    for number, line in enumerate(text[: 1 << 20].splitlines(), 1):
        for m in re.finditer(r'"((?:[^"\\]|\\.)*)"\s*:', line):
            lines.setdefault(m[1], number)
    return lines


def _physical(files: _Files, name: str, line: int | None = None) -> dict[str, Any]:
    physical: dict[str, Any] = {"artifactLocation": files.artifact(name)}
    if line is not None:
        physical["region"] = {"startLine": line}
    return physical


def _locations(finding: dict[str, Any], files: _Files | None) -> list[dict[str, Any]]:
    """One location per file the finding's keys lie in (tensors by shard, config fields in the config), in the
    order of the keys; a finding without keys is located at the config (or the weights for a files.* finding)."""
    if files is None:
        return []
    keys = _keys(finding)
    tensor_files = files.tensor_files() if keys else {}
    by_file: dict[str, list[str]] = {}
    for key in keys:
        by_file.setdefault(tensor_files.get(key) or files.unlisted_key_file(key), []).append(key)
    if not by_file:
        name = files.weights_name() if finding["code"].startswith("files.") else None
        by_file = {name or CONFIG_NAME: []}
    out = []
    for name, keys in by_file.items():
        if name == CONFIG_NAME:
            lines = [files.config_line(k) for k in keys]
            location: dict[str, Any] = {"physicalLocation": _physical(files, name, next((x for x in lines if x), None))}
            kind = "property"
        else:
            location = {"physicalLocation": _physical(files, name)}
            kind = "variable"
        if keys:
            location["logicalLocations"] = [{"fullyQualifiedName": k, "kind": kind} for k in keys[:MAX_LOGICAL]]
        out.append(location)
    return out


# ---------------------------------------------------------------------------------------------------- results
def _keys(finding: dict[str, Any]) -> list[str]:
    keys = finding.get("keys")
    return [str(k) for k in keys] if isinstance(keys, list) else []  # a record of an older scan has none


def message_text(finding: dict[str, Any]) -> str:
    """The finding as one paragraph: message, keys (the first five), expected vs actual, fix."""
    text = str(finding.get("message") or "")
    keys = _keys(finding)
    if keys:
        more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
        text += f" Keys: {', '.join(keys[:5])}{more}."
    expected, actual = finding.get("expected"), finding.get("actual")
    if expected is not None or actual is not None:
        text += f" Expected {expected!r}, got {actual!r}."
    if finding.get("fix"):
        text += f" Fix: {finding['fix']}"
    return text


def _fingerprint(adapter: str, finding: dict[str, Any]) -> str:
    ident = json.dumps([adapter, finding["code"], _keys(finding) or finding.get("message")], ensure_ascii=True)
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


def _result(adapter: SarifAdapter, finding: dict[str, Any], files: _Files | None, index: int) -> dict[str, Any]:
    locations = _locations(finding, files)
    text = message_text(finding)
    if not locations:
        text = f"{adapter.name}: {text}"
    result: dict[str, Any] = {
        "ruleId": finding["code"],
        "ruleIndex": index,
        "level": _level(finding),
        "message": {"text": text},
    }
    if locations:
        result["locations"] = locations
    result["partialFingerprints"] = {FINGERPRINT: _fingerprint(adapter.name, finding)}
    result["properties"] = {"adapter": adapter.name}
    return result


def _level(finding: dict[str, Any]) -> str:
    return LEVEL.get(str(finding.get("severity")), "error")  # an unknown severity (an edited record) fails closed


def _sort_key(finding: dict[str, Any]) -> tuple:
    return (ORDER.get(str(finding.get("severity")), 0), finding["code"], _keys(finding), str(finding.get("message")))


def sarif_log(adapters: list[SarifAdapter], *, cwd: Path | None = None) -> dict[str, Any]:
    """The SARIF 2.1.0 log of these adapters' findings: one run, adapters sorted by name, findings by severity,
    code and keys. `cwd`: what relative paths are relative to (default: the working directory)."""
    root = (cwd or Path.cwd()).resolve()
    ordered = sorted(adapters, key=lambda a: a.name)
    severity_of: dict[str, str] = {}
    for adapter in ordered:
        for f in adapter.findings:
            severity_of.setdefault(f["code"], str(f.get("severity")))
    rules = [rule_for(code, severity_of[code]) for code in sorted(severity_of)]
    index_of = {rule["id"]: i for i, rule in enumerate(rules)}
    results = []
    for adapter in ordered:
        files = _Files(adapter.folder, root) if adapter.folder is not None and adapter.folder.is_dir() else None
        for f in sorted(adapter.findings, key=_sort_key):
            results.append(_result(adapter, f, files, index_of[f["code"]]))
    notifications = [
        {"level": "error", "message": {"text": f"{a.name}: not checked: {a.error}"}} for a in ordered if a.error
    ]
    invocation: dict[str, Any] = {"executionSuccessful": not notifications}
    if notifications:
        invocation["toolExecutionNotifications"] = notifications
    run = {
        "tool": {"driver": {"name": TOOL_NAME, "version": __version__, "semanticVersion": __version__, "rules": rules}},
        "invocations": [invocation],
        "columnKind": "utf16CodeUnits",
        "results": results,
    }
    return {"version": SARIF_VERSION, "runs": [run]}


def report_adapter(report) -> SarifAdapter:
    """A validate report (lora_convert/check/report.py ValidationReport) as a SarifAdapter."""
    # A Hub adapter's folder is a download cache, not a file of the repository being scanned: no locations.
    local = report.adapter_path and Path(report.adapter).expanduser().exists()
    folder = Path(report.adapter_path) if local else None
    return SarifAdapter(report.adapter, folder, [f.to_json() for f in report.findings])


def reports_sarif(reports: list, *, failed: dict[str, str] | None = None, cwd: Path | None = None) -> dict[str, Any]:
    """The SARIF log of validate reports; `failed`: adapter -> why it could not be validated."""
    adapters = [report_adapter(r) for r in reports]
    adapters += [SarifAdapter(name, None, error=why) for name, why in (failed or {}).items()]
    return sarif_log(adapters, cwd=cwd)


# ------------------------------------------------------------------------------------------------ the file
MAX_PREVIOUS_BYTES = 256 * 1024 * 1024  # a previous log larger than this is not read to see whether it is ours


def _is_our_log(path: Path) -> bool:
    """Whether `path` holds a SARIF log lora-convert wrote (the only file --sarif replaces)."""
    try:
        if path.stat().st_size > MAX_PREVIOUS_BYTES:
            return False
        document = parse_json(path.read_bytes(), str(path), UsageError)  # the one JSON reader
    except (OSError, UsageError):
        return False
    try:
        return document["version"] == SARIF_VERSION and all(
            run["tool"]["driver"]["name"] == TOOL_NAME for run in document["runs"]
        )
    except (KeyError, TypeError):
        return False


def check_sarif_path(path: str | os.PathLike) -> Path:
    """Refuse a --sarif path the log may not replace (lora_convert/io/report_file.py): anything but a SARIF log of
    lora-convert (an empty file is replaced). Raises UsageError."""
    return check_report_path(path, option="--sarif", kind="SARIF log", is_ours=_is_our_log)


def write_sarif(log: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write `log` to `path` atomically; what it may replace: check_sarif_path."""
    data = (json.dumps(log, indent=2) + "\n").encode("utf-8")
    return write_report_file(data, check_sarif_path(path), option="--sarif")
