"""A tiny generated PANDA-like tile store shared by the training tests (built once per session)."""

import csv

import pytest

from bigjax.data import layouts
from bigjax.data.synthetic import make_panda_like
from bigjax.data.tiling import TilingConfig, tile_dataset

SPLITS = ["train"] * 8 + ["val"] * 2 + ["test"] * 2


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    """12 small generated slides tiled at 16 px: 8 train, 2 val, 2 test."""
    root = tmp_path_factory.mktemp("panda")
    data = make_panda_like(root / "data", n_slides=len(SPLITS), seed=0, side=(64, 96), workers=1)
    with open(data / "train.csv") as f:
        ids = [row["image_id"] for row in csv.DictReader(f)]
    with open(root / "splits.csv", "w") as f:
        f.write("image_id,split\n" + "".join(f"{i},{s}\n" for i, s in zip(ids, SPLITS)))
    slides = layouts.panda_layout(data, splits_csv=root / "splits.csv")
    tile_dataset(slides, root / "store", TilingConfig(tile_size=16), progress=False)
    return root / "store"


