"""Small generated PANDA-like slides and their tile store, shared by the data tests."""
from pathlib import Path

import pytest

from bigjax.data.layouts import panda_layout
from bigjax.data.synthetic import make_panda_like
from bigjax.data.tiling import TilingConfig, tile_dataset

TILE = 32


@pytest.fixture(scope="session")
def panda_dir(tmp_path_factory) -> Path:
    """Six generated slides (one per grade), 256-384 px a side."""
    return make_panda_like(tmp_path_factory.mktemp("panda"), n_slides=6, seed=3, side=(256, 384), workers=1)


@pytest.fixture(scope="session")
def store_dir(panda_dir, tmp_path_factory) -> Path:
    """`panda_dir` tiled at 32 px with the PANDA rule."""
    root = tmp_path_factory.mktemp("store")
    tile_dataset(panda_layout(panda_dir, seed=0), root, TilingConfig(tile_size=TILE), progress=False)
    return root
