"""bigjax.train.prediction_labels: label tables for predicted slides, and every bad one refused in one line."""
import pytest

from bigjax.errors import UserError
from bigjax.train.prediction_labels import read_labels

PANDA = [str(g) for g in range(6)]
CAMELYON = ["normal", "tumour"]


def _csv(tmp_path, text, name="labels.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_indexes_names_and_empty_labels(tmp_path):
    path = _csv(tmp_path, "slide_id,label,note\na,Tumor,x\nb,0,\nc,,unknown\nd,NORMAL,\ne,positive,\n")
    assert read_labels(path, ["a", "b", "c", "d", "e"], CAMELYON) == {"a": 1, "b": 0, "d": 0, "e": 1}
    assert read_labels(_csv(tmp_path, "slide_id,label\na,5\nb,0\n"), ["a", "b"], PANDA) == {"a": 5, "b": 0}


def test_panda_train_csv_may_list_more_slides_and_isup_grades_cut_for_two_classes(tmp_path):
    path = _csv(tmp_path, "image_id,data_provider,isup_grade,gleason_score\na,radboud,4,4+4\n"
                          "b,karolinska,2,3+4\nz,radboud,0,0+0\n", "train.csv")
    assert read_labels(path, ["a", "b"], PANDA) == {"a": 4, "b": 2}  # z is another slide of the data set
    assert read_labels(path, ["a", "b"], CAMELYON, grade_cut=3) == {"a": 1, "b": 0}


@pytest.mark.parametrize("text, names, match", [
    ("slide_id,grade\na,1\n", PANDA, r"labels.csv: needs a column slide_id or image_id and a column label or "
                                     r"isup_grade \(has slide_id, grade\)"),
    ("slide_id,label\na,1\nb,6\n", PANDA, r"labels.csv, line 3, column label: '6' is not a class of this run "
                                          r"\(one of 0, 1, 2, 3, 4, 5\)"),
    ("slide_id,label\na,tumour\n", PANDA, r"line 2, column label: 'tumour' is not a class"),
    ("image_id,isup_grade\na,normal\n", CAMELYON, r"line 2, column isup_grade: 'normal' is not a class of this "
                                                  r"run \(one of normal, tumour or its index\)"),
    ("slide_id,label\na,1\na,2\n", PANDA, r"line 3: slide 'a' is also on line 2"),
    ("slide_id,label\na,1\nb,2,3\n", PANDA, r"labels.csv, line 3: more fields than the header's 2"),
    ("slide_id,label\n", PANDA, r"labels.csv: no rows"),
    ("slide_id,label\na,1\nb.tiff,2\n", PANDA, r"line 3: slide 'b.tiff' is not among the 2 slides predicted "
                                               r"\(e.g. a, b\), and 1 of those have no label here"),
])
def test_bad_tables_are_one_line_naming_file_and_row(tmp_path, text, names, match):
    with pytest.raises(UserError, match=match) as err:
        read_labels(_csv(tmp_path, text), ["a", "b"], names, grade_cut=3)
    assert "\n" not in str(err.value) and str(err.value).startswith(f"--labels={tmp_path / 'labels.csv'}")


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_labels(tmp_path / "nope.csv", ["a"], PANDA)
