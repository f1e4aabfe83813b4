"""Every way fetching a base's config.json from the Hub can fail is a typed error that says what to do, and a shipped
preset listing the repo stands in only when the Hub could not be asked (lora_convert/arch/base_config.py `_hub`).

huggingface_hub's real error classes are raised by a patched `hf_hub_download`; the reachability probe is patched
to say the Hub answered, so nothing leaves the machine."""

from __future__ import annotations

import httpx2
import huggingface_hub
import pytest
from huggingface_hub import errors as hub_errors

from lora_convert.arch.base_config import resolve_base
from lora_convert.errors import BaseConfigError, EnvironmentProblem, UsageError

REPO = "someone/unknown-model"
PRESET_REPO = (
    "deepseek-ai/DeepSeek-V3"  # --base naming a repo a shipped preset lists (presets/deepseek-v3.json hub_ids)
)


def _response(status: int) -> httpx2.Response:
    return httpx2.Response(status, request=httpx2.Request("GET", f"https://huggingface.co/{REPO}/config.json"))


def _raising(exc: Exception):
    def download(*args, **kwargs):
        raise exc

    return download


@pytest.fixture(autouse=True)
def hub_answers(monkeypatch):
    monkeypatch.setattr("lora_convert.io.source.hub_unreachable", lambda *a, **k: None)


FAILURES = [
    # (error raised by the download, class when --base names the repo, class when the adapter does, message part)
    (
        lambda: hub_errors.GatedRepoError("gated", response=_response(403)),
        EnvironmentProblem,
        EnvironmentProblem,
        "is gated",
    ),
    (
        lambda: hub_errors.RepositoryNotFoundError("missing", response=_response(404)),
        UsageError,
        BaseConfigError,
        "has no repo",
    ),
    (
        lambda: hub_errors.RevisionNotFoundError("no rev", response=_response(404)),
        UsageError,
        BaseConfigError,
        "has no revision",
    ),
    (lambda: hub_errors.EntryNotFoundError("no file"), BaseConfigError, BaseConfigError, "has no config.json"),
    (
        lambda: hub_errors.HfHubHTTPError("boom", response=_response(500)),
        EnvironmentProblem,
        EnvironmentProblem,
        "answered with an error",
    ),
    (
        lambda: hub_errors.LocalEntryNotFoundError("not cached"),
        EnvironmentProblem,
        EnvironmentProblem,
        "not in the local Hugging Face cache",
    ),
    (lambda: OSError("connection reset"), EnvironmentProblem, EnvironmentProblem, "from the Hub failed"),
]


@pytest.mark.parametrize(("make", "explicit_kind", "implicit_kind", "says"), FAILURES)
def test_each_hub_failure_is_a_typed_error_with_a_hint(monkeypatch, make, explicit_kind, implicit_kind, says):
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _raising(make()))
    with pytest.raises(explicit_kind) as explicit:
        resolve_base(REPO)
    assert type(explicit.value) is explicit_kind and says in explicit.value.message and explicit.value.hint
    with pytest.raises(implicit_kind) as implicit:
        resolve_base(None, adapter_base_name=REPO)
    assert type(implicit.value) is implicit_kind
    assert implicit.value.message.startswith(f"The adapter's base model {REPO!r} matches no preset. ")


@pytest.mark.parametrize(
    ("make", "preset_stands_in"),
    [
        (lambda: hub_errors.LocalEntryNotFoundError("not cached"), True),
        (lambda: OSError("connection reset"), True),
        (lambda: ValueError("bad url"), True),
        (lambda: hub_errors.EntryNotFoundError("no file"), False),
        (lambda: hub_errors.RepositoryNotFoundError("missing", response=_response(404)), False),
        (lambda: hub_errors.HfHubHTTPError("boom", response=_response(500)), False),
    ],
)
def test_a_preset_stands_in_only_when_the_hub_could_not_be_asked(monkeypatch, make, preset_stands_in):
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _raising(make()))
    if preset_stands_in:
        base = resolve_base(PRESET_REPO)
        assert base.origin == "preset" and "unreachable" in base.substitution_note
    else:
        with pytest.raises((BaseConfigError, EnvironmentProblem, UsageError)):
            resolve_base(PRESET_REPO)
