"""Routing accuracy with a confusion matrix, and confusable tasks merged."""

from __future__ import annotations

import pytest

from cladapt.serve.routers.accuracy import routing_accuracy


def test_accuracy_apart_and_merged() -> None:
    gold = ["amazon", "amazon", "yelp", "yelp", "agnews", "agnews"]
    pred = ["amazon", "yelp", "yelp", "amazon", "agnews", "yelp"]
    acc = routing_accuracy(gold, pred)
    assert acc.accuracy == pytest.approx(100 * 3 / 6)
    assert acc.accuracy_merged == pytest.approx(100 * 5 / 6)  # agnews -> yelp stays wrong
    assert acc.confusion["amazon"] == {"amazon": 1, "yelp": 1} and acc.per_task["agnews"] == 50.0
    assert acc.merged_groups == [["amazon", "yelp"]]


def test_unrouted_rows_count_as_misses() -> None:
    acc = routing_accuracy(["a", "b"], ["a", None])
    assert acc.accuracy == 50.0 and acc.confusion["b"] == {"(none)": 1}
    with pytest.raises(ValueError):
        routing_accuracy(["a"], [])
