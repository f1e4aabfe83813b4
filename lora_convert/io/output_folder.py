"""The output folder, written safely: it never touches anything but lora-convert's own previous output.

The output may never be, contain or lie inside a protected input (the caller names them: the input adapter, a
local base) or the working directory. --force replaces only an empty folder or a previous lora-convert output,
recognised by its manifest (every file of the folder listed), never a folder of someone's files. Everything is
written into a temporary folder beside the target and swapped into place once complete: an interrupted run
leaves no new output and any previous output as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from lora_convert.errors import UsageError
from lora_convert.io.safetensors_writer import StreamingSafetensorsWriter, TensorSpec
from lora_convert.io.small_files import read_small_json

ADAPTER_FILE = "adapter_model.safetensors"
# Every output layout writes this file, listing the files of the output: it is how --force recognises a folder
# as a previous lora-convert output (and so as safe to replace) rather than a folder of someone's files.
MANIFEST_FILE = "lora_convert_manifest.json"
MANIFEST_FORMAT = "lora-convert/output"


class WriteProgress(Protocol):
    """What a writer is told: `start` once with the bytes it will write (known before any tensor is read), then
    `advance` with the bytes written so far for each step. The advances sum to the total. The library never
    renders anything; the CLI draws a bar from these calls."""

    def start(self, total_bytes: int) -> None: ...

    def advance(self, nbytes: int) -> None: ...


def _relation(target: Path, protected: Path) -> str | None:
    """How the resolved output folder relates to a resolved protected path, or None when they are apart."""
    if target == protected:
        return "is"
    if protected in target.parents:
        return "is inside"
    if target in protected.parents:
        return "contains"
    return None


def protected_inputs(adapter_path: Path | None, base: str | None) -> list[tuple[str, Path]]:
    """The local paths an output folder must stay clear of: the adapter folder and a local base (folder or file)."""
    out: list[tuple[str, Path]] = []
    if adapter_path is not None:
        out.append(("input adapter folder", adapter_path))
    if base:
        path = Path(str(base).strip()).expanduser()
        if path.exists():  # otherwise a preset or Hub id: nothing on disk of the user's to protect
            out.append(("base model folder" if path.is_dir() else "base model config", path))
    return out


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of a previous lora-convert output in `folder`, or None when there is none (or it is not ours)."""
    return _manifest_and_problem(folder)[0]


def written_layout(folder: Path) -> str | None:
    """The layout a previous lora-convert output in `folder` was written in (`vllm==0.33.0`, ...), or None."""
    manifest = read_manifest(folder)
    layout = manifest.get("layout") if manifest else None
    return layout if isinstance(layout, str) else None


def _manifest_and_problem(folder: Path) -> tuple[dict[str, Any] | None, str]:
    """(the manifest, "") or (None, why it is not one)."""
    try:  # a FIFO or device of that name, or anything but a JSON object in it, is refused unread (UsageError)
        doc = read_small_json(folder / MANIFEST_FILE, UsageError)
    except UsageError as exc:
        return None, exc.message
    if doc.get("format") != MANIFEST_FORMAT or not isinstance(doc.get("files"), list):
        return None, f"its `format` is not {MANIFEST_FORMAT!r} or it has no `files` list"
    return doc, ""


def _owned_entries(manifest: dict[str, Any]) -> set[str]:
    listed = {f for f in manifest["files"] if isinstance(f, str) and "/" not in f and f not in (".", "..")}
    return listed | {MANIFEST_FILE}


def check_output_dir(output: str | Path, *, force: bool, protected: list[tuple[str, Path]]) -> Path:
    """Refuse an output folder that could destroy anything but our own previous output; return its resolved path.

    Resolving first (symlinks, `.`, `..`) is what makes `-o .`, `-o ..` and `-o link-to-input` comparable with the
    input. --force replaces only an empty folder or a folder whose every entry its manifest lists."""
    shown = str(output)
    target = Path(output).expanduser().resolve()
    for what, path in protected:
        real = path.resolve()
        relation = _relation(target, real)
        if relation:
            raise UsageError(
                f"The output folder {shown} ({target}) {relation} the {what} {path} ({real}); normalize never writes "
                "over or inside its inputs, and --force does not change that.",
                hint="Choose an output folder outside the adapter and the base, e.g. -o ./my-adapter-stacked.",
            )
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        # The new output is swapped in by renaming folders; renaming the folder a shell sits in would leave that
        # shell in a deleted folder, so the working directory is never an output.
        raise UsageError(
            f"The output folder {shown} ({target}) is{' ' if target == cwd else ' above '}the current working directory; "
            "normalize writes a new folder and swaps it into place, which it will not do to the folder it runs in.",
            hint=f"Run from another folder (e.g. `cd {target.parent}`) and pass -o {target.name}, or choose a new folder name.",
        )
    if not target.exists():
        return target
    if not target.is_dir():
        raise UsageError(f"The output {shown} exists and is not a folder.", hint="Choose another -o path.")
    entries = sorted(p.name for p in target.iterdir())
    if not entries:
        return target
    if not force:
        raise UsageError(
            f"The output folder {shown} exists and is not empty.",
            hint="Pass --force to replace a previous lora-convert output, or choose another -o path.",
        )
    manifest, problem = _manifest_and_problem(target)
    if manifest is None:
        raise UsageError(
            f"--force replaces only an empty folder or a previous lora-convert output, and {shown} is neither: it holds "
            + _listing(entries)
            + (
                f", and its {MANIFEST_FILE} is not a lora-convert manifest (a regular JSON file listing the output's "
                f"files): {problem.rstrip('.')}."
                if MANIFEST_FILE in entries
                else f" and no {MANIFEST_FILE}."
            ),
            hint="Choose another -o path, or move those files away yourself.",
        )
    owned = _owned_entries(manifest)
    unexpected = [e for e in entries if e not in owned or not (target / e).is_file() or (target / e).is_symlink()]
    if unexpected:
        raise UsageError(
            f"{shown} is a previous lora-convert output but also holds {_listing(unexpected)}, which its {MANIFEST_FILE} "
            "does not list; --force removes only files lora-convert wrote.",
            hint="Move those entries elsewhere, or choose another -o path.",
        )
    return target


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _remove_previous_output(old: Path) -> None:
    """Delete a renamed-away previous output: only the files its manifest lists, then the (then empty) folder.
    Anything that appeared since the check keeps the folder, so no stranger's file is ever deleted."""
    manifest = read_manifest(old)
    for name in sorted(_owned_entries(manifest)) if manifest else ():
        path = old / name
        if path.is_symlink() or path.is_file():  # never a folder: the check refused those as not ours
            path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # something appeared since: the folder stays, with it
        old.rmdir()


def _manifest_text(layout: str, names: list[str]) -> str:
    doc = {"format": MANIFEST_FORMAT, "version": 1, "layout": layout, "files": sorted(names)}
    return json.dumps(doc, indent=2) + "\n"


def _new_sibling(parent: Path, prefix: str) -> Path:
    """A new folder `prefix-XXXXXXXX` in `parent`. mkdir fails on an existing name, so nothing is ever reused or
    removed; unlike tempfile.mkdtemp (0700) it keeps the user's umask, and so the output's usual permissions."""
    while True:
        path = parent / f"{prefix}-{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


@contextmanager
def _terminate_as_interrupt():
    """Turn SIGTERM into KeyboardInterrupt so `finally` blocks remove the temporary folder."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def write_folder(
    output: str | Path,
    specs: list[TensorSpec],
    tensors: Iterator[tuple[str, Any]],
    files: dict[str, str],
    *,
    protected: list[tuple[str, Path]],
    force: bool = False,
    layout: str = "stacked",
    progress: WriteProgress | None = None,
    tensor_file: str = ADAPTER_FILE,
    open_writer: Any = None,
) -> int:
    """Write `tensors` (in `specs` order) as `tensor_file` (ADAPTER_FILE, or mlx-lm's adapters.safetensors),
    `files` and the manifest into a temporary folder beside the output, then swap it into place; return the number
    of tensors written. A previous output is renamed away only once the new one is complete and deleted only after
    the swap, so an interrupted run leaves it as it was. `progress.start` gets the total bytes of `specs`; advancing
    is the tensor producer's job."""
    target = check_output_dir(output, force=force, protected=protected)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    files = {**files, MANIFEST_FILE: _manifest_text(layout, [tensor_file, *files])}
    if progress is not None:
        progress.start(sum(s.nbytes for s in specs))
    # Names come from the resolved path: `-o .` or `-o sub/..` have no usable name of their own.
    temp = _new_sibling(parent, f".{target.name}.lora-convert-tmp-{os.getpid()}")
    old: Path | None = None
    written = 0
    try:
        with _terminate_as_interrupt():
            # open_writer(path, specs): another streaming writer with the same write/close/abort (the GGUF layout's)
            if open_writer is not None:
                writer = open_writer(temp / tensor_file, specs)
            else:
                writer = StreamingSafetensorsWriter(temp / tensor_file, specs, metadata={"format": "pt"})
            try:
                for name, tensor in tensors:
                    writer.write(name, tensor)
                    written += 1
                writer.close()
            except BaseException:
                writer.abort()
                # Stop the producer now (a pipelined one has threads reading and building ahead), not whenever the
                # traceback that holds it is collected.
                close = getattr(tensors, "close", None)
                if close is not None:
                    close()
                raise
            for name, text in files.items():
                (temp / name).write_text(text)
            # The write took a while: check again that what is about to be replaced is still only ours.
            check_output_dir(target, force=force, protected=protected)
            if target.exists():
                old = parent / f".{target.name}.lora-convert-old-{os.getpid()}-{secrets.token_hex(4)}"
                target.rename(old)
            temp.rename(target)
        if old is not None:
            _remove_previous_output(old)
            old = None
    finally:
        if old is not None and old.exists() and not target.exists():
            old.rename(target)  # interrupted between the two renames: put the previous output back
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)
    return written
