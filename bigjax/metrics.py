"""Evaluation metrics of the paper (scikit-learn's where it has them) and their reporting.

Inputs are host values (numpy arrays or lists); every function returns a Python float.
"""

from collections.abc import Sequence

import numpy as np
from sklearn import metrics as skm


def quadratic_weighted_kappa(y_true, y_pred, n_classes: int | None = None) -> float:
    """Cohen's kappa with quadratic weights, the PANDA challenge metric.

    Integer classes 0..n_classes-1 are passed to scikit-learn as `labels`, so the weights follow
    the class indices even when some grades are absent (otherwise scikit-learn would weight by
    position among the labels present, making grades 2 and 5 neighbours when 3 and 4 are missing).

    Kappa is undefined when both raters use one and the same single class throughout (chance
    agreement is then perfect); that case returns 0.0 — no agreement beyond chance is shown — so
    a constant predictor can never score above 0 and model selection never sees NaN.

    Args:
        y_true: integer labels (n,).
        y_pred: integer predictions (n,).
        n_classes: number of classes; default max label + 1.

    Returns:
        kappa in [-1, 1].

    References:
        Cohen 1968; sklearn.metrics.cohen_kappa_score(weights="quadratic").
    """
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    if n_classes is None:
        n_classes = int(max(y_true.max(), y_pred.max())) + 1
    return float(skm.cohen_kappa_score(y_true, y_pred, labels=np.arange(n_classes),
                                       weights="quadratic", replace_undefined_by=0.0))


def accuracy(y_true, y_pred) -> float:
    """Fraction of predictions equal to the labels (sklearn.metrics.accuracy_score)."""
    return float(skm.accuracy_score(np.asarray(y_true), np.asarray(y_pred)))


def roc_auc(y_true, probs) -> float:
    """Area under the ROC curve from predicted probabilities.

    Binary: probs is (n,) for the positive class or (n, 2). Multi-class: probs (n, C), the
    macro average of one-vs-rest AUCs over the classes present in y_true (scikit-learn's
    multi_class="ovr" average, which instead gives NaN as soon as one class is absent).

    Args:
        y_true: integer labels (n,).
        probs: class probabilities, (n,) or (n, C).

    Returns:
        the AUC, or NaN when y_true holds a single class (AUC undefined).
    """
    y_true, probs = np.asarray(y_true), np.asarray(probs, np.float64)
    if probs.ndim == 2 and probs.shape[1] == 2:
        probs = probs[:, 1]
    if probs.ndim == 1:
        if len(np.unique(y_true)) < 2:
            return float("nan")
        return float(skm.roc_auc_score(y_true, probs))
    per_class = [skm.roc_auc_score(y_true == c, probs[:, c]) for c in range(probs.shape[1])
                 if 0 < np.sum(y_true == c) < len(y_true)]
    return float(np.mean(per_class)) if per_class else float("nan")


def mean_std(values: Sequence[float] | float, ddof: int = 0) -> tuple[float, float]:
    """Mean and standard deviation of repeated measurements (draws, seeds).

    Args:
        values: one value or a sequence of them.
        ddof: delta degrees of freedom of the std (0: population, numpy's default).

    Returns:
        (mean, std); std is 0.0 for a single value.
    """
    values = np.atleast_1d(np.asarray(values, np.float64))
    std = float(np.std(values, ddof=ddof)) if values.size > ddof else 0.0
    return float(np.mean(values)), std


def format_metric(name: str, values: Sequence[float] | float, context: str | None = None,
                  digits: int = 2) -> str:
    """One report line: `format_metric("QWK", v, "100 draws of 256 tiles")` ->
    "QWK 0.61 ± 0.03 (100 draws of 256 tiles)".

    Args:
        name: metric name.
        values: one value (printed without ±) or repeated measurements (mean ± std).
        context: what the repetitions were, printed in parentheses.
        digits: decimals.

    Returns:
        the formatted line.
    """
    mean, std = mean_std(values)
    text = f"{name} {mean:.{digits}f}"
    if np.ndim(values) > 0 and len(values) > 1:
        text += f" ± {std:.{digits}f}"
    return f"{text} ({context})" if context else text
