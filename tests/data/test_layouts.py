"""PANDA, CAMELYON and external-CSV layouts."""
import collections

import pytest

from bigjax.data.layouts import NO_LABEL, camelyon_layout, csv_layout, panda_layout, stratified_split


def test_stratified_split_is_seeded_and_stratified():
    labels = [g for g in range(6) for _ in range(20)]
    a, b, c = stratified_split(labels, 0), stratified_split(labels, 0), stratified_split(labels, 1)
    assert a == b and a != c
    per_label = collections.Counter(zip(labels, a))
    for g in range(6):
        assert (per_label[g, "train"], per_label[g, "val"], per_label[g, "test"]) == (16, 2, 2)


def test_panda_layout_reads_csv_and_split_file(panda_dir, tmp_path):
    entries = panda_layout(panda_dir)
    assert sorted(e.label for e in entries) == [0, 1, 2, 3, 4, 5]
    assert all(e.path.is_file() and e.path.name == f"{e.slide_id}.tiff" for e in entries)
    splits = tmp_path / "splits.csv"
    splits.write_text("image_id,split\n" + "".join(f"{e.slide_id},{s}\n"
                                                    for e, s in zip(entries[:3], ["train", "val", "test"])))
    given = panda_layout(panda_dir, splits_csv=splits)
    assert [(e.slide_id, e.split) for e in given] == [(e.slide_id, s) for e, s in
                                                       zip(entries[:3], ["train", "val", "test"])]


def test_camelyon_layout_with_and_without_split(tmp_path):
    rows = [f"s{i}.tif,{i % 2}" for i in range(20)]
    plain = tmp_path / "c17.csv"
    plain.write_text("path,label\n" + "\n".join(rows) + "\n")
    entries = camelyon_layout(plain, n_val=4, seed=0)
    val = [e for e in entries if e.split == "val"]
    assert len(val) == 4 and sorted(e.label for e in val) == [0, 0, 1, 1]
    assert entries == camelyon_layout(plain, n_val=4, seed=0)
    assert entries[0].path == tmp_path / "s0.tif" and entries[0].slide_id == "s0"
    split = tmp_path / "c16.csv"
    split.write_text("slide_id,path,label,split\na,x/a.tif,1,test\nb,x/b.tif,0,train\n")
    assert [(e.slide_id, e.split, e.label) for e in camelyon_layout(split)] == [("a", "test", 1), ("b", "train", 0)]


def test_external_csv_defaults_to_unlabelled_test(tmp_path):
    path = tmp_path / "tcga.csv"
    path.write_text("path\n/data/TCGA-1.svs\n")
    (entry,) = csv_layout(path)
    assert (entry.slide_id, entry.label, entry.split) == ("TCGA-1", NO_LABEL, "test")
    path.write_text("slide\n")
    with pytest.raises(ValueError, match="tcga.csv"):
        csv_layout(path)


def panda_with(tmp_path, rows):
    (tmp_path / "train.csv").write_text("image_id,data_provider,isup_grade,gleason_score\n" + "".join(
        f"{i},karolinska,{g},0+0\n" for i, g in rows))
    return tmp_path


@pytest.mark.parametrize("grade", ["6", "-1", "abc", "", "2.5"])
def test_panda_grade_outside_0_to_5_names_file_line_column_value(tmp_path, grade):
    data = panda_with(tmp_path, [("a", 0), ("b", 3), ("c", grade)])
    with pytest.raises(ValueError) as error:
        panda_layout(data)
    assert str(error.value) == (f"layout file {data / 'train.csv'}, line 4, column isup_grade: {grade!r} is not a "
                                f"class label (an integer 0..5)")


def test_repeated_image_id_names_the_id_and_both_lines(tmp_path):
    data = panda_with(tmp_path, [("a", 0), ("b", 3), ("c", 1), ("b", 2)])
    with pytest.raises(ValueError, match=r"train.csv: image_id 'b' is repeated on lines 3 and 5"):
        panda_layout(data)
    panda_with(tmp_path, [("a", 0), ("b", 3)])
    splits = tmp_path / "splits.csv"
    splits.write_text("image_id,split\na,train\nb,val\na,test\n")
    with pytest.raises(ValueError, match=r"splits.csv: image_id 'a' is repeated on lines 2 and 4"):
        panda_layout(data, splits_csv=splits)
    splits.write_text("image_id,split\na,train\nb,valid\n")
    with pytest.raises(ValueError, match=r"splits.csv, line 3, column split: 'valid' is not one of"):
        panda_layout(data, splits_csv=splits)


def test_rows_with_missing_or_extra_fields(tmp_path):
    (tmp_path / "train.csv").write_text("image_id,isup_grade\na,1\nb\n")
    with pytest.raises(ValueError, match=r"line 3: fewer fields than the header's 2"):
        panda_layout(tmp_path)
    (tmp_path / "train.csv").write_text("image_id,isup_grade\na,1,x\n")
    with pytest.raises(ValueError, match=r"line 2: more fields than the header's 2"):
        panda_layout(tmp_path)


def test_camelyon_labels_are_binary_and_present_outside_test(tmp_path):
    path = tmp_path / "c16.csv"
    path.write_text("path,label,split\na.tif,1,train\nb.tif,2,train\n")
    with pytest.raises(ValueError, match=r"c16.csv, line 3, column label: '2' is not a class label \(an integer 0..1\)"):
        camelyon_layout(path)
    path.write_text("path,label,split\na.tif,1,train\nb.tif,,val\nc.tif,,test\n")
    with pytest.raises(ValueError, match=r"line 3, column label: empty, but slide 'b' is in split 'val'"):
        camelyon_layout(path)
    path.write_text("path,label,split\na.tif,1,train\nc.tif,,test\n")
    assert [e.label for e in camelyon_layout(path)] == [1, NO_LABEL]


def test_external_csv_labels_ids_and_splits_checked(tmp_path):
    path = tmp_path / "tcga.csv"
    path.write_text("path,label\nx/TCGA-1.svs,3\ny/TCGA-1.svs,4\n")
    with pytest.raises(ValueError, match=r"slide_id 'TCGA-1' is repeated on lines 2 and 3"):
        csv_layout(path)
    path.write_text("path,label\nTCGA-1.svs,abc\n")
    with pytest.raises(ValueError, match=r"tcga.csv, line 2, column label: 'abc' is not a class label"):
        csv_layout(path)
    path.write_text("path,label\nTCGA-1.svs,6\n")
    with pytest.raises(ValueError, match=r"'6' is not a class label \(an integer 0..5\)"):
        csv_layout(path, n_classes=6)
    assert csv_layout(path)[0].label == 6
    path.write_text("path,split\nTCGA-1.svs,tset\n")
    with pytest.raises(ValueError, match=r"line 2, column split: 'tset' is not one of"):
        csv_layout(path)


def test_camelyon_layout_without_validation_slides(tmp_path):
    plain = tmp_path / "c17.csv"
    plain.write_text("path,label\n" + "\n".join(f"s{i}.tif,{i % 2}" for i in range(4)) + "\n")
    assert {e.split for e in camelyon_layout(plain, n_val=0)} == {"train"}  # was a ZeroDivisionError
