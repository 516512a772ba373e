"""Metrics against scikit-learn, and their undefined cases."""

import functools
import warnings

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, cohen_kappa_score, roc_auc_score

from bigjax.metrics import accuracy, bootstrap_ci, format_metric, mean_std, quadratic_weighted_kappa, roc_auc


def test_qwk_equals_sklearn():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 6, 200)
    y_pred = np.clip(y_true + rng.integers(-2, 3, 200), 0, 5)
    want = cohen_kappa_score(y_true, y_pred, weights="quadratic")
    assert quadratic_weighted_kappa(y_true, y_pred) == pytest.approx(want, abs=1e-12)
    assert -1 <= want <= 1 and want != pytest.approx(0)


def test_qwk_weights_follow_grades_when_some_are_missing():
    y_true, y_pred = np.array([0, 2, 5, 5, 2]), np.array([0, 5, 5, 2, 2])
    want = cohen_kappa_score(y_true, y_pred, weights="quadratic", labels=np.arange(6))
    assert quadratic_weighted_kappa(y_true, y_pred, n_classes=6) == pytest.approx(want)
    # without the labels, sklearn would treat grades 2 and 5 as neighbours
    assert want != pytest.approx(cohen_kappa_score(y_true, y_pred, weights="quadratic"))


def test_qwk_of_a_constant_prediction_is_zero_not_nan_and_no_warning():
    """The undefined case is documented (0.0); a bootstrap over one slide would otherwise print
    scikit-learn's UndefinedMetricWarning once per resample (101 lines in a run's log)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert quadratic_weighted_kappa([0, 1, 2, 3], [2, 2, 2, 2]) == 0.0
        assert quadratic_weighted_kappa([3, 3, 3], [3, 3, 3], n_classes=6) == 0.0
        assert quadratic_weighted_kappa([4], [2], n_classes=6) == 0.0


def test_accuracy():
    assert accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == pytest.approx(0.75)
    rng = np.random.default_rng(2)
    y, pred = rng.integers(0, 4, 50), rng.integers(0, 4, 50)
    assert accuracy(y, pred) == pytest.approx(accuracy_score(y, pred))


def test_roc_auc_binary_and_multiclass():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 50)
    p1 = np.clip(y * 0.3 + rng.random(50) * 0.7, 0, 1)
    assert roc_auc(y, p1) == pytest.approx(roc_auc_score(y, p1))
    assert roc_auc(y, np.stack([1 - p1, p1], 1)) == pytest.approx(roc_auc_score(y, p1))
    y3 = rng.integers(0, 3, 60)
    logits = rng.normal(size=(60, 3)) + 2 * np.eye(3)[y3]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert roc_auc(y3, probs) == pytest.approx(roc_auc_score(y3, probs, multi_class="ovr"))


def test_roc_auc_undefined_and_absent_classes():
    assert np.isnan(roc_auc([1, 1, 1], [0.2, 0.5, 0.9]))
    y = np.array([0, 2, 0, 2])
    probs = np.array([[.6, .2, .2], [.2, .2, .6], [.5, .3, .2], [.3, .3, .4]])
    want = np.mean([roc_auc_score(y == 0, probs[:, 0]), roc_auc_score(y == 2, probs[:, 2])])
    assert roc_auc(y, probs) == pytest.approx(want)


def test_mean_std_and_format():
    assert mean_std([1.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert mean_std([1.0, 3.0], ddof=1)[1] == pytest.approx(np.sqrt(2))
    assert mean_std(0.5) == (0.5, 0.0)
    assert format_metric("QWK", [0.58, 0.64], "100 draws of 256 tiles") == \
        "QWK 0.61 ± 0.03 (100 draws of 256 tiles)"
    assert format_metric("AUC", 0.9123, digits=3) == "AUC 0.912"


@pytest.mark.parametrize("y_true, y_pred, n_classes, message", [
    ([-1, 0, 1, 2], [5, 0, 1, 2], 6, r"y_true: 1 of 4 are not class labels \(an integer 0..5\): -1 at index 0"),
    ([0, 1, 2], [0, 6, 7], 6, r"y_pred: 2 of 3 are not class labels \(an integer 0..5\): 6 at index 1, 7 at index 2"),
    ([0, 1.5], [0, 1], None, r"y_true: 1 of 2 are not class labels \(an integer >= 0\): 1.5 at index 1"),
    ([0, 1], [0, 1, 1], None, r"y_pred has shape \(3,\); expected \(2,\)"),
])
def test_qwk_refuses_labels_outside_the_classes(y_true, y_pred, n_classes, message):
    with pytest.raises(ValueError, match=r"quadratic_weighted_kappa: " + message):
        quadratic_weighted_kappa(y_true, y_pred, n_classes)


def test_accuracy_and_auc_refuse_labels_outside_the_classes():
    with pytest.raises(ValueError, match=r"accuracy: y_true: 1 of 3 are not class labels \(an integer 0..2\)"):
        accuracy([0, 3, 1], [0, 1, 1], n_classes=3)
    with pytest.raises(ValueError, match=r"accuracy: y_true: .*-1 at index 1"):
        accuracy([0, -1], [0, 1])
    with pytest.raises(ValueError, match=r"roc_auc: y_true: 1 of 3 are not class labels \(an integer 0..1\): 2 at"):
        roc_auc([0, 1, 2], [0.1, 0.9, 0.5])
    with pytest.raises(ValueError, match=r"roc_auc: y_true: .*3 at index 0"):
        roc_auc([3, 0], np.full((2, 3), 1 / 3))
    with pytest.raises(ValueError, match=r"roc_auc: probs of shape \(2,\) for 2 labels, 1 not finite"):
        roc_auc([0, 1], [0.1, np.nan])


def test_bootstrap_ci_of_accuracy_matches_the_normal_interval():
    rng = np.random.default_rng(0)
    n = 400
    y = rng.integers(0, 6, n)
    pred = np.where(rng.random(n) < 0.7, y, (y + 1) % 6)
    p = accuracy(y, pred)
    half = 1.96 * np.sqrt(p * (1 - p) / n)  # the binomial proportion's normal-approximation interval
    low, high = bootstrap_ci(accuracy, y, pred, n_boot=2000)
    assert low == pytest.approx(p - half, abs=0.01) and high == pytest.approx(p + half, abs=0.01)
    assert bootstrap_ci(accuracy, y, pred, n_boot=2000) == (low, high)  # seeded
    assert bootstrap_ci(accuracy, y[:40], pred[:40])[1] - bootstrap_ci(accuracy, y[:40], pred[:40])[0] > 2 * half


def test_bootstrap_ci_skips_undefined_resamples_and_formats():
    qwk = functools.partial(quadratic_weighted_kappa, n_classes=6)
    y = np.array([0, 1, 2, 3, 4, 5] * 3)
    low, high = bootstrap_ci(qwk, y, y, n_boot=200)
    assert low == pytest.approx(1.0) and high == pytest.approx(1.0)
    auc = bootstrap_ci(roc_auc, np.array([0, 1]), np.array([0.2, 0.8]), n_boot=50)  # half the resamples one class
    assert auc == (1.0, 1.0)
    with pytest.raises(ValueError, match=r"lengths \[3, 2\]"):
        bootstrap_ci(accuracy, [0, 1, 1], [0, 1])
    assert format_metric("QWK", [0.58, 0.64], "100 draws of 256 tiles", ci=(0.523, 0.701)) == \
        "QWK 0.61 ± 0.03 [95% CI 0.52, 0.70] (100 draws of 256 tiles)"
