"""PANDA label masks of the generated set: PANDA's format, the Radboud mapping, per-tile tumour shares."""
import csv

import numpy as np
import pytest
import tifffile

from bigjax.data.masks import mask_path, providers, tile_tumour_fraction
from bigjax.data.synthetic import image_id, make_planted, radboud_labels, render_slide


def test_every_generated_slide_has_a_radboud_mask_in_pandas_format(panda_dir):
    with open(panda_dir / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert set(providers(panda_dir).values()) == {"radboud"}
    for row in rows:
        image = panda_dir / "train_images" / f"{row['image_id']}.tiff"
        path = mask_path(image, row["image_id"])
        assert path == panda_dir / "train_label_masks" / f"{row['image_id']}_mask.tiff"
        with tifffile.TiffFile(path) as mask, tifffile.TiffFile(image) as slide:
            levels = [lvl.shape for lvl in mask.series[0].levels]
            assert levels == [lvl.shape for lvl in slide.series[0].levels]  # the image's levels
            labels = mask.series[0].levels[0].asarray()
        assert labels.dtype == np.uint8 and not labels[..., 1:].any()  # the label in red only
        present = set(np.unique(labels[..., 0]))
        grade = int(row["isup_grade"])
        assert present <= {0, 1, 3, 4, 5} and (grade == 0) == (present <= {0, 1})
        assert (5 in present) <= (grade == 5)


def test_radboud_mapping_of_the_generators_regions():
    _, masks = render_slide(np.random.default_rng(2), 5, 192, 192)
    labels = radboud_labels(masks, 5)
    np.testing.assert_array_equal(labels == 0, ~masks["tissue"])
    np.testing.assert_array_equal(labels == 1, masks["tissue"] & ~masks["tumour"])
    np.testing.assert_array_equal(labels == 3, masks["tumour"] & ~masks["disordered"])
    np.testing.assert_array_equal(labels == 5, masks["disordered"])  # grade 5: pattern 5
    assert (radboud_labels(masks, 4) == 4).sum() == masks["disordered"].sum()


def test_tile_tumour_fraction_of_a_planted_rectangle(tmp_path):
    out = make_planted(tmp_path, (48, 80, 112, 176), shape=(256, 256))
    path = mask_path(out / "train_images" / f"{image_id(0, 0)}.tiff", image_id(0, 0))
    coords = np.array([(y, x) for y in range(0, 256, 32) for x in range(0, 256, 32)])
    fraction = tile_tumour_fraction(path, coords, 32).reshape(8, 8)
    expected = np.zeros((256, 256))
    expected[48:112, 80:176] = 1
    np.testing.assert_allclose(fraction, expected.reshape(8, 32, 8, 32).mean(axis=(1, 3)), atol=1e-12)
    # Karolinska masks call label 2 cancer: this Radboud mask then holds none
    assert tile_tumour_fraction(path, coords, 32, "karolinska").max() == 0
    with pytest.raises(ValueError, match="data_provider 'unknown'"):
        tile_tumour_fraction(path, coords, 32, "unknown")
