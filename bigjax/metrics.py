"""Evaluation metrics of the paper (scikit-learn's where it has them) and their reporting.

Inputs are host values (numpy arrays or lists); every function returns a Python float. Labels are
checked first: a label outside 0..n_classes-1 (or a non-integer one) raises ValueError naming the
values and their positions, instead of silently dropping out of the metric.
"""

import warnings
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
from sklearn import metrics as skm
from sklearn.exceptions import UndefinedMetricWarning


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
    y_true = class_labels(y_true, n_classes, "quadratic_weighted_kappa: y_true")
    y_pred = class_labels(y_pred, n_classes, "quadratic_weighted_kappa: y_pred", like=y_true)
    if n_classes is None:
        n_classes = int(max(y_true.max(), y_pred.max())) + 1
    with warnings.catch_warnings():  # the undefined case is the documented 0.0, not news: a bootstrap
        warnings.simplefilter("ignore", UndefinedMetricWarning)  # over 1 slide would warn per sample
        return float(skm.cohen_kappa_score(y_true, y_pred, labels=np.arange(n_classes),
                                           weights="quadratic", replace_undefined_by=0.0))


def accuracy(y_true, y_pred, n_classes: int | None = None) -> float:
    """Fraction of predictions equal to the labels (as sklearn.metrics.accuracy_score, without its overhead).

    Args:
        y_true: integer labels (n,).
        y_pred: integer predictions (n,).
        n_classes: when given, labels and predictions must lie in 0..n_classes-1.
    """
    y_true = class_labels(y_true, n_classes, "accuracy: y_true")
    return float(np.mean(y_true == class_labels(y_pred, n_classes, "accuracy: y_pred", like=y_true)))


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
    probs = np.asarray(probs, np.float64)
    y_true = class_labels(y_true, 2 if probs.ndim == 1 else probs.shape[1], "roc_auc: y_true")
    if probs.shape[0] != len(y_true) or not np.all(np.isfinite(probs)):
        raise ValueError(f"roc_auc: probs of shape {probs.shape} for {len(y_true)} labels"
                         + ("" if np.all(np.isfinite(probs)) else f", {np.sum(~np.isfinite(probs))} not finite"))
    if probs.ndim == 2 and probs.shape[1] == 2:
        probs = probs[:, 1]
    if probs.ndim == 1:
        if len(np.unique(y_true)) < 2:
            return float("nan")
        return float(skm.roc_auc_score(y_true, probs))
    per_class = [skm.roc_auc_score(y_true == c, probs[:, c]) for c in range(probs.shape[1])
                 if 0 < np.sum(y_true == c) < len(y_true)]
    return float(np.mean(per_class)) if per_class else float("nan")


def class_labels(y, n_classes: int | None, name: str = "labels", like: np.ndarray | None = None) -> np.ndarray:
    """``y`` as a 1-D int64 array of class labels in 0..n_classes-1 (any value >= 0 without n_classes).

    Args:
        y: labels or predictions.
        n_classes: number of classes, or None.
        name: what ``y`` is, for the message.
        like: labels ``y`` must match in length.

    Raises:
        ValueError: naming the values outside the range (or not integers) and where they are.
    """
    y = np.asarray(y)
    if y.ndim != 1 or (like is not None and len(y) != len(like)):
        raise ValueError(f"{name} has shape {y.shape}; expected ({'n' if like is None else len(like)},)")
    if y.size and not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.floating)
                       or y.dtype == bool):
        raise ValueError(f"{name} has dtype {y.dtype}; expected integer class labels")
    bad = (y < 0) | (y != np.round(y)) | (False if n_classes is None else y >= n_classes)
    if np.any(bad):
        where = np.flatnonzero(bad)
        allowed = f"an integer 0..{n_classes - 1}" if n_classes is not None else "an integer >= 0"
        values = ", ".join(f"{y[i].item()!r} at index {i}" for i in where[:5]) + (" ..." if len(where) > 5 else "")
        raise ValueError(f"{name}: {len(where)} of {len(y)} are not class labels ({allowed}): {values}")
    return y.astype(np.int64)


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


def bootstrap_ci(metric: Callable[..., float], *arrays, n_boot: int = 1000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of ``metric(*arrays)``, resampling slides (rows).

    Each of ``n_boot`` resamples draws n rows with replacement, the same rows from every array, and
    evaluates the metric; the interval is the (1-level)/2 and (1+level)/2 quantiles of those values.
    Undefined resamples (NaN, e.g. an AUC of a resample holding one class) are left out.

    Args:
        metric: e.g. ``functools.partial(quadratic_weighted_kappa, n_classes=6)``.
        *arrays: per-slide arrays of equal length n (labels, predictions or probabilities).
        n_boot: resamples.
        level: coverage of the interval.
        seed: seed of the resampling.

    Returns:
        (low, high); (nan, nan) if no resample is defined.

    References:
        Efron & Tibshirani 1993, An Introduction to the Bootstrap, ch. 13 (percentile interval).
    """
    arrays = [np.asarray(a) for a in arrays]
    n = len(arrays[0])
    if n == 0 or any(len(a) != n for a in arrays):
        raise ValueError(f"bootstrap_ci: arrays of lengths {[len(a) for a in arrays]}; expected one length > 0")
    rows = np.random.default_rng(seed).integers(0, n, (n_boot, n))
    values = np.array([metric(*(a[r] for a in arrays)) for r in rows], np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    low, high = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def format_metric(name: str, values: Sequence[float] | float, context: str | None = None,
                  digits: int = 2, ci: tuple[float, float] | None = None) -> str:
    """One report line: `format_metric("QWK", v, "100 draws of 256 tiles", ci=(0.52, 0.70))` ->
    "QWK 0.61 ± 0.03 [95% CI 0.52, 0.70] (100 draws of 256 tiles)".

    Args:
        name: metric name.
        values: one value (printed without ±) or repeated measurements (mean ± std).
        context: what the repetitions were, printed in parentheses.
        digits: decimals.
        ci: a 95 % confidence interval (``bootstrap_ci``), printed in brackets.

    Returns:
        the formatted line.
    """
    mean, std = mean_std(values)
    text = f"{name} {mean:.{digits}f}"
    if np.ndim(values) > 0 and len(values) > 1:
        text += f" ± {std:.{digits}f}"
    if ci is not None:
        text += f" [95% CI {ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"
    return f"{text} ({context})" if context else text


class Localisation(NamedTuple):
    """Localisation of tumour by tile scores: the mean per-slide AUC and its interval over slides."""

    mean: float  # mean over the slides whose AUC is defined (NaN if none)
    ci: tuple[float, float]  # 95 % percentile-bootstrap interval of that mean, resampling slides
    per_slide: np.ndarray  # (n_slides,) AUC of each slide, NaN where undefined (all tiles one kind)
    n_slides: int  # slides with a defined AUC


def localisation(scores: Sequence, masks: Sequence, *, threshold: float = 0.5, n_boot: int = 1000,
                 seed: int = 0) -> Localisation:
    """How well tile scores find tumour: per slide, the ROC AUC of the scores for "tile is mostly
    tumour" (tumour share of its pixels >= ``threshold``) against the rest, averaged over slides.

    A slide whose tiles are all tumour or all not (a benign slide) has no AUC and is left out of the
    mean. Tiles are the slide's tissue tiles (a tile store keeps only those).

    Args:
        scores: per slide, float (n_tiles,) tile scores (attention, instance scores, ...).
        masks: per slide, (n_tiles,) tumour share of each tile in [0, 1]
            (``bigjax.data.masks.tile_tumour_fraction``), or bool "is tumour".
        threshold: tumour share that makes a tile a tumour tile.
        n_boot, seed: of the bootstrap over slides (``bootstrap_ci``).

    Returns:
        a ``Localisation``.

    References:
        The tile-level ROC analysis of MIL attention as in Ilse et al. 2018 (sec. 5) and CLAM (Lu et
        al. 2021); Efron & Tibshirani 1993 for the interval.
    """
    if len(scores) != len(masks):
        raise ValueError(f"localisation: {len(scores)} slides of scores but {len(masks)} of masks")
    aucs = np.full(len(scores), np.nan)
    for i, (s, m) in enumerate(zip(scores, masks)):
        s, m = np.asarray(s, np.float64), np.asarray(m, np.float64)
        if s.shape != m.shape or s.ndim != 1:
            raise ValueError(f"localisation: slide {i} has scores of shape {s.shape} and mask of shape {m.shape}; "
                             "expected one value per tile for both")
        tumour = m >= threshold
        if 0 < tumour.sum() < len(tumour):
            aucs[i] = skm.roc_auc_score(tumour, s)
    defined = aucs[np.isfinite(aucs)]
    if defined.size == 0:
        return Localisation(float("nan"), (float("nan"), float("nan")), aucs, 0)
    ci = bootstrap_ci(np.mean, defined, n_boot=n_boot, seed=seed)
    return Localisation(float(defined.mean()), ci, aucs, int(defined.size))
