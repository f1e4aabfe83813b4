"""One report file (a fleet page, a SARIF log), written safely: it replaces only lora-convert's own previous file of
that kind, and never half-written.

The path is checked before any work starts (a scan of a thousand adapters must not end in "cannot write"): a folder,
a link, a file lora-convert did not write (`is_ours` says), one of the paths the caller protects (the scan's own
report) or a path in a folder that does not exist is refused with a UsageError naming the option. The bytes go to a
temporary file beside the target, renamed over it only when complete, so a reader never sees half a file and a
failed write leaves the previous one as it was.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from lora_convert.errors import UsageError

__all__ = ["check_report_path", "write_report_file"]


def check_report_path(
    path: str | os.PathLike,
    *,
    option: str,
    kind: str,
    is_ours: Callable[[Path], bool],
    protected: tuple[str | os.PathLike, ...] = (),
) -> Path:
    """The path `option` may write: refuses a folder, a link, a non-empty file for which `is_ours` is false (`kind`
    names what it would have to be), one of `protected`, or a path whose folder does not exist."""
    out = Path(path)
    if out.is_symlink() or (out.exists() and not out.is_file()):
        raise UsageError(f"{option} {out} exists and is not a regular file.", hint=f"Pass another {option} path.")
    for other in protected:
        if out.exists() and Path(other).exists() and os.path.samefile(out, other):
            raise UsageError(f"{option} {out} is the report itself.", hint=f"Pass another {option} path.")
    if out.exists() and out.stat().st_size and not is_ours(out):
        raise UsageError(
            f"{option} {out} exists and is not a {kind} written by lora-convert; it is left as it is.",
            hint=f"Pass another {option} path, or remove that file first.",
        )
    if not out.parent.is_dir():
        raise UsageError(f"Cannot write {out}: the folder {out.parent} does not exist.", hint="Create it first.")
    return out


def write_report_file(data: bytes, out: Path, *, option: str) -> Path:
    """Write `data` to `out` (already checked by check_report_path) through a temporary file renamed over it."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as exc:
        raise UsageError(
            f"Cannot write {out} ({exc.strerror}).", hint=f"Pass a {option} path in a writable folder."
        ) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise UsageError(f"Cannot write {out} ({exc.strerror}).", hint=f"Pass another {option} path.") from None
        raise
    return out
