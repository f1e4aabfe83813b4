"""Where an adapter comes from: a local folder, or a Hugging Face Hub repo id (`org/name[@revision]`).

Hub adapters are fetched with `huggingface_hub.snapshot_download`, restricted to the adapter's own files, so the
library's cache, `HF_HUB_OFFLINE`, `HF_TOKEN` and `HF_HOME` all behave as users expect.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from lora_convert.errors import AdapterNotFoundError, EnvironmentProblem, UsageError

# The files an adapter folder may hold; nothing else is downloaded.
ADAPTER_FILE_PATTERNS = [
    "adapter_config.json",
    "adapter_model.safetensors",
    "adapter_model-*.safetensors",
    "adapter_model.safetensors.index.json",
    "adapter_model.bin",
    "added_tokens.json",
    "lora_layout.json",
]

# Hub naming rules: letters, digits, `-`, `_`, `.`; no leading/trailing `-`/`.`, no `--` or `..`; <= 96 chars.
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
HUB_ID_RE = re.compile(rf"^(?P<repo>{_NAME}/{_NAME})(?:@(?P<revision>[A-Za-z0-9._/-]{{1,200}}))?$")


@dataclass(frozen=True)
class AdapterSource:
    spec: str  # what the user typed
    path: Path  # local folder holding the adapter files
    origin: str  # "local" or "hub"
    repo_id: str | None = None
    revision: str | None = None
    # Real paths that the adapter's files may point into (an HF cache snapshot links into its blobs folder).
    allowed_roots: tuple[Path, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        if self.origin == "hub":
            return f"{self.repo_id}@{self.revision}" if self.revision else str(self.repo_id)
        return str(self.path)


def parse_hub_id(spec: str) -> tuple[str, str | None] | None:
    match = HUB_ID_RE.match(spec)
    if not match or "--" in match.group("repo") or ".." in match.group("repo"):
        return None
    return match.group("repo"), match.group("revision")


def looks_like_path(spec: str) -> bool:
    """Paths start with `.`, `/` or `~`, or have more than one `/`; a Hub id has exactly one."""
    return spec.startswith((".", "/", "~")) or spec.split("@", 1)[0].count("/") != 1


def resolve_adapter_source(spec: str, *, cache_dir: str | Path | None = None, token: str | None = None) -> AdapterSource:
    """Turn what the user typed into a local folder, downloading from the Hub when it is a repo id."""
    if not spec or "\x00" in spec:
        raise UsageError("The adapter argument is empty.", hint="Pass a folder with adapter_config.json, or a Hub id such as org/name.")
    candidate = Path(spec).expanduser()
    if candidate.exists():
        folder = candidate if candidate.is_dir() else candidate.parent
        real = folder.resolve()
        return AdapterSource(spec=spec, path=folder, origin="local", allowed_roots=(real,))
    if looks_like_path(spec):
        raise AdapterNotFoundError(
            f"No adapter folder at {spec!r}.",
            hint="Check the path; a PEFT adapter folder holds adapter_config.json and adapter_model.safetensors.",
        )
    hub = parse_hub_id(spec)
    if hub is None:
        raise UsageError(
            f"{spec!r} is neither an existing folder nor a valid Hugging Face Hub repo id.",
            hint="Hub ids look like org/name or org/name@revision (letters, digits, '-', '_', '.'; no '--' or '..').",
        )
    repo_id, revision = hub
    return download_adapter(spec, repo_id, revision, cache_dir=cache_dir, token=token)


def download_adapter(spec: str, repo_id: str, revision: str | None, *, cache_dir=None, token=None) -> AdapterSource:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub import errors as hub_errors
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise EnvironmentProblem("huggingface_hub is not installed, so Hub ids cannot be used.", hint="pip install huggingface_hub") from exc
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=ADAPTER_FILE_PATTERNS,
            cache_dir=str(cache_dir) if cache_dir else None,
            token=token or None,
        )
    except hub_errors.RepositoryNotFoundError:
        raise AdapterNotFoundError(
            f"The Hub has no repo {repo_id!r} (or it is private and no token was given).",
            hint="Check the id, or set HF_TOKEN for a private repo.",
        ) from None
    except hub_errors.RevisionNotFoundError:
        raise AdapterNotFoundError(f"The Hub repo {repo_id!r} has no revision {revision!r}.", hint="Check the branch, tag or commit.") from None
    except hub_errors.LocalEntryNotFoundError:
        raise EnvironmentProblem(
            f"{repo_id!r} is not in the local Hugging Face cache and the Hub cannot be reached (offline mode or no network).",
            hint="Download it once with network access, or unset HF_HUB_OFFLINE; HF_HOME / --cache-dir choose the cache.",
        ) from None
    except hub_errors.HfHubHTTPError as exc:
        raise EnvironmentProblem(f"The Hub answered with an error for {repo_id!r}: {exc}.") from None
    except (OSError, ValueError) as exc:
        raise EnvironmentProblem(f"Fetching {repo_id!r} from the Hub failed: {exc}.") from None
    path = Path(folder)
    # A cache snapshot's files link to ../../blobs; allow the repo's cache folder as a root for links.
    repo_cache = path.resolve().parent.parent
    return AdapterSource(
        spec=spec, path=path, origin="hub", repo_id=repo_id, revision=revision,
        allowed_roots=(path.resolve(), repo_cache),
    )
