"""CL metrics against hand-computed values (methods.md §11)."""

from __future__ import annotations

import pytest

from cladapt.evaluation import metrics as M

R = [
    [80.0, 10.0, 5.0],
    [60.0, 70.0, 20.0],
    [50.0, 65.0, 90.0],
]
B = [10.0, 5.0, 15.0]


def test_end_of_task_aggregates_match_hand_computation() -> None:
    assert M.average_accuracy(R) == pytest.approx((50 + 65 + 90) / 3)
    assert M.learning_accuracy(R) == pytest.approx((80 + 70 + 90) / 3)
    assert M.backward_transfer(R) == pytest.approx(((50 - 80) + (65 - 70)) / 2)  # -17.5
    assert M.forward_transfer(R, B) == pytest.approx(((10 - 5) + (20 - 15)) / 2)  # 5
    # FM: task 0: max(80-50, 60-50) = 30; task 1: 70-65 = 5
    assert M.forgetting_measure(R) == pytest.approx((30 + 5) / 2)
    assert M.mean_average_accuracy(R) == pytest.approx((80 + (60 + 70) / 2 + (50 + 65 + 90) / 3) / 3)


def test_summary_rounds_and_names_every_metric() -> None:
    s = M.summary(R, B)
    assert s == {"AA": 68.3333, "LA": 80.0, "BWT": -17.5, "FWT": 5.0, "FM": 17.5, "MAA": 71.1111}


def test_missing_entries_are_skipped_not_zeroed() -> None:
    partial = [[80.0, None], [None, 70.0]]
    assert M.average_accuracy(partial) == 70.0
    assert M.backward_transfer(partial) is None
    assert M.forward_transfer(partial, [None, 5.0]) is None
    assert M.summary([], None)["AA"] is None


def test_single_task_has_no_transfer() -> None:
    one = [[42.0]]
    assert M.average_accuracy(one) == 42.0
    assert M.backward_transfer(one) is None
    assert M.forgetting_measure(one) is None


def test_oracle_routing_has_aa_equal_la() -> None:
    # per-task LoRA + oracle: R[T][i] = R[i][i] by construction (methods.md §11.2)
    oracle = [[70.0, 0.0], [70.0, 55.0]]
    assert M.average_accuracy(oracle) == M.learning_accuracy(oracle)
    assert M.backward_transfer(oracle) == 0.0


POINTS = [
    {"task": "A", "scores": {"A": 10.0}},
    {"task": "A", "scores": {"A": 50.0}},
    {"task": "A", "scores": {"A": 80.0}, "end": True},
    {"task": "B", "scores": {"A": 60.0, "B": 20.0}},
    {"task": "B", "scores": {"A": 40.0, "B": 50.0}},
    {"task": "B", "scores": {"A": 70.0, "B": 60.0}},
    {"task": "B", "scores": {"A": 75.0, "B": 70.0}, "end": True},
]


def test_continual_metrics_match_hand_computation() -> None:
    out = M.continual_summary(POINTS, ["A", "B"], w=10)
    assert out["min_acc"]["B"] == 40.0  # lowest A since A finished: [80, 60, 40, 70, 75]
    # WC-ACC during B (k = 2): a_B/2 + min-ACC/2; during A (k = 1): a_A
    assert out["wc_acc"] == [10.0, 50.0, 30.0, 45.0, 50.0]
    assert out["stability_gap"] == {"A during B": 40.0}  # 80 at the end of A, 40 at worst during B
    assert out["WF"] == pytest.approx((40.0 + 0.0) / 2)
    assert out["WP"] == pytest.approx((70.0 + 50.0) / 2)  # A: 10 -> 80; B: 20 -> 70


def test_windowed_metrics_respect_the_window() -> None:
    curve = [10.0, 50.0, 80.0, 60.0, 40.0, 70.0, 75.0]
    assert M.windowed_forgetting(curve, w=2) == 20.0
    assert M.windowed_forgetting(curve, w=3) == 40.0
    assert M.windowed_plasticity(curve, w=2) == 40.0
    assert M.stability_gap(80.0, [60.0, 40.0]) == 40.0
    assert M.wc_acc(30.0, None, 1) == 30.0
    assert M.min_acc([[3.0, 1.0], [5.0]]) == 3.0


def test_gslora_h_reproduces_the_readme_number() -> None:
    # GS-LoRA README (methods.md §13): Acc_f 74.65 -> 0.00 with Acc_r 74.16 gives H 74.40
    assert M.gslora_h(74.65, 0.0, 74.16) == pytest.approx(74.40, abs=0.01)
    assert M.gslora_h(0.0, 0.0, 0.0) == 0.0
