"""Rule citations as data that can be re-located: each rule's first `path:line` citation and the short text (its
`anchor`) that line holds in the release the rule cites, checked against that release's own sources.

A rule's `source` starts with the release it was read in (`sglang==0.5.21: sglang/srt/lora/layers.py:505 (...)`).
Its `anchor` is `{"at": "<that first path:line>", "text": "<a short piece of the cited lines>"}`. With the anchor
stored, a citation is checked (tests/test_engine_citations.py: the text is within the cited lines of the release's
file, from the proof cache or site-packages) and re-located in another release by searching for the text
(`locate`), which is what re-citing a child release starts from.

Script mode:
    python tests/engine_proof/citations.py check              every anchor of every rule file; exit 1 on a problem
    python tests/engine_proof/citations.py fill               add the anchor of every rule that has none, taken
                                                              from the first non-blank cited line (review the diff)
    python tests/engine_proof/citations.py locate RELEASE     where each anchor of RELEASE's parent lies in RELEASE
"""

from __future__ import annotations

import json
import re
import sys
from functools import cache
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENGINES = HERE.parents[1] / "lora_convert" / "engines"
# `path:line` or `path:first-last`; the path is relative to the release's folder (`sglang/srt/lora/utils.py`)
CITATION = re.compile(r"(?P<path>[A-Za-z_][\w./-]*\.py):(?P<first>\d+)(?:-(?P<last>\d+))?")
RELEASE_PREFIX = re.compile(r"^(?P<release>[a-z][a-z0-9_]*==[\d.]+):")
ANCHOR_CHARS = 60  # an anchor is a short quote, not a copy of the code
MIN_ANCHOR_CHARS = 12


def first_citation(source: str) -> tuple[str, str, int, int] | None:
    """(release, path, first line, last line) of a rule source's first citation, or None when it cites no line."""
    prefix = RELEASE_PREFIX.match(source)
    found = CITATION.search(source)
    if prefix is None or found is None:
        return None
    first = int(found["first"])
    return prefix["release"], found["path"], first, int(found["last"] or first)


@cache
def release_folder(release: str) -> Path | None:
    """The folder holding `release`'s package: site-packages for the installed release, else the proof cache."""
    sys.path[:0] = [str(HERE.parent)] if str(HERE.parent) not in sys.path else []
    from engine_proof import releases

    if releases.is_installed(release):
        import importlib.util

        spec = importlib.util.find_spec(releases.split(release)[0])
        return Path(spec.origin).parents[1] if spec and spec.origin else None
    return releases.cached(release)


@cache
def _lines(folder: Path, path: str) -> tuple[str, ...] | None:
    file = folder / path
    return tuple(file.read_text(errors="replace").splitlines()) if file.is_file() else None


def _squeeze(text: str) -> str:
    return " ".join(text.split())


def anchor_problem(rule: dict) -> str | None:
    """Why a rule's anchor does not hold (None: it does): missing, not at the first citation, or its text not within
    the cited lines of the cited release's file. Whitespace runs compare as one space."""
    cited = first_citation(rule["source"])
    if cited is None:
        return None
    release, path, first, last = cited
    anchor = rule.get("anchor")
    if anchor is None:
        return f"no anchor for its citation {path}:{first}"
    if anchor["at"] != f"{path}:{first}":
        return f"anchor at {anchor['at']}, but the source's first citation is {path}:{first}"
    folder = release_folder(release)
    if folder is None:
        return f"{release} is not in the proof cache (make proof-cache)"
    lines = _lines(folder, path)
    if lines is None:
        return f"{path} does not exist in {release}"
    cited_text = _squeeze(" ".join(lines[first - 1 : last]))
    if _squeeze(anchor["text"]) not in cited_text:
        return f"{release} {path}:{first}-{last} does not contain {anchor['text']!r}"
    return None


def make_anchor(source: str) -> dict | None:
    """The anchor of a source's first citation: the first cited line of at least MIN_ANCHOR_CHARS characters (else
    the first non-blank one), stripped and shortened."""
    cited = first_citation(source)
    if cited is None:
        return None
    release, path, first, last = cited
    folder = release_folder(release)
    lines = _lines(folder, path) if folder is not None else None
    if not lines:
        return None
    cited_lines = [ln.strip() for ln in lines[first - 1 : last] if ln.strip()]
    # a line that says something (not `cls,` or a docstring's quotes), else the first non-blank one
    text = next((ln for ln in cited_lines if len(ln) >= MIN_ANCHOR_CHARS), cited_lines[0] if cited_lines else None)
    if text is None:
        return None
    return {"at": f"{path}:{first}", "text": text[:ANCHOR_CHARS].strip()}


def locate(release: str, path: str, text: str) -> list[int]:
    """The line numbers of `path` in `release` that contain `text` (whitespace runs as one space)."""
    folder = release_folder(release)
    lines = _lines(folder, path) if folder is not None else None
    want = _squeeze(text)
    return [i + 1 for i, ln in enumerate(lines or ()) if want in _squeeze(ln)]


# ------------------------------------------------------------------------------------------------ the rule files
def raw_rules(data: dict):
    """Every rule object of a raw rule file that carries its own `source`: `rules`, `rules_added`, `rules_changed`."""
    for key in ("rules", "rules_added", "rules_changed"):
        yield from data.get(key, [])


def _files():
    return sorted(ENGINES.glob("*-[0-9]*.json"))


def _check() -> int:
    problems = []
    for file in _files():
        for rule in raw_rules(json.loads(file.read_text())):
            why = anchor_problem(rule)
            if why:
                problems.append(f"{file.name} {rule['id']}: {why}")
    print("\n".join(problems) or "every anchor holds")
    return 1 if problems else 0


def _fill() -> int:
    for file in _files():
        data = json.loads(file.read_text())
        changed = 0
        for rule in raw_rules(data):
            cited = first_citation(rule["source"])
            if cited and (rule.get("anchor") or {}).get("at") != f"{cited[1]}:{cited[2]}":
                anchor = make_anchor(rule["source"])
                if anchor is not None:
                    rule["anchor"] = anchor
                    changed += 1
        if changed:
            file.write_text(json.dumps(data, indent=1, ensure_ascii=True) + "\n")
        print(f"{file.name}: {changed} anchor(s) added")
    return 0


def _locate(release: str) -> int:
    from lora_convert.engines.rules import engine_info, load_rules

    parent = engine_info(release).get("extends") or release
    for rule in load_rules(parent):
        anchor = rule.get("anchor")
        if anchor is None:
            continue
        path = anchor["at"].rsplit(":", 1)[0]
        print(
            f"{rule['id']}: {anchor['at']} -> {release} {path}:{locate(release, path, anchor['text']) or 'NOT FOUND'}"
        )
    return 0


if __name__ == "__main__":
    command = sys.argv[1:2]
    if command == ["check"]:
        sys.exit(_check())
    if command == ["fill"]:
        sys.exit(_fill())
    if command == ["locate"] and len(sys.argv) == 3:
        sys.exit(_locate(sys.argv[2]))
    print(__doc__)
    sys.exit(2)
