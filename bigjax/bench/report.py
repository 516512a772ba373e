"""The sweep's outputs: a Markdown table of the fits and times, a JSON file, a log-log plot."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from bigjax.bench.fits import PowerLawFit, fit_power_law
from bigjax.bench.sweep import Point, Sweep

__all__ = ["fits_of", "write_sweep"]


def fits_of(points: list[Point]) -> dict[str, PowerLawFit | None]:
    """Each configuration's power-law fit over its measured points (None with fewer than 3)."""
    out = {}
    for name in dict.fromkeys(p.config for p in points):
        ok = [p for p in points if p.config == name and p.status == "ok"]
        out[name] = fit_power_law([p.area for p in ok], [p.mean_s for p in ok]) if len(ok) >= 3 else None
    return out


def write_sweep(sweep: Sweep, out: str | Path, title: str) -> str:
    """Write sweep.json (points, fits, loads per side), sweep.md and sweep.png into ``out``.

    Returns the Markdown: the table of times and fits, the times and host peaks relative to the
    in-memory step, then the load averages per side.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    points = sweep.points
    fits = fits_of(points)
    text = _markdown(points, fits, title) + _relative(points) + _loads(sweep.loads)
    (out / "sweep.md").write_text(text)
    (out / "sweep.json").write_text(json.dumps(
        {"points": [dataclasses.asdict(p) for p in points],
         "fits": {k: (dataclasses.asdict(f) if f else None) for k, f in fits.items()},
         "loads": [dataclasses.asdict(load) for load in sweep.loads]}, indent=1))
    _plot(points, out / "sweep.png", title)
    return text


def _markdown(points, fits, title) -> str:
    sides = sorted({p.side for p in points})
    by = {(p.config, p.side): p for p in points}
    head = ["config", *[f"{s}² s" for s in sides], "a", "b", "c", "R²", "n", "F_dbl"]
    rows = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, fit in fits.items():
        cells = [name, *[_cell(by.get((name, s))) for s in sides]]
        cells += ([f"{fit.a:.3g}", f"{fit.b:.2f}", f"{fit.c:.3g}", f"{fit.r2:.3f}", str(fit.n),
                   f"{fit.doubling:.2f}"] if fit else ["–"] * 6)
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def _relative(points) -> str:
    """Per side and configuration: time / the in-memory time, and the host peak (GiB)."""
    sides = sorted({p.side for p in points})
    names = list(dict.fromkeys(p.config for p in points))
    by = {(p.config, p.side): p for p in points}
    base = {s: by.get(("inmemory", s)) for s in sides}
    if not any(b and b.status == "ok" for b in base.values()):
        return ""
    head = ["side", *names]
    rows = ["", "Time / in-memory time (host peak RSS, GiB):", "",
            "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in sides:
        cells = [f"{s}²"]
        for name in names:
            p, b = by.get((name, s)), base[s]
            if p is None or p.status != "ok":
                cells.append(p.status if p else "")
                continue
            ratio = f"{p.mean_s / b.mean_s:.2f}" if b and b.status == "ok" else "–"
            peak = f" ({p.host_peak_bytes / 2**30:.1f})" if p.host_peak_bytes else ""
            cells.append(ratio + peak)
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


def _loads(loads) -> str:
    if not loads:
        return ""
    cells = ", ".join(f"{load.side}²: {load.start[0]:.1f} → {load.end[0]:.1f}" for load in loads)
    return f"\nLoad average (1 min) at the start → end of each side: {cells}.\n"


def _cell(p: Point | None) -> str:
    if p is None:
        return ""
    if p.status != "ok":
        return p.status
    return f"{p.mean_s:.3g} ± {p.std_s:.2g}"


def _plot(points, path, title) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for name in dict.fromkeys(p.config for p in points):
        ok = sorted((p for p in points if p.config == name and p.status == "ok"), key=lambda p: p.side)
        if not ok:
            continue
        side = np.array([p.side for p in ok])
        mean, std = np.array([p.mean_s for p in ok]), np.array([p.std_s for p in ok])
        ax.plot(side, mean, "o-", label=name)
        ax.fill_between(side, np.maximum(mean - std, 1e-9), mean + std, alpha=0.2)
    ax.set(xscale="log", yscale="log", xlabel="input side (px)", ylabel="training iteration (s)",
           title=title)
    top = ax.secondary_xaxis("top", functions=(lambda s: s * s, lambda a: np.sqrt(a)))
    top.set_xlabel("input area (px²)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
