"""The manifest of a tile store: one CSV row per slide with its label, split, tile count and status.

status is "ok" (tiles stored), "empty" (readable, but no tile passed the foreground rule) or
"failed" (missing, truncated or unreadable; `error` says why). `store` is the slide's folder
relative to the store root; `source` is the slide file it was tiled from.

`read_manifest` checks every row (a bad value raises ValueError naming the file, line, column and value):
labels are integers >= 0 (below `n_classes` when given), or NO_LABEL (-1) for test slides only.
"""
from __future__ import annotations

import csv
import dataclasses
import os
from pathlib import Path
from typing import Iterable

STATUSES = ("ok", "empty", "failed")
SPLITS = ("train", "val", "test")
NO_LABEL = -1


@dataclasses.dataclass(frozen=True)
class ManifestRow:
    """One slide of a tile store."""

    slide_id: str
    label: int
    split: str
    n_tiles: int
    status: str
    store: str
    source: str
    error: str = ""


FIELDS = tuple(f.name for f in dataclasses.fields(ManifestRow))


def write_manifest(path: str | os.PathLike, rows: Iterable[ManifestRow]) -> Path:
    """Write `rows` as CSV at `path` (to a temp name, then renamed, so a crash leaves the old one)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(dataclasses.asdict(r) for r in rows)
    os.replace(tmp, path)
    return path


def read_manifest(path: str | os.PathLike, n_classes: int | None = None) -> list[ManifestRow]:
    """Read and check a manifest CSV written by `write_manifest`.

    Args:
      path: the CSV.
      n_classes: the task's classes; labels must then lie in 0..n_classes-1 (NO_LABEL on test rows).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} not found (tile the slides first)")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = set(FIELDS) - set(reader.fieldnames or ()) - {"error"}
        if missing:
            raise ValueError(f"manifest {path}: missing columns {sorted(missing)}")
        rows, lines = [], {}
        for r in reader:
            where = f"manifest {path}, line {reader.line_num}"
            row = ManifestRow(slide_id=r["slide_id"], label=_integer(where, r, "label", NO_LABEL, n_classes),
                              split=_one_of(where, r, "split", SPLITS), n_tiles=_integer(where, r, "n_tiles", 0),
                              status=_one_of(where, r, "status", STATUSES), store=r["store"], source=r["source"],
                              error=r.get("error") or "")
            if row.label == NO_LABEL and row.split != "test":
                raise ValueError(f"{where}, column label: slide {row.slide_id!r} of split {row.split!r} has no "
                                 f"label (only test slides may be unlabelled)")
            if row.slide_id in lines:
                raise ValueError(f"manifest {path}: slide_id {row.slide_id!r} is repeated on lines "
                                 f"{lines[row.slide_id]} and {reader.line_num}")
            lines[row.slide_id] = reader.line_num
            rows.append(row)
    return rows


def _integer(where: str, row: dict, column: str, low: int, high: int | None = None) -> int:
    """``row[column]`` as an integer in low..high-1 (no upper bound when high is None)."""
    value = row[column]
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or number < low or (high is not None and number >= high):
        what = ("a tile count (an integer >= 0)" if column == "n_tiles" else
                f"a class label (an integer {'>= 0' if high is None else f'0..{high - 1}'}, or {NO_LABEL} for none)")
        raise ValueError(f"{where}, column {column}: {value!r} is not {what}")
    return number


def _one_of(where: str, row: dict, column: str, allowed: tuple[str, ...]) -> str:
    if row[column] not in allowed:
        raise ValueError(f"{where}, column {column}: {row[column]!r} is not one of {allowed}")
    return row[column]


def require_splits(rows: Iterable[ManifestRow], needed: Iterable[str], hint: str = "") -> None:
    """Refuse, before any work, a store in which a split the run needs has no tiled slide.

    Args:
      rows: the manifest.
      needed: the splits the run uses (e.g. ("train", "val", "test")).
      hint: what the user can pass to fix it, appended to the message.
    Raises:
      ValueError: naming the empty splits and how many slides each split got, tiled or not.
    """
    rows = list(rows)
    empty = [s for s in needed if not select(rows, s)]
    if empty:
        counts = ", ".join(f"{s} {len(select(rows, s))}" for s in SPLITS)
        untiled = {status: sum(r.status == status for r in rows) for status in ("failed", "empty")}
        raise ValueError(f"no tiled slide in split{'s' if len(empty) > 1 else ''} {', '.join(empty)} "
                         f"(tiled slides: {counts}; {untiled['failed']} failed, {untiled['empty']} without tissue)"
                         + (f"; {hint}" if hint else ""))


def select(rows: Iterable[ManifestRow], split: str | None = None) -> list[ManifestRow]:
    """The rows with tiles (status "ok"), of `split` when given, in manifest order."""
    return [r for r in rows if r.status == "ok" and r.n_tiles > 0 and (split is None or r.split == split)]
