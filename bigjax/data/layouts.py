"""Data set layouts: turn a folder or CSV into the list of slides to tile (`SlideEntry`).

- PANDA: `train.csv` (image_id, data_provider, isup_grade, gleason_score) + `train_images/<id>.tiff`;
  label = ISUP grade 0-5; splits from a CSV (image_id, split) when given, else a seeded
  label-stratified 80:10:10.
- CAMELYON16/17: a CSV of slide paths and binary labels with a split column; without one, the
  rows are the training set and `n_val` (50 in the paper) label-stratified slides become "val".
- External test sets (TCGA-PRAD, CAMELYON16): `csv_layout`, every slide in split "test" unless
  the CSV says otherwise.

Every row is checked where it is read: a bad value raises ValueError naming the file, the line (1-based,
the header is line 1), the column and the value; a repeated id names the id and both lines.
"""
from __future__ import annotations

import csv
import dataclasses
import os
from pathlib import Path

import numpy as np

from bigjax.data.manifest import NO_LABEL, SPLITS

ISUP_GRADES = 6  # PANDA labels 0..5


@dataclasses.dataclass(frozen=True)
class SlideEntry:
    """One slide to tile: its id, file, integer label (NO_LABEL if unknown) and split."""

    slide_id: str
    path: Path
    label: int
    split: str


def panda_layout(data_dir: str | os.PathLike, *, splits_csv: str | os.PathLike | None = None, seed: int = 0,
                 fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> list[SlideEntry]:
    """PANDA slides with ISUP grades as labels.

    Args:
      data_dir: folder with train.csv and train_images/.
      splits_csv: CSV with columns image_id, split (train/val/test), e.g. the split of Song et al. 2024;
        slides it does not list are left out.
      seed: seed of the stratified split used when `splits_csv` is None.
      fractions: train/val/test fractions of that split.
    """
    data_dir = Path(data_dir)
    table = data_dir / "train.csv"
    rows = read_csv(table, ("image_id", "isup_grade"))
    ids = _unique_ids(table, rows, "image_id")
    labels = [_label(table, line, row, "isup_grade", ISUP_GRADES) for line, row in rows]
    if splits_csv is not None:
        split_rows = read_csv(Path(splits_csv), ("image_id", "split"))
        given = dict(zip(_unique_ids(splits_csv, split_rows, "image_id"),
                         (_split(splits_csv, line, row["split"]) for line, row in split_rows)))
        splits = [given.get(i) for i in ids]
    else:
        splits = stratified_split(labels, seed, fractions)
    return [SlideEntry(i, data_dir / "train_images" / f"{i}.tiff", y, s)
            for i, y, s in zip(ids, labels, splits) if s is not None]


def camelyon_layout(csv_path: str | os.PathLike, *, root: str | os.PathLike | None = None, n_val: int = 50,
                    seed: int = 0) -> list[SlideEntry]:
    """CAMELYON16/17 slides with binary labels (1 = metastasis).

    Args:
      csv_path: CSV with columns path, label and optionally slide_id and split (e.g. the reprocessed
        labels of Ling et al. 2025).
      root: folder that relative paths are under (default: the CSV's folder).
      n_val: without a split column, this many label-stratified slides go to "val", the rest to "train".
      seed: seed of that draw.
    """
    rows = read_csv(Path(csv_path), ("path", "label"))
    entries = csv_layout(csv_path, root=root, split="train", n_classes=2)
    for (line, _), e in zip(rows, entries):
        if e.label == NO_LABEL and e.split != "test":
            raise ValueError(f"layout file {csv_path}, line {line}, column label: empty, but slide "
                             f"{e.slide_id!r} is in split {e.split!r} (only test slides may be unlabelled)")
    if "split" in rows[0][1]:
        return entries
    val = set(_stratified_pick([e.label for e in entries], n_val, seed))
    return [dataclasses.replace(e, split="val" if k in val else "train") for k, e in enumerate(entries)]


def csv_layout(csv_path: str | os.PathLike, *, root: str | os.PathLike | None = None,
               split: str = "test", n_classes: int | None = None) -> list[SlideEntry]:
    """Slides listed in a CSV (columns path, and optionally slide_id, label, split): an external test set.

    Args:
      csv_path: the CSV; slide_id defaults to the file name without suffix, an empty label to NO_LABEL.
      root: folder that relative paths are under (default: the CSV's folder).
      split: split of rows without a split column.
      n_classes: labels must lie in 0..n_classes-1 (default: any integer >= 0).
    """
    csv_path = Path(csv_path)
    root = Path(root) if root is not None else csv_path.parent
    rows = read_csv(csv_path, ("path",))
    for line, row in rows:
        if not row.get("slide_id"):
            row["slide_id"] = Path(row["path"]).stem
    _unique_ids(csv_path, rows, "slide_id")
    return [SlideEntry(row["slide_id"], root / row["path"],
                       _label(csv_path, line, row, "label", n_classes) if row.get("label") else NO_LABEL,
                       _split(csv_path, line, row.get("split") or split))
            for line, row in rows]


def stratified_split(labels, seed: int, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> list[str]:
    """Seeded label-stratified split: per label, val and test get round(fraction × count), train the rest."""
    labels = np.asarray(labels)
    splits = np.empty(len(labels), dtype=object)
    rng = np.random.default_rng(seed)
    shares = np.asarray(fractions, float) / np.sum(fractions)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_val, n_test = (int(np.rint(share * len(members))) for share in shares[1:])
        n_train = len(members) - n_val - n_test
        splits[members[:n_train]] = "train"
        splits[members[n_train:n_train + n_val]] = "val"
        splits[members[n_train + n_val:]] = "test"
    return list(splits)


def _stratified_pick(labels, n: int, seed: int) -> list[int]:
    """Indices of `n` items drawn without replacement, in proportion to each label's share."""
    if n <= 0:
        return []
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(np.flatnonzero(labels == y)) for y in np.unique(labels)])
    # every len/n-th item of the label-grouped permutation keeps label proportions
    step = len(order) / min(n, len(order))
    return [int(order[int(k * step)]) for k in range(min(n, len(order)))]


def read_csv(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict]]:
    """(line, row) pairs of a CSV with a header; every row has exactly the header's fields."""
    if not path.is_file():
        raise FileNotFoundError(f"layout file {path} not found")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = [(reader.line_num, row) for row in reader]
        header = reader.fieldnames or []
    if not rows:
        raise ValueError(f"layout file {path}: no rows")
    missing = set(required) - set(header)
    if missing:
        raise ValueError(f"layout file {path}: missing columns {sorted(missing)} (has {sorted(header)})")
    for line, row in rows:  # csv.DictReader keys extra fields by None and fills missing ones with None
        if None in row or None in row.values():
            raise ValueError(f"layout file {path}, line {line}: {'more' if None in row else 'fewer'} fields "
                             f"than the header's {len(header)}")
    return rows


def _label(path, line: int, row: dict, column: str, n_classes: int | None) -> int:
    """The integer label in ``row[column]``, in 0..n_classes-1 (any value >= 0 without n_classes)."""
    value = row[column]
    try:
        label = int(value.strip())
    except ValueError:
        label = None
    if label is None or label < 0 or (n_classes is not None and label >= n_classes):
        allowed = f"0..{n_classes - 1}" if n_classes is not None else ">= 0"
        raise ValueError(f"layout file {path}, line {line}, column {column}: {value!r} is not a class label "
                         f"(an integer {allowed})")
    return label


def _split(path, line: int, split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"layout file {path}, line {line}, column split: {split!r} is not one of {SPLITS}")
    return split


def _unique_ids(path, rows: list[tuple[int, dict]], column: str) -> list[str]:
    """The ids in ``column``, each non-empty and on one line only."""
    first: dict[str, int] = {}
    for line, row in rows:
        slide_id = row[column].strip()
        if not slide_id:
            raise ValueError(f"layout file {path}, line {line}, column {column}: empty")
        if slide_id in first:
            raise ValueError(f"layout file {path}: {column} {slide_id!r} is repeated on lines "
                             f"{first[slide_id]} and {line}")
        first[slide_id] = line
    return list(first)
