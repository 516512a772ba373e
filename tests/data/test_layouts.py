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
