"""Evaluation protocols of the paper: all tiles of each slide, and R repeated random K-tile draws.

The encoder runs in eval mode (BatchNorm running statistics), where a tile's embedding does not depend
on the others, so each slide's tiles are embedded once (only the tiles some protocol needs) and the
draws index into them; the aggregator then sees every tile (one eager call per slide, any N) and the
R draws (one jitted, vmapped call per slide). Metrics come from ``bigjax.metrics`` (scikit-learn):
QWK and accuracy for PANDA, accuracy and ROC AUC for CAMELYON; a draw protocol gives one value per draw,
reported as mean ± std. ``MetricsLog``, ``plot_curves`` and ``write_results`` report a run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from pathlib import Path
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

    def mean(self, metric: str) -> float:
        return metrics.mean_std(self.values[metric])[0]

    def lines(self) -> list[str]:
        """Report lines, e.g. "test QWK 0.61 ± 0.03 (100 draws of 256 tiles)"."""
        return [metrics.format_metric(f"{self.split} {METRIC_NAMES[m]}", v, self.protocol)
                for m, v in self.values.items()]

    def to_json(self) -> dict:
        return {"split": self.split, "protocol": self.protocol, "values": self.values,
                **{f"{m}_mean_std": metrics.mean_std(v) for m, v in self.values.items()}}


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
    n_classes = probs.shape[-1]
    values = {m: [score(m, labels, p, n_classes) for p in probs] for m in TASK_METRICS[task]}
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


# --- reporting --------------------------------------------------------------------------------

class MetricsLog:
    """Append-only JSONL of a run's metrics (one object per line, with wall time); survives resumes.

    Every numeric value is also a TensorBoard scalar ``<kind>/<name>`` at the row's step, in
    ``tensorboard/`` beside the JSONL file (``tensorboard --logdir <workdir>/tensorboard``).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._board = None

    def write(self, **row) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"time": time.time(), **row}, default=_json_default) + "\n")
        self._to_tensorboard(row)

    def _to_tensorboard(self, row: dict) -> None:
        from tensorboardX import SummaryWriter

        if self._board is None:
            self._board = SummaryWriter(str(self.path.parent / "tensorboard"))
        kind, step = row.get("kind", "metrics"), int(row.get("step", 0))
        for name, value in row.items():
            if name not in ("kind", "step") and isinstance(value, (int, float, np.number)):
                self._board.add_scalar(f"{kind}/{name}", float(value), step)
        self._board.flush()

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def plot_curves(metrics_jsonl: str | Path, out_png: str | Path) -> None:
    """Training loss (per logged step and per epoch) and validation metrics per epoch, as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = MetricsLog(metrics_jsonl).read()
    steps = [r for r in rows if r.get("kind") == "step"]
    epochs = _last_per_epoch([r for r in rows if r.get("kind") == "epoch"])
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 4))
    if steps:
        ax_loss.plot([r["step"] for r in steps], [r["loss"] for r in steps], alpha=0.4, label="step")
    if epochs:
        ax_loss.plot([r["step"] for r in epochs], [r["train_loss"] for r in epochs], "o-", label="epoch mean")
        for name in sorted({k for r in epochs for k in r if k.startswith("val_")}):
            ax_val.plot([r["epoch"] for r in epochs], [r.get(name, np.nan) for r in epochs], "o-",
                        label=name)
    ax_loss.set(xlabel="step", ylabel="training loss", title="training")
    ax_val.set(xlabel="epoch", ylabel="metric", title="validation")
    for ax in (ax_loss, ax_val):
        if ax.has_data():
            ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def write_results(workdir: str | Path, results: Sequence[ProtocolResult], meta: dict, config,
                  tag: str = "") -> dict:
    """Print the final table and write it to results[_tag].md and results[_tag].json in the workdir."""
    lines = [line for r in results for line in r.lines()]
    head = (f"{config.task} · encoder={config.encoder} · aggregator={config.aggregator} · "
            f"ResNet-{config.depth} · best checkpoint step {meta.get('best_step', meta.get('step'))}")
    text = "\n".join([head, *lines]) + "\n"
    print(text, end="", flush=True)
    suffix = f"_{tag}" if tag else ""
    workdir = Path(workdir)
    (workdir / f"results{suffix}.md").write_text(text)
    summary = {"header": head, "lines": lines, "results": [r.to_json() for r in results],
               "best_step": meta.get("best_step"), "best_val": meta.get("best")}
    (workdir / f"results{suffix}.json").write_text(json.dumps(summary, indent=1, default=_json_default))
    return summary


def _last_per_epoch(rows: list[dict]) -> list[dict]:
    """Keep the last row of each epoch (a resumed run may have logged an epoch twice)."""
    return sorted({r["epoch"]: r for r in rows}.values(), key=lambda r: r["epoch"])


def _json_default(x):
    if isinstance(x, (np.generic, jax.Array)):
        return np.asarray(x).tolist()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")
