"""The sample outputs in README.md and docs/*.md, produced by the tool itself.

A sample is a fenced block between `<!-- sample -->` and `<!-- /sample -->`; its lines starting with
`$ lora-convert ` are commands, everything else is what they printed. `render(readme_text)` runs every command
(in a scratch folder holding a copy of examples/, at 100 columns, stdout and stderr as a terminal user sees them
in order) and returns the text with fresh outputs; tests/test_readme_samples.py fails when a file differs, and
`python tests/readme_samples.py --write` rewrites them (`make readme`).

Timings vary between runs, so seconds are masked when comparing (`comparable`), never in the README itself.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def sample_files() -> list[Path]:
    """Every Markdown file of the repository's docs that holds a sample block."""
    candidates = [README, *sorted((ROOT / "docs").glob("*.md"))]
    return [p for p in candidates if "<!-- sample -->" in p.read_text(encoding="utf-8")]


BLOCK = re.compile(r"(<!-- sample -->\n```[a-z]*\n)(.*?)(```\n<!-- /sample -->)", re.S)
COLUMNS = 100


def _console_script() -> str:
    script = Path(sys.executable).parent / "lora-convert"
    if not script.exists():
        raise RuntimeError(f"no lora-convert console script beside {sys.executable}; install the project first")
    return str(script)


def _run(command: str, cwd: Path) -> str:
    argv = shlex.split(command)
    assert argv[0] == "lora-convert", command
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LORA_CONVERT_", "FORCE_COLOR"))}
    env.update(COLUMNS=str(COLUMNS), NO_COLOR="1", TERM="dumb", HF_HUB_OFFLINE="1", TRITON_INTERPRET="1")
    done = subprocess.run(
        [_console_script(), *argv[1:]],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=600,
    )
    return done.stdout


def render(text: str) -> str:
    """`text` with every sample block's output replaced by what its commands print now."""
    with tempfile.TemporaryDirectory(prefix="lora-convert-readme-") as scratch:
        work = Path(scratch)
        shutil.copytree(ROOT / "examples", work / "examples")

        def one_block(match: re.Match) -> str:
            commands = [line[2:] for line in match.group(2).splitlines() if line.startswith("$ lora-convert ")]
            if not commands:
                raise ValueError(f"a README sample without a `$ lora-convert` command:\n{match.group(0)}")
            body = "".join(f"$ {cmd}\n{_run(cmd, work)}" for cmd in commands)
            return match.group(1) + body + match.group(3)

        return replace_family_list(BLOCK.sub(one_block, text))


FAMILIES = ("<!-- families -->", "<!-- /families -->")


def family_list() -> str:
    """The README's list of supported families, from the shipped schemas: each family with the other model types
    it claims, wrapped as the README's bullet continues."""
    import textwrap

    from lora_convert.arch.schema import list_schemas, load_schema

    schemas = [load_schema(name) for name in list_schemas()]
    names = []
    for s in schemas:
        others = [t for t in s.model_types if t != s.family]
        names.append(f"`{s.family}`" + (f" ({', '.join(others)})" if others else ""))
    text = f"checks trust: {len(schemas)} families ({', '.join(names)})"
    # the list starts after `  <!-- families -->` on its own README line
    lines = textwrap.wrap(text, width=116, initial_indent=" " * 20, subsequent_indent="  ", break_on_hyphens=False)
    return "\n".join(lines).lstrip()


def replace_family_list(text: str) -> str:
    """`text` with its generated family list (between the FAMILIES markers) rewritten; unchanged without them."""
    from lora_convert.text import replace_generated_section

    if FAMILIES[0] not in text:
        return text
    return replace_generated_section(text, *FAMILIES, family_list())


def samples(text: str) -> list[str]:
    return [m.group(2) for m in BLOCK.finditer(text)]


def comparable(sample: str) -> str:
    """A sample with its timings masked (`0.71 s` -> `<t> s`)."""
    return re.sub(r"\b\d+(\.\d+)? s\b", "<t> s", sample)


if __name__ == "__main__":
    for path in sample_files():
        fresh = render(path.read_text(encoding="utf-8"))
        if "--write" in sys.argv:
            path.write_text(fresh, encoding="utf-8")
        else:
            sys.stdout.write("".join(samples(fresh)))
