"""The docs match the repository: every link in the Markdown files resolves, and the CI examples name the
version this checkout is (a user copying them gets a tag that exists once this version is released)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted(
    [ROOT / "README.md", ROOT / "DEVELOPERS.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "examples").rglob("README.md"),
     *(ROOT / "bench").glob("*.md"), ROOT / "tests" / "fixtures" / "README.md"]
)
# [text](target) outside code spans; images too. Reference-style links are not used in this repository.
LINK = re.compile(r"(?<!`)\[[^\]\n]*\]\(([^)\s]+)\)")


def _headings(path: Path) -> set[str]:
    """GitHub's anchors: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    anchors = set()
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if in_code or not line.startswith("#"):
            continue
        title = line.lstrip("#").strip().lower()
        anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def _links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return LINK.findall(text)


def test_the_docs_have_links_to_check():
    assert sum(len(_links(p)) for p in DOCS if p.exists()) >= 4


@pytest.mark.parametrize("doc", [p for p in DOCS if p.exists()], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves(doc: Path):
    broken = []
    for target in _links(doc):
        if re.match(r"^[a-z]+:", target):  # https:, mailto: ... are not checked offline
            continue
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _headings(dest):
            broken.append(f"{target} (no heading #{anchor})")
        elif ROOT not in dest.parents and dest != ROOT:
            broken.append(f"{target} (outside the repository)")
    assert not broken, f"{doc.relative_to(ROOT)}: broken links: {broken}"


def test_ci_examples_name_this_version():
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("version")
    if version is None:  # dynamic: read from the package
        text = (ROOT / "lora_convert" / "__init__.py").read_text()
        version = re.search(r'__version__\s*=\s*"([^"]+)"', text).group(1)
    tag = f"v{version}"
    places = [ROOT / "examples" / "ci" / "validate-adapters.yml", ROOT / "examples" / "ci" / "pre-commit-config.yaml",
              ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    named = {}
    for path in places:
        text = path.read_text(encoding="utf-8")
        for found in re.findall(r"lora-convert@(v[\w.]+)", text) + re.findall(r"^\s*rev:\s*(v[\w.]+)", text, flags=re.M):
            named.setdefault(found, []).append(str(path.relative_to(ROOT)))
    assert set(named) == {tag}, f"the CI examples must name {tag}: {named}"
    # Both examples name a version (so the check above is about something).
    assert all(any(str(p.relative_to(ROOT)) in v for v in named.values()) for p in places[:2])
