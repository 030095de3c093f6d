"""Metrics against values worked out by hand (the scipy / scikit-learn formulas, computed in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from spafit_core.errors import ConfigError
from spafit_core.metrics import (
    HIGHER_IS_BETTER,
    METRICS,
    accuracy,
    compute_metrics,
    default_metrics,
    f1,
    is_better,
    macro_f1,
    main_metric,
    matthews_corrcoef,
    micro_f1,
    pearson,
    rankdata,
    spearman,
    subset_accuracy,
)

# One binary example used throughout: TP=2 (idx 0, 4), FP=1 (idx 2), FN=1 (idx 1), TN=2 (idx 3, 5).
Y = [1, 1, 0, 0, 1, 0]
P = [1, 0, 1, 0, 1, 0]


def test_accuracy_counts_exact_matches():
    assert accuracy(P, Y) == pytest.approx(4 / 6)
    assert accuracy([2, 1, 0], [2, 1, 0]) == 1.0


def test_f1_binary_positive_class_is_index_1():
    # precision = 2/3, recall = 2/3 -> F1 = 2/3
    assert f1(P, Y) == pytest.approx(2 / 3)
    # P=[1,1,1,0], Y=[1,0,0,0]: TP=1 FP=2 FN=0 -> precision 1/3, recall 1 -> F1 = 2*(1/3)/(4/3) = 0.5
    assert f1([1, 1, 1, 0], [1, 0, 0, 0]) == pytest.approx(0.5)
    # positive=0 scores class 0 instead: TP=1 (idx 0), FP=2 (idx 1, 2), FN=0 -> 2*1 / (2*1 + 2 + 0) = 0.5
    assert f1([0, 0, 0, 1], [0, 1, 1, 1], positive=0) == pytest.approx(0.5)


def test_f1_without_any_positive_is_zero_not_nan():
    assert f1([0, 0, 0], [0, 0, 0]) == 0.0
    assert f1([0, 0], [1, 1]) == 0.0


def test_f1_rejects_multiclass_ids():
    with pytest.raises(ValueError, match="macro_f1"):
        f1([0, 1, 2], [0, 1, 2])


def test_macro_f1_averages_per_class_f1():
    # y=[0,0,1,1,2,2], p=[0,1,1,1,2,0]
    # class 0: TP=1 FP=1 FN=1 -> 2/4 = 0.5; class 1: TP=2 FP=1 FN=0 -> 4/5 = 0.8; class 2: TP=1 FP=0 FN=1 -> 2/3
    y, p = [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]
    assert macro_f1(p, y) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # a class absent from both arrays but named by num_labels scores 0 and pulls the mean down
    assert macro_f1(p, y, num_labels=4) == pytest.approx((0.5 + 0.8 + 2 / 3) / 4)


def test_matthews_binary_matches_the_textbook_formula():
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2*2 - 1*1) / sqrt(3*3*3*3) = 3/9
    assert matthews_corrcoef(P, Y) == pytest.approx(1 / 3)
    assert matthews_corrcoef([1, 0, 1, 0], [1, 0, 1, 0]) == pytest.approx(1.0)
    assert matthews_corrcoef([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)


def test_matthews_multiclass_is_gorodkin_rk():
    # y=[0,0,1,1,2,2], p=[0,1,1,1,2,0]: c = 4 correct, s = 6,
    # true counts t = (2,2,2), predicted counts q = (2,3,1): t.q = 4+6+2 = 12, q.q = 14, t.t = 12
    # R_K = (4*6 - 12) / sqrt((36 - 14)(36 - 12)) = 12 / sqrt(528)
    y, p = [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]
    assert matthews_corrcoef(p, y) == pytest.approx(12 / math.sqrt(528))


def test_matthews_of_a_constant_prediction_is_zero_not_nan():
    assert matthews_corrcoef([1, 1, 1, 1], [0, 1, 0, 1]) == 0.0
    assert matthews_corrcoef([0, 0], [0, 0]) == 0.0


def test_pearson_by_hand():
    # x=[1,2,3,4], y=[2,4,5,9]: means 2.5, 5; dx=[-1.5,-.5,.5,1.5], dy=[-3,-1,0,4]
    # sum dx*dy = 4.5+0.5+0+6 = 11; sum dx^2 = 5; sum dy^2 = 26 -> r = 11/sqrt(130)
    assert pearson([1, 2, 3, 4], [2, 4, 5, 9]) == pytest.approx(11 / math.sqrt(130))
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_pearson_of_a_constant_is_zero_not_nan():
    assert pearson([3.0, 3.0, 3.0], [1.0, 2.0, 3.0]) == 0.0
    assert pearson([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]) == 0.0
    assert pearson([float("nan"), 1.0, 2.0], [1.0, 2.0, 3.0]) == 0.0


def test_rankdata_averages_ties():
    # sorted: 10(1) 20,20 (2,3 -> 2.5) 30(4) 40,40,40 (5,6,7 -> 6)
    assert rankdata([40, 20, 10, 40, 30, 20, 40]).tolist() == [6.0, 2.5, 1.0, 6.0, 4.0, 2.5, 6.0]


def test_spearman_uses_average_ranks_for_ties():
    # x=[1,2,2,3] -> ranks [1,2.5,2.5,4]; y=[1,3,2,4] -> ranks [1,3,2,4]
    # d(rank x)=[-1.5,0,0,1.5], d(rank y)=[-1.5,.5,-.5,1.5]: sum prod = 4.5, sum dx^2 = 4.5, sum dy^2 = 5
    # rho = 4.5 / sqrt(4.5 * 5) = sqrt(0.9)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(math.sqrt(0.9))
    # monotone but non-linear -> 1
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)


def test_micro_f1_and_subset_accuracy_on_multi_hot_matrices():
    y = [[1, 0, 1], [0, 1, 0], [1, 1, 0]]
    p = [[1, 0, 0], [0, 1, 0], [1, 1, 1]]
    # cells: TP = 1+1+2 = 4, FP = 1 (row 3, col 3), FN = 1 (row 1, col 3) -> 8 / 10
    assert micro_f1(p, y) == pytest.approx(0.8)
    assert subset_accuracy(p, y) == pytest.approx(1 / 3)  # only row 2 matches exactly
    assert micro_f1([[0, 0]], [[0, 0]]) == 0.0


def test_multi_label_metrics_reject_probabilities():
    with pytest.raises(ValueError, match="threshold"):
        micro_f1([[0.7, 0.2]], [[1, 0]])


def test_length_mismatch_and_empty_inputs_raise():
    with pytest.raises(ValueError, match="length"):
        accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="zero examples"):
        accuracy([], [])


def test_default_metrics_per_task_type():
    assert default_metrics("single_label_classification", 2) == ["accuracy", "f1"]
    assert default_metrics("single_label_classification", 3) == ["accuracy", "macro_f1"]
    assert default_metrics("regression", 1) == ["pearson", "spearman"]
    assert default_metrics("multi_label_classification", 5) == ["micro_f1", "subset_accuracy"]
    assert main_metric("single_label_classification", 2) == "accuracy"
    assert main_metric("single_label_classification", 2, ["matthews_corrcoef", "accuracy"]) == "matthews_corrcoef"


def test_compute_metrics_returns_named_floats_in_order():
    out = compute_metrics("single_label_classification", np.array(P), np.array(Y), ["f1", "accuracy"])
    assert list(out) == ["f1", "accuracy"]
    assert out == pytest.approx({"f1": 2 / 3, "accuracy": 4 / 6})
    assert all(type(v) is float for v in out.values())
    reg = compute_metrics("regression", [1, 2, 3, 4], [2, 4, 5, 9], ["pearson", "spearman"])
    assert reg == pytest.approx({"pearson": 11 / math.sqrt(130), "spearman": 1.0})


def test_compute_metrics_defaults_follow_num_labels():
    assert list(compute_metrics("single_label_classification", P, Y)) == ["accuracy", "f1"]
    assert list(compute_metrics("single_label_classification", [0, 1], [0, 1], num_labels=3)) == [
        "accuracy", "macro_f1"]
    assert list(compute_metrics("multi_label_classification", [[1, 0]], [[1, 0]])) == [
        "micro_f1", "subset_accuracy"]


def test_compute_metrics_rejects_a_metric_of_another_task_type():
    with pytest.raises(ConfigError, match="unknown metric 'pearson' for single_label_classification"):
        compute_metrics("single_label_classification", P, Y, ["pearson"])
    with pytest.raises(ConfigError, match="task_type"):
        default_metrics("ranking", 2)


def test_every_metric_has_a_direction_and_is_better_uses_it():
    assert set(HIGHER_IS_BETTER) >= {name for metrics in METRICS.values() for name in metrics}
    assert is_better("accuracy", 0.8, 0.7) and not is_better("accuracy", 0.7, 0.7)
    assert is_better("mse", 0.1, 0.2) and not is_better("mse", 0.3, 0.2)
    assert is_better("f1", 0.0, None)
