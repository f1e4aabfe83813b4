"""The docs match the repository: every link in the Markdown files resolves, every repository file they name in
backticks exists, every docs/*.md the code names exists, and the CI examples name the version this checkout is (a
user copying them gets a tag that exists once this version is released)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = sorted(
    [
        ROOT / "README.md",
        ROOT / "DEVELOPERS.md",
        *(ROOT / "docs").glob("*.md"),
        *(ROOT / "examples").rglob("README.md"),
        *(ROOT / "bench").glob("*.md"),
        ROOT / "tests" / "fixtures" / "README.md",
    ]
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


# ------------------------------------------------------------------------------ file names in backticks and in code
# The prose docs; generated or historical folders (tests/fixtures/README.md describes generated data) are not here.
PROSE = sorted([ROOT / "README.md", ROOT / "DEVELOPERS.md", *(ROOT / "docs").glob("*.md")])
CODE_SPAN = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
# The repository's own folders: a span whose first token starts with one of them names a repository path.
TOP_FOLDERS = sorted(
    p.name
    for p in ROOT.iterdir()
    if p.is_dir() and not p.name.startswith(".") and p.name not in ("lora_convert.egg-info", "build", "dist")
) + [".ci"]
# Files of other projects the docs cite by name (the pinned SGLang and PEFT sources, llama.cpp's converters), not
# files of this repository.
OTHER_PROJECTS_FILES = {"lora_model.py", "model_manager.py", "convert_hf_to_gguf.py", "convert_lora_to_gguf.py"}
REPO_FILES = [p for p in ROOT.rglob("*") if p.is_file() and ".git" not in p.parts and ".venv" not in p.parts]
BASENAMES = {p.name for p in REPO_FILES}


def _named_paths(path: Path) -> list[str]:
    """The first token of every inline code span outside fenced blocks that names a repository file or folder:
    a path under one of TOP_FOLDERS, or a bare `*.py` name (a module named by its file). Tokens with a pattern
    or a placeholder (`*`, `<...>`, `{...}`) name a family of files and are not checked."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    tokens = [span.split()[0].rstrip(".,:;)") for span in CODE_SPAN.findall(text) if span.split()]
    return [t for t in tokens if t and not re.search(r"[*<>{}\[\]@~]", t) and _is_repository_path(t)]


def _is_repository_path(token: str) -> bool:
    if "/" not in token:
        return token.endswith(".py")
    if token.removeprefix("./").split("/")[0] in TOP_FOLDERS:
        return True
    return re.search(r"\.(py|md|json|ya?ml|sh|toml)$", token) is not None  # a tail such as `cli/_app.py`


def _resolves(token: str) -> bool:
    if "/" not in token:  # a module named by its file name: some file of the repository has it
        return token in BASENAMES or token in OTHER_PROJECTS_FILES
    if token.removeprefix("./").split("/")[0] in TOP_FOLDERS:
        return (ROOT / token.removeprefix("./")).exists()
    return any(p.as_posix().endswith("/" + token) for p in REPO_FILES)


def test_the_docs_name_files_to_check():
    # Guards the extraction: if it found nothing, the check below would pass vacuously.
    assert sum(len(_named_paths(p)) for p in PROSE) >= 10


def test_a_missing_file_in_backticks_is_caught(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text(
        "See `lora_convert/nowhere.py`, `cli/gone.py --help`, `gone.py`, `tests/*.py` and `config.json`.\n"
        "```sh\nlora-convert validate `docs/in-a-fence.md`\n```\n"
    )
    assert _named_paths(doc) == ["lora_convert/nowhere.py", "cli/gone.py", "gone.py"]
    assert not any(_resolves(t) for t in _named_paths(doc))
    assert _resolves("lora_convert/errors.py") and _resolves("errors.py")


@pytest.mark.parametrize("doc", PROSE, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_file_named_in_backticks_exists(doc: Path):
    missing = sorted({t for t in _named_paths(doc) if not _resolves(t)})
    assert not missing, f"{doc.relative_to(ROOT)} names files that do not exist: {missing}"


# Python that ships or measures: its docstrings and comments point readers at docs/.
SOURCE = sorted(
    [*(ROOT / "lora_convert").rglob("*.py"), *(ROOT / "kernels").rglob("*.py"), *(ROOT / "bench").glob("*.py")]
)


def test_every_doc_the_code_names_exists():
    missing = []
    for path in SOURCE:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for doc in re.findall(r"\bdocs/[\w.-]+\.md\b", line):
                if not (ROOT / doc).exists():
                    missing.append(f"{path.relative_to(ROOT)}:{n}: {doc}")
    assert not missing, "the code names docs that do not exist:\n  " + "\n  ".join(missing)


def test_the_code_cites_nothing_outside_the_repository():
    # A reader of the shipped code has the repository, not the notes it was written from.
    outside = []
    for path in SOURCE:
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"\.\./shared/|\bshared/reference/", line):
                outside.append(f"{path.relative_to(ROOT)}:{n}")
    assert not outside, "paths outside the repository cited at:\n  " + "\n  ".join(outside)


def test_readme_family_count_is_the_shipped_schemas():
    from lora_convert.arch.schema import list_schemas

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    claimed = re.search(r"checks trust: (\d+) families", readme)
    assert claimed is not None and int(claimed.group(1)) == len(list_schemas())


# ------------------------------------------------------------------------------ docs/api.md names what exists
API_DOC = ROOT / "docs" / "api.md"
DOTTED_NAME = re.compile(r"\blora_convert(?:\.[A-Za-z_]\w*)+")


def _import_dotted(name: str):
    """The object a dotted name names: the longest importable module prefix, then attributes. Raises
    AttributeError (or ModuleNotFoundError for a missing package) when it does not exist."""
    import importlib

    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        module_name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not (module_name + ".").startswith(exc.name + "."):
                raise  # the module exists but an import inside it failed: that is an error
            continue
        for attribute in parts[i:]:
            obj = getattr(obj, attribute)
        return obj
    raise ModuleNotFoundError(name)


def test_the_api_doc_names_lora_convert_objects():
    # Guards the extraction: the check below would pass vacuously on an empty list.
    assert len(set(DOTTED_NAME.findall(API_DOC.read_text(encoding="utf-8")))) >= 10


def test_a_name_that_does_not_exist_is_caught():
    assert _import_dotted("lora_convert.check.report.ValidationReport") is not None
    for missing in ("lora_convert.check.validate.exit_code", "lora_convert.no_such_module.thing"):
        with pytest.raises((AttributeError, ModuleNotFoundError)):
            _import_dotted(missing)


def test_every_object_the_api_doc_names_exists():
    missing = []
    for name in sorted(set(DOTTED_NAME.findall(API_DOC.read_text(encoding="utf-8")))):
        try:
            _import_dotted(name)
        except (AttributeError, ModuleNotFoundError) as exc:
            missing.append(f"{name} ({type(exc).__name__}: {exc})")
    assert not missing, "docs/api.md names what does not exist:\n  " + "\n  ".join(missing)


def test_the_api_doc_signatures_are_the_functions():
    """Each `name(parameters)` the doc spells out in full lists the real function's parameters, in order."""
    import inspect

    import lora_convert

    text = API_DOC.read_text(encoding="utf-8")
    checked = 0
    for name, params in re.findall(r"`(\w+_adapters?)\(([^`]*)\)`", text):
        if "..." in params:
            continue  # an abbreviation (the table of functions)
        documented = [p.split("=")[0].strip() for p in params.replace("\n", " ").split(",")]
        documented = [p for p in documented if p and p != "*"]
        real = list(inspect.signature(getattr(lora_convert, name)).parameters)
        assert documented == real, f"docs/api.md: {name}({', '.join(documented)}); the function takes {real}"
        checked += 1
    assert checked >= 3


def test_the_api_doc_lists_every_layout():
    from lora_convert.api import layouts

    text = API_DOC.read_text(encoding="utf-8")
    sentence = re.search(r"writes\s+`layout`\s+\((.*?)\)\s+into the folder", text, flags=re.S)
    assert sentence is not None, "docs/api.md no longer says which layouts normalize_adapter writes"
    documented = re.findall(r'`"([\w.=]+)"`', sentence.group(1))
    assert [d for d in documented if "==" not in d] == list(layouts()), documented
    assert {"stacked", "peft", "sglang", "vllm"} <= set(layouts())
