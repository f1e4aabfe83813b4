"""Where an adapter comes from: a local folder, or a Hugging Face Hub repo id (`org/name[@revision]`).

Hub adapters are fetched with `huggingface_hub.snapshot_download`, restricted to the adapter's own files, so the
library's cache, `HF_HUB_OFFLINE`, `HF_TOKEN` and `HF_HOME` all behave as users expect.

Without a network, huggingface_hub retries a file it has not cached (one HEAD, then six more with a 1-8 s backoff
and a 60 s timeout each: ~23 s per file with a failing DNS, minutes with a black-holed route). `hub_unreachable`
asks once instead; when nothing answers, the download is made with `local_files_only=True` (the cache, or
LocalEntryNotFoundError at once), which callers turn into an EnvironmentProblem (exit 3).
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


def resolve_adapter_source(
    spec: str, *, cache_dir: str | Path | None = None, token: str | None = None
) -> AdapterSource:
    """Turn what the user typed into a local folder, downloading from the Hub when it is a repo id."""
    if not spec or "\x00" in spec:
        raise UsageError(
            "The adapter argument is empty.",
            hint="Pass a folder with adapter_config.json, or a Hub id such as org/name.",
        )
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


# HTTP statuses that mean "the Hub is there but not serving now": huggingface_hub would retry them.
_TRANSIENT_STATUSES = frozenset({408, 429})


def hub_unreachable(
    repo_id: str, filename: str, *, revision: str | None = None, token: str | None = None
) -> str | None:
    """Why the Hub cannot serve `filename` of `repo_id` right now, or None when it answers (even with a 404).

    One HEAD request without retries (huggingface_hub's own `get_hf_file_metadata`, which honours HF_ENDPOINT,
    proxies and HF_HUB_ETAG_TIMEOUT). A definite answer such as 404 or 401 counts as reachable: the real download
    then raises the precise error. Under HF_HUB_OFFLINE nothing is sent (the library only reads its cache then).
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    if constants.is_offline_mode():
        return None
    url = hf_hub_url(repo_id, filename, revision=revision)
    try:
        get_hf_file_metadata(url, token=token or None, retry_on_errors=False)
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status is None or status >= 500 or status in _TRANSIENT_STATUSES:
            return f"{constants.ENDPOINT} answered HTTP {status}"
        return None
    except Exception as exc:  # noqa: BLE001 - no answer at all (DNS, refused, reset, timeout) is exactly what is asked
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return f"no connection to {constants.ENDPOINT} ({detail})"
    return None


def offline_reason(unreachable: str | None) -> str:
    """The words for why only the cache could be used."""
    return unreachable or "HF_HUB_OFFLINE is set"


OFFLINE_HINT = (
    "Pass a local folder instead (or, for --base, a preset from `lora-convert schemas list`), or fetch it once with "
    "network access (unset HF_HUB_OFFLINE); HF_HOME / --cache-dir choose the cache."
)


def download_adapter(spec: str, repo_id: str, revision: str | None, *, cache_dir=None, token=None) -> AdapterSource:
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import snapshot_download

    unreachable = hub_unreachable(repo_id, "adapter_config.json", revision=revision, token=token)
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=ADAPTER_FILE_PATTERNS,
            cache_dir=str(cache_dir) if cache_dir else None,
            token=token or None,
            local_files_only=unreachable is not None,
        )
    except hub_errors.RepositoryNotFoundError:
        raise AdapterNotFoundError(
            f"The Hub has no repo {repo_id!r} (or it is private and no token was given).",
            hint="Check the id, or set HF_TOKEN for a private repo.",
        ) from None
    except hub_errors.RevisionNotFoundError:
        raise AdapterNotFoundError(
            f"The Hub repo {repo_id!r} has no revision {revision!r}.", hint="Check the branch, tag or commit."
        ) from None
    except hub_errors.LocalEntryNotFoundError:
        raise EnvironmentProblem(
            f"The adapter {repo_id!r} is not in the local Hugging Face cache and the Hub cannot be reached "
            f"({offline_reason(unreachable)}).",
            hint=OFFLINE_HINT,
        ) from None
    except hub_errors.HfHubHTTPError as exc:
        raise EnvironmentProblem(f"The Hub answered with an error for {repo_id!r}: {exc}.") from None
    except (OSError, ValueError) as exc:
        raise EnvironmentProblem(f"Fetching {repo_id!r} from the Hub failed: {exc}.", hint=OFFLINE_HINT) from None
    except Exception as exc:  # noqa: BLE001 - the transport's own errors (a connection dropped mid-way) are not OSErrors
        raise EnvironmentProblem(
            f"Fetching {repo_id!r} from the Hub failed ({type(exc).__name__}: {exc}).", hint=OFFLINE_HINT
        ) from None
    path = Path(folder)
    # A cache snapshot's files link to ../../blobs; allow the repo's cache folder as a root for links.
    repo_cache = path.resolve().parent.parent
    return AdapterSource(
        spec=spec,
        path=path,
        origin="hub",
        repo_id=repo_id,
        revision=revision,
        allowed_roots=(path.resolve(), repo_cache),
    )
