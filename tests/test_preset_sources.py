"""Every shipped preset cites sources a reader can follow (issue 11, item 8).

A source is either `github:OWNER/REPO@COMMIT:PATH` (a 40-hex commit, so the cited file cannot drift) or an
`https://` URL of a public page. Internal ids of a code-search index are not followable and must not appear.
The Hub's own config.json is named separately in `hub_config_url`: it is the original the presets mirror,
but it was not read (it is not reachable from the build machines), so it never counts as a source.
"""

from __future__ import annotations

import json
import re
from importlib import resources

import pytest

GITHUB = re.compile(r"^github:[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+@[0-9a-f]{40}:[^\s:@][^\s]*$")
URL = re.compile(r"^https://[A-Za-z0-9.-]+\.[A-Za-z]{2,}(/\S*)?$")
HUB_CONFIG = re.compile(r"^https://huggingface\.co/[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+/blob/main/config\.json$")


def _presets() -> list[tuple[str, dict]]:
    files = sorted(p for p in resources.files("lora_convert.arch.presets").iterdir() if p.name.endswith(".json"))
    return [(p.name, json.loads(p.read_text(encoding="utf-8"))) for p in files]


PRESETS = _presets()


def test_presets_are_shipped():
    assert len(PRESETS) >= 9


@pytest.mark.parametrize("name,preset", PRESETS, ids=[n for n, _ in PRESETS])
def test_every_source_is_followable(name, preset):
    sources = preset.get("sources")
    assert isinstance(sources, list) and sources, f"{name}: no sources"
    for source in sources:
        assert isinstance(source, str)
        assert GITHUB.match(source) or URL.match(source), f"{name}: source not followable: {source!r}"
    assert any(GITHUB.match(s) or URL.match(s) for s in sources)


@pytest.mark.parametrize("name,preset", PRESETS, ids=[n for n, _ in PRESETS])
def test_no_index_ids_anywhere(name, preset):
    # The index ids were a private handle of a search tool; a reader cannot resolve them.
    text = json.dumps({k: v for k, v in preset.items() if k != "config"}).lower()
    for phrase in ("index id", "code-search excerpt", "repo not named"):
        assert phrase not in text, f"{name}: mentions {phrase!r}"


@pytest.mark.parametrize("name,preset", PRESETS, ids=[n for n, _ in PRESETS])
def test_unverified_is_a_list_of_strings(name, preset):
    unverified = preset.get("unverified")
    assert isinstance(unverified, list)
    assert all(isinstance(item, str) and item.strip() for item in unverified)


@pytest.mark.parametrize("name,preset", PRESETS, ids=[n for n, _ in PRESETS])
def test_hub_config_url_is_separate_and_declared_unread(name, preset):
    url = preset.get("hub_config_url")
    assert isinstance(url, str) and HUB_CONFIG.match(url), f"{name}: hub_config_url {url!r}"
    repo = url.removeprefix("https://huggingface.co/").removesuffix("/blob/main/config.json")
    assert repo in preset["hub_ids"], f"{name}: hub_config_url names {repo}, not one of the preset's hub ids"
    assert url not in preset["sources"], f"{name}: the unread Hub file must not be listed as a source"
    assert "not reachable from our build machines" in preset["note"]


def test_the_loader_still_accepts_every_preset():
    # The loader is not strict about keys; this guards that the new field does not break it.
    from lora_convert.arch.base_config import find_preset, list_presets

    names = [p["name"] for p in list_presets()]
    assert sorted(names) == sorted(p["name"] for _, p in PRESETS)
    for name in names:
        assert find_preset(name, hub_ids=False)["hub_config_url"].startswith("https://huggingface.co/")
