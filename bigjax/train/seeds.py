"""Runs that differ only in ``--seed``, summarised: each seed's test metrics and their spread.

A results table reports, per configuration, every seed's test value (all tiles, with its bootstrap
interval over slides when the run recorded one) and the mean ± sample std (n − 1) over seeds, so a
reader sees both uncertainties the project asks for: over slides and over seeds.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np

__all__ = ["collect", "seed_table"]

_SEEDED = re.compile(r"^(?P<name>.+)_s(?P<seed>\d+)$")


def collect(root: str | Path) -> dict[str, dict[int, dict]]:
    """``{configuration: {seed: results.json}}`` of every ``<root>/<name>_s<seed>/results.json``."""
    runs: dict[str, dict[int, dict]] = defaultdict(dict)
    for path in sorted(Path(root).glob("*_s*/results.json")):
        m = _SEEDED.match(path.parent.name)
        if m:
            runs[m["name"]][int(m["seed"])] = json.loads(path.read_text())
    return dict(runs)


def _test(results: dict, draws: bool) -> dict | None:
    """The run's test result under all tiles, or under its repeated draws."""
    for r in results["results"]:
        if r["split"] == "test" and (r["protocol"] != "all tiles") == draws:
            return r
    return None


def _cell(r: dict | None, metric: str) -> tuple[str, float | None]:
    if r is None or metric not in r["values"]:
        return "–", None
    mean = r[f"{metric}_mean_std"][0]
    ci = r.get(f"{metric}_ci95")
    return (f"{mean:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")), mean


def _spread(values: list[float]) -> str:
    if len(values) < 2:
        return "–" if not values else f"{values[0]:.2f} (one seed)"
    return f"**{np.mean(values):.2f} ± {np.std(values, ddof=1):.2f}**"


def seed_table(root: str | Path, metric: str = "qwk") -> str:
    """A Markdown table: per configuration, each seed's test ``metric`` (all tiles [95 % CI]; mean of
    the draws) and mean ± std over seeds."""
    lines = [f"| configuration | seeds | test {metric}, all tiles [95% CI over slides] per seed | "
             f"mean ± std | test {metric}, mean of draws per seed | mean ± std |",
             "|---|---|---|---|---|---|"]
    for name, by_seed in collect(root).items():
        seeds = sorted(by_seed)
        cells = {"all": [], "draws": []}
        for s in seeds:
            cells["all"].append(_cell(_test(by_seed[s], draws=False), metric))
            cells["draws"].append(_cell(_test(by_seed[s], draws=True), metric))
        row = [name, ", ".join(map(str, seeds))]
        for key in ("all", "draws"):
            row += [" / ".join(text for text, _ in cells[key]),
                    _spread([v for _, v in cells[key] if v is not None])]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
