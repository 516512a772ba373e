"""Labels for slides predicted from files (``experiments.predict --labels=FILE``), checked before any work.

A label table is a CSV with a header, in one of the forms a pathology user already has:

- ``slide_id,label`` (other columns ignored): the label a class index (``0``..``C-1``) or a class name
  of the run (``bigjax.train.prediction_files.class_names``: ISUP grades ``0``..``5`` for PANDA,
  ``normal`` / ``tumour`` for CAMELYON, where ``tumor``, ``negative`` and ``positive`` are accepted too,
  any case: CAMELYON16's reference lists ``Tumor`` / ``Normal``);
- PANDA's ``train.csv`` (``image_id``, ..., ``isup_grade``): the ISUP grade; a CAMELYON-task run given
  ISUP grades (the generated stand-in) labels a slide tumour when its grade is at least ``grade_cut``.

An empty label leaves that slide unlabelled. Which rows must name a slide being predicted: when every
predicted slide gets a label, the table may list more slides (PANDA's train.csv lists 10,616); when
some predicted slides get none, a row naming a slide that is not predicted is refused, since the ids
then most likely do not match (a typo, a suffix, another data set).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from bigjax.data import layouts
from bigjax.errors import UserError

__all__ = ["read_labels", "ID_COLUMNS", "LABEL_COLUMNS"]

ID_COLUMNS = ("slide_id", "image_id")
LABEL_COLUMNS = ("label", "isup_grade")
ALIASES = {"tumor": "tumour", "positive": "tumour", "negative": "normal"}


def read_labels(path: str | os.PathLike, slide_ids: Sequence[str], names: Sequence[str], *,
                grade_cut: int | None = None) -> dict[str, int]:
    """slide_id -> class index for the predicted ``slide_ids`` that the table labels.

    Args:
      path: the label CSV (see the module doc).
      slide_ids: the slides being predicted.
      names: the run's class names, index = class.
      grade_cut: for a two-class run given an ``isup_grade`` column: grade >= grade_cut is class 1.
    Raises:
      UserError: one line naming the file (and row) for a missing file or column, a repeated or
        unknown slide id, or a label that is not one of the run's classes.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--labels={path}: no such file")
    try:  # the layouts' reader: (line, row) pairs, every row as many fields as the header
        rows = layouts.read_csv(path, ())
    except ValueError as err:
        raise UserError(f"--labels={path}: {err}") from err
    header = list(rows[0][1])
    id_col = next((c for c in ID_COLUMNS if c in header), None)
    label_col = next((c for c in LABEL_COLUMNS if c in header), None)
    if id_col is None or label_col is None:
        raise UserError(f"--labels={path}: needs a column {' or '.join(ID_COLUMNS)} and a column "
                        f"{' or '.join(LABEL_COLUMNS)} (has {', '.join(header) or 'no header'})")
    lookup = _label_lookup(names, grades=label_col == "isup_grade", grade_cut=grade_cut)
    wanted, labels, unknown, seen = set(slide_ids), {}, None, {}
    for line, row in rows:
        slide_id, value = row[id_col].strip(), row[label_col].strip()
        if slide_id in seen:
            raise UserError(f"--labels={path}, line {line}: slide {slide_id!r} is also on line {seen[slide_id]}")
        seen[slide_id] = line
        if slide_id not in wanted:
            unknown = unknown or (line, slide_id)
            continue
        if value:
            if value.lower() not in lookup:
                raise UserError(f"--labels={path}, line {line}, column {label_col}: {value!r} is not a class of "
                                f"this run (one of {', '.join(names)}{' or its index' if not _digits(names) else ''})")
            labels[slide_id] = lookup[value.lower()]
    if unknown is not None and len(labels) < len(wanted):
        line, slide_id = unknown
        raise UserError(f"--labels={path}, line {line}: slide {slide_id!r} is not among the {len(wanted)} slides "
                        f"predicted (e.g. {', '.join(sorted(wanted)[:3])}), and {len(wanted) - len(labels)} of "
                        "those have no label here: do the ids match?")
    return labels


def _digits(names: Sequence[str]) -> bool:
    return all(n.isdigit() for n in names)


def _label_lookup(names: Sequence[str], *, grades: bool, grade_cut: int | None) -> dict[str, int]:
    """Accepted label text (lower case) -> class index."""
    if grades and len(names) == 2 and grade_cut is not None:
        return {str(g): int(g >= grade_cut) for g in range(6)}
    lookup = {str(i): i for i in range(len(names))}
    if not grades:
        lookup.update({n.lower(): i for i, n in enumerate(names)})
        lookup.update({alias: lookup[name] for alias, name in ALIASES.items() if name in lookup})
    return lookup
