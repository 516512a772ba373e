"""The manifest of a tile store: one CSV row per slide with its label, split, tile count and status.

status is "ok" (tiles stored), "empty" (readable, but no tile passed the foreground rule) or
"failed" (missing, truncated or unreadable; `error` says why). `store` is the slide's folder
relative to the store root; `source` is the slide file it was tiled from.
"""
from __future__ import annotations

import csv
import dataclasses
import os
from pathlib import Path
from typing import Iterable

STATUSES = ("ok", "empty", "failed")


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


def read_manifest(path: str | os.PathLike) -> list[ManifestRow]:
    """Read a manifest CSV written by `write_manifest`."""
    path = Path(path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = set(FIELDS) - set(reader.fieldnames or ()) - {"error"}
        if missing:
            raise ValueError(f"manifest {path}: missing columns {sorted(missing)}")
        return [ManifestRow(slide_id=r["slide_id"], label=int(r["label"]), split=r["split"], n_tiles=int(r["n_tiles"]),
                            status=r["status"], store=r["store"], source=r["source"], error=r.get("error") or "")
                for r in reader]


def select(rows: Iterable[ManifestRow], split: str | None = None) -> list[ManifestRow]:
    """The rows with tiles (status "ok"), of `split` when given, in manifest order."""
    return [r for r in rows if r.status == "ok" and r.n_tiles > 0 and (split is None or r.split == split)]
