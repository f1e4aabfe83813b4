"""Reading the small JSON files of an adapter, a base or an output folder, safely.

`Path.read_text` opens whatever the name points at: a FIFO with no writer (or a character device) named
`adapter_config.json` would block the command forever, and a huge file would be read whole into memory. Every
small text file is read here instead: it must be a regular file (checked before opening it, and again on the
opened handle, so that a file swapped for a FIFO in between is still refused) of at most `MAX_SMALL_FILE_BYTES`.
The safetensors header parser (tensor_files.py) makes the same regular-file check for the tensor files.
"""

from __future__ import annotations

import os
from pathlib import Path
from stat import S_ISBLK, S_ISCHR, S_ISDIR, S_ISFIFO, S_ISREG, S_ISSOCK

from lora_convert.errors import AdapterFormatError, LoraConvertError

# The largest small file read: a shard index holds ~100 bytes per tensor (~10 MB for 94,000 tensors); configs
# are a few KB.
MAX_SMALL_FILE_BYTES = 64 * 1024 * 1024

__all__ = ["MAX_SMALL_FILE_BYTES", "read_small_text"]


def read_small_text(
    path: Path,
    error: type[LoraConvertError] = AdapterFormatError,
    *,
    hint: str | None = None,
    max_bytes: int = MAX_SMALL_FILE_BYTES,
) -> str:
    """The UTF-8 text of `path`, a regular file of at most `max_bytes`.

    A FIFO, device, socket or folder, a larger file, or a file that cannot be opened raises `error` (the typed
    error of the caller) naming the file; text that is not UTF-8 raises UnicodeDecodeError, for the caller to
    report as it reports bad content."""
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
    return data.decode("utf-8")


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
