"""Evaluation protocols of the paper: all tiles of each slide, and R repeated random K-tile draws.

The encoder runs in eval mode (BatchNorm running statistics), where a tile's embedding does not depend
on the others, so each slide's tiles are embedded once (only the tiles some protocol needs) and the
draws index into them; the aggregator then sees every tile (one eager call per slide, any N) and the
R draws (one jitted, vmapped call per slide). Metrics come from ``bigjax.metrics`` (scikit-learn):
QWK and accuracy for PANDA, accuracy and ROC AUC for CAMELYON; a draw protocol gives one value per draw,
reported as mean ± std, and all tiles one value with its 95 % bootstrap interval over slides (Efron &
Tibshirani's percentile interval, ``metrics.bootstrap_ci``); ``bigjax.train.report`` writes them out.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from bigjax import metrics
from bigjax.data.bags import EVAL_EPOCH, bag_indices

METRIC_NAMES = {"qwk": "QWK", "accuracy": "accuracy", "auc": "AUC"}
TASK_METRICS = {"panda": ("qwk", "accuracy"), "camelyon": ("accuracy", "auc")}

# (slide row, tile indices) -> eval-mode embeddings (len(indices), D)
EmbedFn = Callable[[object, np.ndarray], jax.Array]


@dataclasses.dataclass
class ProtocolResult:
    """One split under one protocol: metric -> values (one per draw; one value for all tiles)."""

    split: str
    protocol: str  # "all tiles" or "R draws of K tiles"
    values: dict[str, list[float]]
    labels: np.ndarray  # (n_slides,)
    probs: np.ndarray  # (n_draws, n_slides, C)
    # metric -> its interval: 1000 resamples each, asked by lines() and every to_json()
    _cis: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    def mean(self, metric: str) -> float:
        return metrics.mean_std(self.values[metric])[0]

    def ci(self, metric: str) -> tuple[float, float] | None:
        """95 % percentile-bootstrap interval over the labelled slides (one-draw protocols only:
        all tiles; repeated draws report their spread instead)."""
        if metric not in self._cis:
            self._cis[metric] = self._bootstrap(metric)
        return self._cis[metric]

    def _bootstrap(self, metric: str) -> tuple[float, float] | None:
        known = self.labels >= 0
        if self.probs.shape[0] != 1 or not known.any():
            return None
        n_classes = self.probs.shape[-1]
        return metrics.bootstrap_ci(lambda y, p: score(metric, y, p, n_classes),
                                    self.labels[known], self.probs[0][known])

    def lines(self) -> list[str]:
        """Report lines, e.g. "test QWK 0.81 [95% CI 0.55, 0.95] (all tiles)" or
        "test QWK 0.61 ± 0.03 (100 draws of 256 tiles)"."""
        return [metrics.format_metric(f"{self.split} {METRIC_NAMES[m]}", v, self.protocol,
                                      ci=self.ci(m)) for m, v in self.values.items()]

    def to_json(self) -> dict:
        return {"split": self.split, "protocol": self.protocol, "values": self.values,
                **{f"{m}_mean_std": metrics.mean_std(v) for m, v in self.values.items()},
                **{f"{m}_ci95": self.ci(m) for m in self.values}}


def draw_indices(row, slide_index: int, k: int, draws: int, seed: int) -> np.ndarray:
    """(draws, k) tile indices of a slide's evaluation draws (``bigjax.data.bags``' eval stream)."""
    return np.stack([bag_indices(row.n_tiles, k, seed, EVAL_EPOCH, slide_index, draw=r)
                     for r in range(draws)])


def evaluate(head: nnx.Module, embed: EmbedFn, slides: Sequence, *, task: str, split: str,
             all_tiles: bool, draws: int = 0, k: int = 0, seed: int = 0,
             progress: bool = True) -> list[ProtocolResult]:
    """Evaluate the aggregator ``head`` on ``slides`` under all tiles and/or R draws of K tiles.

    Args:
      head: the MIL aggregator (called with train=False).
      embed: eval-mode embeddings of a slide's tiles (see ``EmbedFn``).
      slides: manifest rows (with tiles); their labels are the targets.
      task: "panda" or "camelyon" (which metrics).
      split: name used in the report lines.
      all_tiles: evaluate every tile of each slide.
      draws, k: also evaluate ``draws`` random bags of ``k`` tiles per slide (0 = not).
      seed: the draws' seed (draw r of slide i is the same in every run with this seed).
    Returns:
      one ``ProtocolResult`` per protocol asked for, all tiles first.
    """
    graphdef, state = nnx.split(head)
    all_probs, draw_probs = [], []
    for i, row in enumerate(tqdm(slides, desc=f"evaluating {split}", unit="slide", leave=False,
                                 disable=not progress)):
        idx = draw_indices(row, i, k, draws, seed) if draws and k else np.zeros((0, 0), np.int64)
        needed = np.arange(row.n_tiles) if all_tiles else np.unique(idx)
        feats = embed(row, needed)
        if all_tiles:
            all_probs.append(np.asarray(jax.nn.softmax(head(feats, train=False)["logits"])))
        if idx.size:
            position = np.searchsorted(needed, idx)  # needed is sorted: rows of feats
            draw_probs.append(np.asarray(_draw_probs(graphdef, state, jnp.take(feats, position, 0))))
    labels = np.array([row.label for row in slides])
    results = []
    if all_tiles:
        results.append(_result(split, "all tiles", task, labels, np.stack(all_probs)[None]))
    if draw_probs:
        probs = np.stack(draw_probs, axis=1)  # (draws, slides, C)
        results.append(_result(split, f"{draws} draws of {k} tiles", task, labels, probs))
    return results


@functools.partial(jax.jit, static_argnums=0)
def _draw_probs(graphdef, state, feats):
    """Class probabilities (R, C) of R bags (R, K, D) under one aggregator state."""
    def one(f):
        return jax.nn.softmax(nnx.merge(graphdef, state)(f, train=False)["logits"])
    return jax.vmap(one)(feats)


def _result(split, protocol, task, labels, probs) -> ProtocolResult:
    """Metrics over the labelled slides (an external test set may have none: label -1)."""
    n_classes, known = probs.shape[-1], labels >= 0
    values = {m: [score(m, labels[known], p[known], n_classes) for p in probs]
              for m in TASK_METRICS[task]} if known.any() else {}
    return ProtocolResult(split, protocol, values, labels, probs)


def score(metric: str, labels: np.ndarray, probs: np.ndarray, n_classes: int) -> float:
    """One metric of class probabilities (n, C) against integer labels (n,)."""
    if metric == "qwk":
        return metrics.quadratic_weighted_kappa(labels, probs.argmax(-1), n_classes)
    if metric == "accuracy":
        return metrics.accuracy(labels, probs.argmax(-1))
    if metric == "auc":
        return metrics.roc_auc(labels, probs)
    raise ValueError(f"unknown metric {metric!r}")
