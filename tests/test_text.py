"""lora_convert/text.py: the one rendering of integer spans (layers, experts) used by every message and table."""

from __future__ import annotations

from lora_convert.text import spans


def test_spans_compacts_runs():
    assert spans([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert spans([3]) == "3"
    assert spans([]) == "-"


def test_spans_takes_integers_in_any_order_and_repeated():
    # callers fold modules per layer: the same layer comes once per module, in adapter order
    assert spans([8, 1, 0, 2, 7, 1, 5, 2]) == "0-2,5,7-8"
    assert spans(iter([4, 3, 3])) == "3-4"


def test_a_doc_generator_prints_writes_or_refuses(tmp_path, capsys):
    from lora_convert.text import generated_doc_main

    doc = tmp_path / "doc.md"
    doc.write_text("before <!-- a -->old<!-- /a --> after", encoding="utf-8")

    def render(text: str) -> str:
        return text.replace("old", "new")

    assert generated_doc_main([], lambda: "body", render, "gen [--write DOC]") == 0
    assert generated_doc_main(["--markdown"], lambda: "body", render, "gen [--write DOC]") == 0
    assert capsys.readouterr().out == "bodybody"
    assert generated_doc_main(["--write", str(doc)], lambda: "body", render, "gen [--write DOC]") == 0
    assert doc.read_text(encoding="utf-8") == "before <!-- a -->new<!-- /a --> after"
    assert generated_doc_main(["--bogus"], lambda: "body", render, "gen [--write DOC]") == 2
    assert capsys.readouterr().err == "usage: gen [--write DOC]\n"
