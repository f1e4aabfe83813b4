"""Reading the small JSON files of an adapter, a base or an output folder, safely: the one JSON reader.

`Path.read_text` opens whatever the name points at: a FIFO with no writer (or a character device) named
`adapter_config.json` would block the command forever, and a huge file would be read whole into memory. Every
small file is read here instead: it must be a regular file (checked before opening it, and again on the opened
handle, so that a file swapped for a FIFO in between is still refused) of at most `MAX_SMALL_FILE_BYTES`.
The safetensors header parser (tensor_files.py) makes the same regular-file check for the tensor files.

Every JSON document the tool reads from the user's disk (adapter_config.json, a base config.json, shard indexes,
lora_layout.json, added_tokens.json, an output's manifest, the safetensors header) is decoded by `parse_json`, so
that each way a file can be hostile ends in the caller's typed error naming the file, never in an internal error:
bytes that are not UTF-8, text that is not JSON, JSON nested so deeply that the decoder recurses past Python's
limit (100,000 nested lists are valid JSON), the wrong top-level type, and a Git LFS pointer in place of the file
(a clone made without Git LFS holds these small text stubs instead of the real files).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from stat import S_ISBLK, S_ISCHR, S_ISDIR, S_ISFIFO, S_ISREG, S_ISSOCK
from typing import Any

from lora_convert.errors import AdapterFormatError, LoraConvertError

# The largest small file read: a shard index holds ~100 bytes per tensor (~10 MB for 94,000 tensors); configs
# are a few KB.
MAX_SMALL_FILE_BYTES = 64 * 1024 * 1024

# The first line of every Git LFS pointer file (the pointer file specification of the git-lfs project, spec.md).
LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/v1"
# Pointer files are at most 1024 bytes by the same spec; the first bytes of a file are enough to tell.
LFS_POINTER_MAX_BYTES = 1024
LFS_HINT = (
    "The repository was cloned without Git LFS, which leaves these small stubs in place of large files: run "
    "`git lfs install` once, then `git lfs pull` in the repository (or download the model or adapter with "
    "`huggingface-cli download`)."
)

__all__ = [
    "LFS_HINT",
    "LFS_POINTER_MAX_BYTES",
    "MAX_SMALL_FILE_BYTES",
    "lfs_pointer_problem",
    "parse_json",
    "json_type_name",
    "read_small_json",
    "read_small_text",
]


def read_small_json(
    path: Path,
    error: type[LoraConvertError] = AdapterFormatError,
    *,
    hint: str | None = None,
    expect: type | None = dict,
    kind: str = "",
    max_bytes: int = MAX_SMALL_FILE_BYTES,
) -> Any:
    """The JSON document in `path`, a regular file of at most `max_bytes`, of type `expect` (None: any); `kind`
    says what the document is, for the wrong-type message ("a config object").

    Every problem raises `error` (the caller's typed error) with one paragraph naming the file: not a regular
    file, too large, a Git LFS pointer, not UTF-8, empty, not JSON, nested too deeply, or the wrong top-level
    type. `hint` replaces the generic hint of the content problems."""
    data = _read_small_bytes(path, error, hint, max_bytes)
    problem = lfs_pointer_problem(data[:LFS_POINTER_MAX_BYTES], str(path))
    if problem is not None:
        raise error(problem, hint=LFS_HINT)
    doc = parse_json(data, str(path), error, hint=hint)
    if expect is not None and not isinstance(doc, expect):
        raise error(
            f"{path} holds a JSON {json_type_name(doc)} at the top level; expected a JSON {_JSON_TYPES[expect]}"
            + (f" ({kind})." if kind else "."),
            hint=hint or "The file is not what its name says; replace it with the real file.",
        )
    return doc


def parse_json(data: bytes | str, what: str, error: type[LoraConvertError], *, hint: str | None = None) -> Any:
    """Decode one JSON document; `what` names it in messages (a path, or e.g. "x.safetensors: the header").

    Bytes that are not UTF-8, empty text, invalid JSON and JSON nested past the decoder's recursion limit each
    raise `error` (RecursionError is caught here, once for every reader: the json module's C decoder raises it
    cleanly at Python's recursion limit, with nothing left half-done)."""
    hint = hint or "Replace the file with a good copy (download or save it again)."
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(
                f"{what} is not UTF-8 text (byte {exc.start}: {exc.reason}); expected a JSON document.", hint=hint
            ) from None
    else:
        text = data
    if not text.strip():
        raise error(f"{what} is empty; expected a JSON document.", hint=hint)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(
            f"{what} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}.", hint=hint
        ) from None
    except RecursionError:
        raise error(
            f"{what} is JSON nested too deeply to read (arrays or objects inside each other more than about "
            f"{sys.getrecursionlimit()} levels deep); expected a small, flat JSON document.",
            hint=hint,
        ) from None


def lfs_pointer_problem(head: bytes, name: str) -> str | None:
    """The message for a Git LFS pointer file in place of the file `name`, or None when `head` (the file's first
    bytes, at least LFS_POINTER_MAX_BYTES of them where the file is that long) is not one."""
    if not head.startswith(LFS_POINTER_PREFIX):
        return None
    size = re.search(rb"^size (\d+)\s*$", head, re.MULTILINE)
    oid = re.search(rb"^oid sha256:([0-9a-f]{64})\s*$", head, re.MULTILINE)
    stands_for = f"the real file ({int(size.group(1))} bytes" if size else "the real file (size unknown"
    stands_for += f", sha256 {oid.group(1).decode()[:12]}...)" if oid else ")"
    return (
        f"{name} is a Git LFS pointer, not the file: a {len(head)}-byte text stub standing for {stands_for}, "
        "which was never downloaded; run `git lfs pull` in the repository to fetch it."
    )


def read_small_text(
    path: Path,
    error: type[LoraConvertError] = AdapterFormatError,
    *,
    hint: str | None = None,
    max_bytes: int = MAX_SMALL_FILE_BYTES,
) -> str:
    """The UTF-8 text of `path`, a regular file of at most `max_bytes` (the same checks as read_small_json)."""
    data = _read_small_bytes(path, error, hint, max_bytes)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}).", hint=hint) from None


def json_type_name(value: Any) -> str:
    """JSON's name for the type of a decoded value ("missing" for None: a key that is absent reads as None)."""
    if value is None:
        return "null or missing"
    if isinstance(value, bool):
        return "boolean"
    return next((name for kind, name in _JSON_TYPES.items() if isinstance(value, kind)), type(value).__name__)


_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number"}


def _read_small_bytes(path: Path, error: type[LoraConvertError], hint: str | None, max_bytes: int) -> bytes:
    """The bytes of `path`: a FIFO, device, socket or folder, a larger file, or a file that cannot be opened raises
    `error` naming the file."""
    name = str(path)
    try:
        mode = os.stat(path).st_mode
        if not S_ISREG(mode):  # never open a FIFO or device: the open itself may block
            raise _not_regular(name, mode, error, hint)
        # O_NONBLOCK: if the file became a FIFO since the stat, the open returns at once and fstat refuses it.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        with os.fdopen(fd, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            if not S_ISREG(mode):
                raise _not_regular(name, mode, error, hint)
            data = handle.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"{name} could not be read: {exc.strerror or exc}.", hint=hint) from None
    if len(data) > max_bytes:
        raise error(
            f"{name} is larger than {max_bytes} bytes; files this large are refused (this file is expected to be "
            "a small JSON document).",
            hint=hint or "This is not a normal file of its kind; check where it came from.",
        )
    return data


_KINDS = (
    (S_ISFIFO, "a FIFO"),
    (S_ISCHR, "a device"),
    (S_ISBLK, "a device"),
    (S_ISSOCK, "a socket"),
    (S_ISDIR, "a folder"),
)


def _not_regular(name: str, mode: int, error: type[LoraConvertError], hint: str | None) -> LoraConvertError:
    kind = next((what for test, what in _KINDS if test(mode)), "something else")
    return error(
        f"{name} is not a regular file but {kind}, so it is not read (reading it could block forever).",
        hint=hint or "Replace it with the real file, or remove it.",
    )
