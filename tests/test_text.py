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
