"""SOURCE arguments of `lora-convert scan` -> one `ScanTask` per adapter.

A SOURCE is a folder (searched recursively: a folder holding adapter_config.json is an adapter, and the search
does not descend into it), a text file listing adapter folders or Hub ids (one per line, `#` comments), or a Hub id.
Only names and file sizes are read here; a registry of 100,000 adapters is listed with one stat per tensor file.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath
from stat import S_ISREG

from lora_convert.errors import AdapterNotFoundError, UsageError
from lora_convert.io.source import looks_like_path, parse_hub_id
from lora_convert.peft.adapter import BIN_NAME, SAFETENSORS_NAME
from lora_convert.scan.task import ScanTask

CONFIG_NAME = "adapter_config.json"
TENSOR_SUFFIXES = (".safetensors", ".bin")

__all__ = ["discover"]


def discover(sources: list[str], *, normalize_root: str | None = None) -> list[ScanTask]:
    """The adapters of every SOURCE, each once, in a stable order (the executors reorder by size).

    Ids are relative to their SOURCE folder (prefixed with that folder's name when several folders are given, so
    that they stay distinct); a list file's lines and Hub ids are their own ids. With `normalize_root`, each task's
    output is normalize_root/<id>, and that folder is never searched for adapters (a re-run would find its own
    outputs)."""
    if not sources:
        raise UsageError("scan needs at least one SOURCE.", hint="Pass a folder of adapters, a list file or a Hub id.")
    skip = Path(normalize_root).expanduser().resolve() if normalize_root else None
    folders = [s for s in sources if Path(s).expanduser().is_dir()]
    found: list[tuple[str, str]] = []  # (id, spec)
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            prefix = _folder_name(path) if len(folders) > 1 else ""
            found += [(_join(prefix, rel), spec) for rel, spec in _walk(path, skip)]
        elif path.is_file() and path.name == CONFIG_NAME:
            found.append((_folder_name(path.parent), str(path.parent)))
        elif path.is_file():
            found += _read_list(path)
        elif not looks_like_path(source) and parse_hub_id(source) is not None:
            found.append((source, source))
        else:
            raise AdapterNotFoundError(
                f"SOURCE {source!r} is neither a folder, a list file nor a Hub id.",
                hint="Pass a folder of adapters, a text file of adapter paths or Hub ids, or a Hub id (org/name).",
            )
    tasks: list[ScanTask] = []
    seen_ids: dict[str, str] = {}
    seen_specs: set[str] = set()
    for ident, spec in found:
        key = _spec_key(spec)
        if key in seen_specs:
            continue  # the same adapter named twice (a folder and a list line): scanned once
        if ident in seen_ids:
            raise UsageError(
                f"Two adapters have the id {ident!r} ({seen_ids[ident]} and {spec}); the report and --normalize "
                "need one id per adapter.",
                hint="Scan the folders separately, or give them distinct names.",
            )
        seen_specs.add(key)
        seen_ids[ident] = spec
        output = str(output_path(normalize_root, ident)) if normalize_root else None
        nbytes, legacy_bin = tensor_files(spec)
        tasks.append(ScanTask(id=ident, spec=spec, nbytes=nbytes, output=output, legacy_bin=legacy_bin))
    if not tasks:
        # A gate that found nothing to check has checked nothing: never an OK (a mistyped folder, a registry whose
        # adapters sit behind links, an empty list file).
        raise AdapterNotFoundError(
            f"No adapter was found in {', '.join(repr(s) for s in sources)}: no folder below it holds "
            f"{CONFIG_NAME}, and no list line or Hub id names one.",
            hint="Check the path; links to folders are not followed (pass the linked folder itself, or a list file "
            "of adapter paths).",
        )
    return tasks


def output_path(root: str | os.PathLike, ident: str) -> Path:
    """root/<id>, mirroring the source tree; an id never leads outside root (no absolute part, no `..`)."""
    parts = [p for p in PurePosixPath(ident.replace("\\", "/")).parts if p not in ("/", "", ".")]
    if not parts or ".." in parts:
        raise UsageError(
            f"The adapter id {ident!r} cannot name a folder under the --normalize root.",
            hint="List adapters by paths without `..`.",
        )
    return Path(root).expanduser().joinpath(*parts)


def tensor_files(spec: str) -> tuple[int, bool]:
    """(sizes of the tensor files, whether they are only a legacy adapter_model.bin) of a local adapter, from one
    listing of its folder; (0, False) for a Hub id or an unreadable folder: enough to schedule by."""
    folder = Path(spec).expanduser()
    total = 0
    names = set()
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.endswith(TENSOR_SUFFIXES):
                    st = entry.stat(follow_symlinks=True)
                    if S_ISREG(st.st_mode):
                        total += st.st_size
                        names.add(entry.name)
    except OSError:
        return 0, False
    return total, BIN_NAME in names and SAFETENSORS_NAME not in names


def _walk(root: Path, skip: Path | None) -> list[tuple[str, str]]:
    out = []
    real_root = root.resolve()
    if (root / CONFIG_NAME).exists():
        return [(_folder_name(root), str(root))]
    # Links to folders are not followed: a registry with a link loop must still finish.
    for folder, dirs, files in os.walk(root, followlinks=False):
        here = Path(folder)
        if skip is not None and here.resolve() == skip:
            dirs[:] = []
            continue
        if CONFIG_NAME in files or (here / CONFIG_NAME).exists():
            if here.resolve() != real_root:
                out.append((here.relative_to(root).as_posix(), str(here)))
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # .git, .cache, .ipynb_checkpoints
    return sorted(out)


def _read_list(path: Path) -> list[tuple[str, str]]:
    """Lines of a list file: adapter folders (relative ones to the list's folder, else to the working directory)
    or Hub ids."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"Cannot read the list file {path} ({exc}).") from None
    out = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip() if raw.lstrip().startswith("#") or " #" in raw else raw.strip()
        if not line:
            continue
        beside = path.parent / line
        if not Path(line).is_absolute() and beside.exists():
            out.append((line, str(beside)))
        else:
            out.append((line, line))
    return out


def _spec_key(spec: str) -> str:
    path = Path(spec).expanduser()
    try:
        return str(path.resolve()) if path.exists() else spec
    except OSError:
        return spec


def _folder_name(path: Path) -> str:
    return path.resolve().name or "adapter"


def _join(prefix: str, rel: str) -> str:
    return f"{prefix}/{rel}" if prefix else rel
