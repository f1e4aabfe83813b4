"""Every engine rule's citation holds in the release it cites: its `anchor` (the first `path:line` of its source and a
short quote of that line) is found within the cited lines of that release's own file (the proof cache, or
site-packages for the installed release). tests/engine_proof/citations.py holds the check, `fill` and `locate`."""

from __future__ import annotations

import json

import pytest

from engine_proof.citations import _files, anchor_problem, first_citation, locate, raw_rules

pytestmark = [pytest.mark.engine]

RULE_FILES = _files()


@pytest.mark.parametrize("file", RULE_FILES, ids=lambda f: f.name)
def test_every_rule_citation_is_anchored_in_its_release(file):
    problems = {}
    for rule in raw_rules(json.loads(file.read_text())):
        assert first_citation(rule["source"]) is not None, f"{rule['id']} cites no release file:line"
        why = anchor_problem(rule)
        if why:
            problems[rule["id"]] = why
    assert not problems, problems


def test_a_child_release_re_citation_is_where_its_parents_anchor_lies():
    """A child release that re-cites a rule (rules_changed) with the parent's quote finds that quote at its own line:
    the anchor is what re-locates a citation in the next release."""
    from lora_convert.engines.rules import load_rules

    checked = 0
    for file in RULE_FILES:
        data = json.loads(file.read_text())
        if "extends" not in data:
            continue
        parent = {r["id"]: r for r in load_rules(data["extends"])}
        child = f"{data['engine']}=={data['version']}"
        for change in data.get("rules_changed", []):
            mine, theirs = change.get("anchor"), parent[change["id"]].get("anchor")
            if not mine or not theirs or mine["text"] != theirs["text"]:
                continue
            _, path, first, last = first_citation(change["source"])
            if path != theirs["at"].rsplit(":", 1)[0]:
                continue
            found = locate(child, path, mine["text"])
            assert any(first <= line <= last for line in found), (file.name, change["id"], found)
            checked += 1
    assert checked > 20


def test_an_anchor_that_is_not_in_the_cited_lines_is_reported():
    rule = {
        "id": "x",
        "source": "vllm==0.33.0: vllm/lora/utils.py:1 (the first line)",
        "anchor": {"at": "vllm/lora/utils.py:1", "text": "no such text anywhere in this line"},
    }
    assert "does not contain" in anchor_problem(rule)
    assert "first citation is" in anchor_problem({**rule, "anchor": {**rule["anchor"], "at": "vllm/lora/utils.py:2"}})
    assert anchor_problem({k: v for k, v in rule.items() if k != "anchor"}).startswith("no anchor")
