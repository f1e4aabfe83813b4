"""README's family list and count are the shipped schemas (issue 25): `make readme` writes them
(tests/readme_samples.py family_list) and this test fails when a schema is added or removed without it."""

from __future__ import annotations

import readme_samples


def test_readme_family_list_is_generated_from_the_schemas():
    from lora_convert.arch.schema import list_schemas

    text = readme_samples.README.read_text(encoding="utf-8")
    assert readme_samples.replace_family_list(text) == text, "README's family list is stale: run `make readme`"
    listed = text.split(readme_samples.FAMILIES[0])[1].split(readme_samples.FAMILIES[1])[0]
    for family in list_schemas():
        assert f"`{family}`" in listed, family
