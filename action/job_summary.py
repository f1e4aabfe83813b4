"""The composite action's job summary: one Markdown section appended to the file that $GITHUB_STEP_SUMMARY names
(GitHub shows it on the run's summary page; "Adding a job summary",
https://docs.github.com/en/actions/reference/workflows-and-actions/workflow-commands#adding-a-job-summary).

It says what the step decided, never more: the exit code and pass/fail first, the adapters validated and each
one's verdict and counts (from the annotations its validator printed), the engine table (the release's outcome of
each rule that fired, when an engine was asked), every message of the action itself (why something was not
validated, why the gate failed), and where the annotations are. Every piece of text that comes from the
repository or the inputs (adapter paths, messages quoting them) is escaped, so it stays text in its table cell or
line. Standard library only, except the engine table, which reads the release's rule file through lora_convert
(installed in this Python by the action's install step): the outcome of each rule lives there and nowhere else.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

# `--engine` findings are `engine.<engine>.<rule id>` (lora_convert/codes.py); these say the rules did not all run.
ENGINE_PREFIX = "engine."
RULES_UNCHECKED = ("engine-rules.unchecked", "engine-rules.unchecked-allowed")
NOT_VALIDATED = "-"  # the count cells of an adapter without a verdict: nothing was counted
RUN_PARTS = {
    "GITHUB_SERVER_URL": re.compile(r"https?://[A-Za-z0-9.:-]+"),
    "GITHUB_REPOSITORY": re.compile(r"[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+"),
    "GITHUB_RUN_ID": re.compile(r"[0-9]+"),
}


@dataclass
class AdapterResult:
    """One validator run, as the summary shows it."""

    adapter: str
    verdict: str  # "OK", "FAIL (errors)", "killed (SIGKILL)", "timeout (30 min)", "not validated (exit 3: ...)"
    validated: bool  # the validator ended with a verdict that agrees with its exit code
    levels: Counter = field(default_factory=Counter)  # annotation level ("error", "warning", "notice") -> count
    codes: list[str] = field(default_factory=list)  # the finding code of each annotation


@dataclass
class GateRecord:
    """What the action did, filled in as it runs."""

    planned: int = 0  # adapters to validate (the `adapters` output)
    engine: str = "none"  # the `--engine` each validator was given
    results: list[AdapterResult] = field(default_factory=list)
    messages: list[tuple[str, str, str | None]] = field(default_factory=list)  # the action's own (level, text, file)


# ---- Markdown -------------------------------------------------------------------------------------------------------
_LINE_BREAKS = re.compile(r"[\x00-\x1f\x7f\u0085\u2028\u2029]+")
# The ASCII punctuation that is markup inside a line of GitHub's Markdown (escapes, code, emphasis, links and
# images, HTML and autolinks, table cells, strikethrough, entities, math); a backslash before ASCII punctuation
# makes it literal (CommonMark, "Backslash escapes"; GFM tables split cells only at unescaped pipes). Escaped text
# never starts a line here, so the line-start markers (#, -, +, >, 1.) need no escape.
_MARKUP = re.compile(r"([\\`*_\[\]<>|~&$])")


def text(value: object) -> str:
    """User-controlled text as literal Markdown on one line: control characters and line breaks become spaces."""
    return _MARKUP.sub(r"\\\1", _LINE_BREAKS.sub(" ", str(value)))


def row(cells: list[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def table(header: list[str], rows: list[list[object]], counts: range) -> list[str]:
    align = ["---:" if i in counts else "---" for i in range(len(header))]  # counts right-aligned
    return [row(header), row(align), *(row(r) for r in rows), ""]


# ---- the sections ---------------------------------------------------------------------------------------------------
def headline(record: GateRecord, exit_code: int) -> str:
    validated = [r for r in record.results if r.validated]
    failed = [r for r in validated if not r.verdict.startswith("OK")]
    not_validated = len(record.results) - len(validated)
    if exit_code == 0:
        if not record.results:
            return "**Passed** (exit 0): no changed adapter to validate."
        return f"**Passed** (exit 0): {len(validated)} adapter(s) validated, none with errors."
    parts = []
    if failed:
        parts.append(f"{len(failed)} adapter(s) failed validation")
    if not_validated:
        parts.append(f"{not_validated} adapter(s) could not be validated")
    if not parts:
        parts.append("the errors of the action itself (below)")
    return f"**Failed** (exit {exit_code}): " + ", ".join(parts) + "."


def adapter_table(record: GateRecord) -> list[str]:
    rows = []
    for r in record.results:
        counts = [r.levels["error"], r.levels["warning"], r.levels["notice"]] if r.validated else [NOT_VALIDATED] * 3
        rows.append([text(r.adapter), text(r.verdict), *counts])
    return table(["adapter", "verdict", "errors", "warnings", "notes"], rows, counts=range(2, 5))


def engine_table(record: GateRecord) -> list[str]:
    release = engine_release(record.engine)
    if release is None:
        return [f"Engine {text(record.engine)}: its rule file could not be read, so no outcome is counted.", ""]
    label, engine, outcomes, outcome_of = release
    rows = []
    for r in record.results:
        if not r.validated:
            rows.append([text(r.adapter), text(label), *[NOT_VALIDATED] * len(outcomes), "not validated"])
            continue
        fired = [c[len(f"{ENGINE_PREFIX}{engine}.") :] for c in r.codes if c.startswith(f"{ENGINE_PREFIX}{engine}.")]
        counts = Counter(outcome_of.get(rule_id, "unknown") for rule_id in fired)
        notes = []
        if any(code in RULES_UNCHECKED for code in r.codes):
            notes.append("rules not all evaluated (engine-rules.unchecked)")
        if counts["unknown"]:
            notes.append(f"{counts['unknown']} finding(s) of rules this release does not list")
        if not fired and not notes:
            notes.append("no rule fired")
        rows.append([text(r.adapter), text(label), *(counts[o] for o in outcomes), text("; ".join(notes))])
    header = ["adapter", "release", *outcomes, "note"]
    return table(header, rows, counts=range(2, 2 + len(outcomes)))


def engine_release(spec: str) -> tuple[str, str, tuple[str, ...], dict[str, str]] | None:
    """(label, engine, outcomes, rule id -> outcome) of the release `--engine spec` checks, as lora-convert
    resolves it (`sglang` is its pinned release); None when lora_convert cannot say."""
    try:
        from lora_convert.engines.rules import OUTCOMES, engine_info, load_rules, resolve_engine
        from lora_convert.errors import LoraConvertError
    except ImportError:
        return None
    try:
        release = resolve_engine(spec)
        label = engine_info(spec).get("label") or f"{release.engine} {release.version}"
        return str(label), release.engine, OUTCOMES, {rule["id"]: rule["outcome"] for rule in load_rules(spec)}
    except LoraConvertError:
        return None


def messages(record: GateRecord) -> list[str]:
    lines = ["### Messages of the action", ""]
    for level, message, file in record.messages:
        where = f" ({text(file)})" if file else ""
        lines.append(f"- **{level}**{where}: {text(message)}")
    return [*lines, ""]


def run_url(env: dict) -> str | None:
    """The workflow run's page, when the runner's variables say which (and look like what GitHub sets)."""
    parts = [env.get(name, "").strip() for name in RUN_PARTS]
    if not all(pattern.fullmatch(part) for pattern, part in zip(RUN_PARTS.values(), parts, strict=True)):
        return None
    server, repository, run_id = parts
    return f"{server.rstrip('/')}/{repository}/actions/runs/{run_id}"


def where_annotations_are(env: dict) -> str:
    # A link to the annotations themselves needs the check run's id, which only the GitHub API knows.
    url = run_url(env)
    page = f"[this workflow run's checks page]({url})" if url else "this workflow run's checks page"
    return (
        "Each finding is an annotation on its adapter's adapter\\_config.json: on a pull request, in the "
        f"**Files changed** tab; all of them are listed on {page} (Annotations)."
    )


def render(record: GateRecord, exit_code: int, env: dict) -> str:
    validated = sum(1 for r in record.results if r.validated)
    lines = ["## lora-convert validate", "", headline(record, exit_code), ""]
    lines += [f"Adapters validated: {validated}" + (f" of {record.planned}" if record.planned else ""), ""]
    if record.results:
        lines += adapter_table(record)
        if record.engine.strip().lower() not in ("", "none"):
            lines += ["### Engine", ""] + engine_table(record)
    if record.messages:
        lines += messages(record)
    if record.results:
        lines += [where_annotations_are(env), ""]
    return "\n".join(lines) + "\n"


def write(record: GateRecord, exit_code: int, env: dict) -> None:
    """Append the summary to $GITHUB_STEP_SUMMARY; nothing when it is unset or empty (not on GitHub)."""
    path = env.get("GITHUB_STEP_SUMMARY", "")
    if not path:
        return
    with open(path, "a", encoding="utf-8", errors="backslashreplace") as f:
        f.write(render(record, exit_code, env))
