"""The base model's config: one `--base` option everywhere.

`--base` takes, in this order:
1. a local folder holding config.json, or a config.json file;
2. the name of a preset shipped with lora-convert (`lora-convert schemas list`);
3. a Hugging Face Hub repo id (`org/name` or `org/name@revision`): only config.json is downloaded, with
   `huggingface_hub.hf_hub_download`, so HF_HUB_OFFLINE, HF_TOKEN, HF_HOME and the cache behave as usual.
   If the Hub cannot be reached and a preset lists that repo id, the preset is used and the note says so.

Without `--base`, the adapter's `base_model_name_or_path` is used: a local folder if it exists, then a preset
(matched on its name or any of its hub_ids, case-insensitive), then the Hub.

Errors follow the exit-code table: an explicit `--base` that names nothing (no such path, no such preset, not a
Hub id, no such Hub repo) is a UsageError (2); a Hub that cannot be reached for an uncached config, or a gated
repo without a token, is an EnvironmentProblem (3); a config that exists but cannot be used is a BaseConfigError.
The Hub is asked once (`source.hub_unreachable`), never in a retry loop.

Nothing here imports torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from lora_convert.arch.schema_loader import schema_claiming
from lora_convert.errors import BaseConfigError, EnvironmentProblem, UsageError
from lora_convert.io.shipped_data import ANY, STRING, ListOf, MapOf, Object, load_shipped, shipped_files
from lora_convert.io.small_files import read_small_json

PRESET_PACKAGE = "lora_convert.arch.presets"
# Where multimodal wrappers keep the language model's config (Kimi-K2.5, Qwen3.5-VL: `text_config`).
TEXT_CONFIG_FIELDS = ("text_config", "llm_config", "language_config")


@dataclass
class BaseConfig:
    name: str  # what identifies it: preset name, repo id, or path
    origin: str  # "preset" | "local" | "hub"
    config: dict  # the top-level config.json
    text_config: dict  # the language model's config (the wrapper's text_config, or `config` itself)
    source_note: str | None = None
    # Why a preset stands in for the name that was asked for (a Hub id whose config could not be fetched, or the
    # adapter's base_model_name_or_path matching a preset's hub_ids); None when the preset was named itself.
    # validate reports it as the note `base.preset` (lora_convert/check/base_resolution.py).
    substitution: str | None = None
    # The folder config.json was read from (a local folder or a Hub cache snapshot): where the base's checkpoint
    # shards may lie (lora_convert/check/base_checkpoint.py reads their headers). None for presets.
    folder: Path | None = None

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    @property
    def substitution_note(self) -> str | None:
        """The sentence that tells the reader a preset stands in for the base asked for (validate's `base.preset`,
        normalize's notes), or None when it stands in for nothing."""
        if not self.substitution:
            return None
        return f"The base is the shipped preset {self.name} ({self.substitution})."

    def describe(self) -> str:
        return f"{self.name} ({self.origin})"


def unwrap_text_config(config: dict, field: str | None = None) -> dict:
    """The text model's config: at `field` (a dotted path, see `follow_text_path`), or else where the matching
    schema's `text_config` path or the first known wrapper field leads, when that is a dict."""
    if field:
        return follow_text_path(config, field)[0]
    path = _schema_text_path(config)
    if path and "." in path:
        inner, _ = follow_text_path(config, path)
        if inner is not config:
            return inner
    for name in TEXT_CONFIG_FIELDS:
        inner = config.get(name)
        if isinstance(inner, dict):
            return inner
    return config


def follow_text_path(config: dict, path: str) -> tuple[dict, bool]:
    """(the text model's config, whether the whole path led to it). `path` is a schema's `text_config`, dotted for
    nested wrappers (`thinker_config.text_config`); an inner wrapper's config saved on its own holds only the path's
    tail (`text_config`), which is followed then. (config, False) when no part of the path leads to a dict."""
    parts = path.split(".")
    for start in range(len(parts)):
        inner: object = config
        for name in parts[start:]:
            inner = inner.get(name) if isinstance(inner, dict) else None
        if isinstance(inner, dict):
            return inner, start == 0
    return config, False


def _schema_text_path(config: dict) -> str | None:
    """The `text_config` path of the schema that claims the config's own model_type or architecture, or None."""
    found = schema_claiming(config)
    return found.text_config if found else None


# --------------------------------------------------------------------------------------------- presets
PRESET_SPEC = Object(
    required={
        "name": STRING,
        "hub_ids": ListOf(STRING),
        "note": STRING,
        "sources": ListOf(STRING, non_empty=True),
        "hub_config_url": STRING,
        "unverified": ListOf(STRING),
        "config": MapOf(ANY),
    },
    optional={"implied_defaults": MapOf(ANY)},
)


@lru_cache(maxsize=1)
def _load_presets() -> tuple[dict, ...]:
    files = shipped_files(PRESET_PACKAGE)
    return tuple(
        load_shipped(PRESET_PACKAGE, name, PRESET_SPEC, f"lora_convert/arch/presets/{name}") for name in sorted(files)
    )


def list_presets() -> list[dict]:
    """Every shipped preset: name, hub_ids, model_type (of the top-level config)."""
    return [
        {"name": p["name"], "hub_ids": list(p.get("hub_ids") or []), "model_type": p["config"].get("model_type")}
        for p in _load_presets()
    ]


def find_preset(name: str, *, hub_ids: bool = True) -> dict | None:
    """The preset whose name (or, with `hub_ids`, one of whose hub ids) equals `name`, case-insensitive."""
    wanted = name.strip().lower()
    for preset in _load_presets():
        if preset["name"].lower() == wanted:
            return preset
    if hub_ids:
        bare = wanted.split("@", 1)[0]
        for preset in _load_presets():
            if any(str(h).lower() == bare for h in preset.get("hub_ids") or []):
                return preset
    return None


def preset_base(preset: dict, note: str | None = None) -> BaseConfig:
    config = json.loads(json.dumps(preset["config"]))  # a private copy
    parts = [f"preset {preset['name']}"]
    if note:
        parts.append(note)
    return BaseConfig(
        name=preset["name"],
        origin="preset",
        config=config,
        text_config=unwrap_text_config(config),
        source_note="; ".join(parts),
        substitution=note,
    )


# --------------------------------------------------------------------------------------------- resolve
def resolve_base(spec: str | None, *, adapter_base_name: str | None = None, cache_dir=None, token=None) -> BaseConfig:
    """Resolve `--base` (or, without it, the adapter's base_model_name_or_path) to a config.

    Raises UsageError when there is nothing to go on, BaseConfigError when the config cannot be found or read.
    """
    if spec is not None and not str(spec).strip():
        raise UsageError("--base is empty.", hint=_BASE_HINT)
    if spec:
        return _resolve(str(spec).strip(), explicit=True, cache_dir=cache_dir, token=token)
    if adapter_base_name and str(adapter_base_name).strip():
        return _resolve(str(adapter_base_name).strip(), explicit=False, cache_dir=cache_dir, token=token)
    raise UsageError(
        "No base model: --base was not given and the adapter's adapter_config.json has no base_model_name_or_path.",
        hint=_BASE_HINT,
    )


_BASE_HINT = (
    "Pass --base with a folder holding config.json, a config.json file, a Hub repo id (org/name), or a preset "
    "name from `lora-convert schemas list`."
)


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long for the file system, and the like: no such file either
        return False


def _resolve(spec: str, *, explicit: bool, cache_dir, token) -> BaseConfig:
    path = Path(spec).expanduser()
    if _exists(path):
        return _local(path)
    preset = find_preset(spec, hub_ids=not explicit)
    if preset is not None:
        note = (
            None
            if preset["name"].lower() == spec.lower()
            else f"matched the adapter's base_model_name_or_path {spec!r}"
        )
        return preset_base(preset, note)
    from lora_convert.io.source import looks_like_path, parse_hub_id

    where = "--base" if explicit else "The adapter's base_model_name_or_path"
    # What the user typed names nothing: a usage error. The same name from adapter_config.json is the adapter's.
    unknown = UsageError if explicit else BaseConfigError
    if looks_like_path(spec) and (spec.startswith((".", "/", "~")) or "/" in spec):
        raise unknown(f"{where} {spec!r}: no such folder or config.json.", hint=_BASE_HINT)
    hub = parse_hub_id(spec)
    if hub is None:  # a bare name that is no preset, or a name the Hub does not allow
        raise unknown(
            f"{where} {spec!r} is not an existing folder or config.json, not a preset name, and not a Hub repo id.",
            hint=_BASE_HINT,
        )
    repo_id, revision = hub
    return _hub(spec, repo_id, revision, cache_dir=cache_dir, token=token, explicit=explicit)


def _read_json(path: Path) -> dict:
    # A FIFO, device or oversized file, an LFS pointer, anything but a JSON object: BaseConfigError naming the file.
    return read_small_json(
        path, BaseConfigError, hint="Point --base at the base model's config.json.", kind="the base model's config"
    )


def _local(path: Path) -> BaseConfig:
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        present = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
        raise BaseConfigError(
            f"{path} is a folder without config.json (found {present}).",
            hint="Point --base at the base model's folder or its config.json, or use a preset name or Hub id.",
        )
    config = _read_json(file)
    return BaseConfig(
        name=str(path),
        origin="local",
        config=config,
        text_config=unwrap_text_config(config),
        source_note=f"read from {file}",
        folder=file.parent,
    )


_OFFLINE_BASE_HINT = (
    "Pass --base with a local folder holding config.json (or the config.json itself), or a preset from "
    "`lora-convert schemas list`; or fetch it once with network access (unset HF_HUB_OFFLINE)."
)


def _hub(spec: str, repo_id: str, revision: str | None, *, cache_dir, token, explicit: bool) -> BaseConfig:
    """A base's config.json from the Hub (or its local cache when the Hub is unreachable); a shipped preset listing
    the repo stands in when neither has it. Every failure is a typed error saying what to do."""
    huggingface_hub, hub_errors = _huggingface_hub()
    from lora_convert.io.source import hub_unreachable

    fallback = find_preset(repo_id, hub_ids=True)
    unreachable = hub_unreachable(repo_id, "config.json", revision=revision, token=token)
    fetch_errors = (
        hub_errors.HfHubHTTPError,
        hub_errors.GatedRepoError,
        hub_errors.RepositoryNotFoundError,
        hub_errors.RevisionNotFoundError,
        hub_errors.EntryNotFoundError,
        hub_errors.LocalEntryNotFoundError,
        OSError,
        ValueError,
    )
    try:
        # Looked up at call time so that tests (and users) patching huggingface_hub.hf_hub_download are honoured.
        file = huggingface_hub.hf_hub_download(
            repo_id,
            "config.json",
            revision=revision,
            cache_dir=str(cache_dir) if cache_dir else None,
            token=token or None,
            **({"local_files_only": True} if unreachable else {}),
        )
    except fetch_errors as exc:
        # the preset stands in only when the Hub could not be asked (no cache entry offline, a network failure)
        answered = isinstance(exc, (hub_errors.HfHubHTTPError, hub_errors.EntryNotFoundError))
        offline = isinstance(exc, hub_errors.LocalEntryNotFoundError) or not answered
        if offline and fallback is not None:
            return preset_base(
                fallback, f"the Hub was unreachable for {repo_id!r}, so the shipped preset listing it was used"
            )
        kind, problem, hint = _hub_failure(exc, hub_errors, repo_id, revision, explicit, unreachable)
        if not explicit:
            problem = f"The adapter's base model {spec!r} matches no preset. " + problem
        raise kind(problem, hint=hint) from None
    config = _read_json(Path(file))
    return BaseConfig(
        name=f"{repo_id}@{revision}" if revision else repo_id,
        origin="hub",
        config=config,
        text_config=unwrap_text_config(config),
        source_note=f"config.json from the Hub ({file})",
        folder=Path(file).parent,
    )


def _huggingface_hub():
    try:
        import huggingface_hub
        from huggingface_hub import errors as hub_errors
    except ImportError:  # pragma: no cover - a declared dependency
        raise EnvironmentProblem(
            "huggingface_hub is not installed, so Hub ids cannot be used for --base.",
            hint="pip install huggingface_hub, or use a local config.json or a preset.",
        ) from None
    return huggingface_hub, hub_errors


def _hub_failure(exc, hub_errors, repo_id: str, revision, explicit: bool, unreachable) -> tuple[type, str, str]:
    """(error class, problem, hint) for a failed config.json fetch; checked most specific first, as the Hub's error
    classes derive from each other (a gated repo is a missing one; a missing cache entry is a missing file)."""
    from lora_convert.io.source import offline_reason

    not_found = UsageError if explicit else BaseConfigError
    if isinstance(exc, hub_errors.GatedRepoError):
        return (
            EnvironmentProblem,
            f"The Hub repo {repo_id!r} is gated; its config.json needs an accepted licence and a token.",
            "Accept the licence on the Hub and set HF_TOKEN, or pass a preset / local config.json with --base.",
        )
    if isinstance(exc, hub_errors.RepositoryNotFoundError):
        return (
            not_found,
            f"The Hub has no repo {repo_id!r} (or it is private and no token was given).",
            "Check the id, set HF_TOKEN for a private repo, or pass --base with a local config.json or a preset.",
        )
    if isinstance(exc, hub_errors.RevisionNotFoundError):
        return (
            not_found,
            f"The Hub repo {repo_id!r} has no revision {revision!r}.",
            "Check the branch, tag or commit after `@`.",
        )
    if isinstance(exc, hub_errors.LocalEntryNotFoundError):
        problem = (
            f"config.json of {repo_id!r} is not in the local Hugging Face cache and the Hub cannot be reached "
            f"({offline_reason(unreachable)})."
        )
        return EnvironmentProblem, problem, _OFFLINE_BASE_HINT
    if isinstance(exc, hub_errors.EntryNotFoundError):
        return (
            BaseConfigError,
            f"The Hub repo {repo_id!r} has no config.json (it may be an adapter or a dataset, not a base model).",
            "Pass --base with the base model's repo id, a local config.json, or a preset.",
        )
    if isinstance(exc, hub_errors.HfHubHTTPError):
        return (
            EnvironmentProblem,
            f"The Hub answered with an error for {repo_id!r}: {exc}.",
            "Retry later, or pass --base with a local config.json or a preset.",
        )
    return EnvironmentProblem, f"Fetching config.json of {repo_id!r} from the Hub failed: {exc}.", _OFFLINE_BASE_HINT


def config_from_mapping(config: dict, name: str = "<config>") -> BaseConfig:
    """Wrap an in-memory config (tests, library callers)."""
    return BaseConfig(name=name, origin="local", config=config, text_config=unwrap_text_config(config))
