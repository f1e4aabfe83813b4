"""lora_convert/text.py: the one rendering of integer spans (layers, experts) used by every message and table."""

from __future__ import annotations

from lora_convert.text import refused_listing, spans


def test_spans_compacts_runs():
    assert spans([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert spans([3]) == "3"
    assert spans([]) == "-"


def test_spans_takes_integers_in_any_order_and_repeated():
    # callers fold modules per layer: the same layer comes once per module, in adapter order
    assert spans([8, 1, 0, 2, 7, 1, 5, 2]) == "0-2,5,7-8"
    assert spans(iter([4, 3, 3])) == "3-4"


def test_refused_listing_folds_layers_that_share_a_reason():
    refused = [
        ("model.layers.0.self_attn.q_b_proj", "never applied"),
        ("model.layers.2.self_attn.q_b_proj", "never applied"),
        ("model.layers.1.self_attn.q_b_proj", "never applied"),
        ("model.layers.1.self_attn.o_proj", "never applied"),
        ("lm_head", "full weight"),
        ("model.layers.3.self_attn.q_b_proj", "another reason"),
    ]
    assert refused_listing(refused) == (
        "model.layers.N.self_attn.q_b_proj on layers 0-2 (never applied); "
        "model.layers.1.self_attn.o_proj (never applied); lm_head (full weight); "
        "model.layers.3.self_attn.q_b_proj (another reason)"
    )


def test_refused_listing_counts_what_it_leaves_out():
    refused = [(f"embed_{i}", "why") for i in range(9)]
    assert refused_listing(refused, limit=2) == "embed_0 (why); embed_1 (why); and 7 more"
    # only the first number is the layer: an expert index stays in the path
    assert refused_listing([("model.layers.4.mlp.experts.7.w1", "x"), ("model.layers.5.mlp.experts.7.w1", "x")]) == (
        "model.layers.N.mlp.experts.7.w1 on layers 4-5 (x)"
    )


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
