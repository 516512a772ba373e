"""Reporting a run: the metrics log (JSONL + TensorBoard), the training curves, the results table."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from bigjax.train.evaluate import ProtocolResult

__all__ = ["MetricsLog", "plot_curves", "write_results"]


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

    def close(self) -> None:
        """Close the TensorBoard writer (its event file and thread); a later ``write`` reopens one."""
        if self._board is not None:
            self._board.close()
            self._board = None

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
            f"{config.arch} · best checkpoint step {meta.get('best_step', meta.get('step'))}")
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
