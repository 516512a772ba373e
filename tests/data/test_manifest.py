"""Manifest rows round-trip, and every bad row is named by file, line, column and value."""

import dataclasses

import pytest

from bigjax.data.manifest import FIELDS, ManifestRow, read_manifest, require_splits, select, write_manifest

ROWS = [ManifestRow("a", 0, "train", 12, "ok", "a", "/s/a.tiff"),
        ManifestRow("b", 5, "val", 0, "empty", "b", "/s/b.tiff"),
        ManifestRow("c", -1, "test", 0, "failed", "c", "/s/c.tiff", "not a TIFF")]


def test_round_trip_and_select(tmp_path):
    path = write_manifest(tmp_path / "manifest.csv", ROWS)
    assert read_manifest(path, n_classes=6) == ROWS
    assert select(ROWS) == ROWS[:1] and select(ROWS, "val") == []


def with_row(tmp_path, **change):
    rows = [ROWS[0], dataclasses.replace(ROWS[1], **change)]
    path = tmp_path / "manifest.csv"
    path.write_text(",".join(FIELDS) + "\n" + "".join(
        ",".join(str(v) for v in dataclasses.astuple(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("change, n_classes, message", [
    ({"label": "abc"}, None, r"column label: 'abc' is not a class label \(an integer >= 0, or -1 for none\)"),
    ({"label": ""}, None, "column label: '' is not a class label"),
    ({"label": "-2"}, None, "column label: '-2' is not a class label"),
    ({"label": "6"}, 6, r"column label: '6' is not a class label \(an integer 0..5, or -1 for none\)"),
    ({"label": "-1"}, None, "column label: slide 'b' of split 'val' has no label"),
    ({"n_tiles": "-3"}, None, r"column n_tiles: '-3' is not a tile count \(an integer >= 0\)"),
    ({"split": "validation"}, None, "column split: 'validation' is not one of"),
    ({"status": "done"}, None, "column status: 'done' is not one of"),
])
def test_bad_values_name_file_line_column_value(tmp_path, change, n_classes, message):
    path = with_row(tmp_path, **change)
    with pytest.raises(ValueError, match=f"manifest {path}, line 3, {message}"):
        read_manifest(path, n_classes=n_classes)


def test_repeated_slide_and_missing_file(tmp_path):
    path = with_row(tmp_path, slide_id="a")
    with pytest.raises(ValueError, match=r"slide_id 'a' is repeated on lines 2 and 3"):
        read_manifest(path)
    with pytest.raises(FileNotFoundError, match="tile the slides first"):
        read_manifest(tmp_path / "none.csv")


def test_require_splits_before_any_work():
    rows = [dataclasses.replace(ROWS[0], slide_id=f"t{i}") for i in range(24)] + ROWS[1:]
    require_splits(rows, ["train"])
    with pytest.raises(ValueError, match=r"^no tiled slide in splits val, test \(tiled slides: train 24, val 0, "
                                         r"test 0; 1 failed, 1 without tissue\); pass --splits_csv$"):
        require_splits(rows, ["train", "val", "test"], hint="pass --splits_csv")
    with pytest.raises(ValueError, match=r"^no tiled slide in split val \(tiled slides: train 1, val 0, test 0; "
                                         r"1 failed, 1 without tissue\)$"):
        require_splits(ROWS, ["train", "val"])
