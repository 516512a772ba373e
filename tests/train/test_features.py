"""The cache of precomputed embeddings: one slide id in two stores is two entries, not one."""

import shutil

import numpy as np

from bigjax.data.store import TileStore
from bigjax.train.features import FeatureCache


def constant(value):
    return lambda tiles: np.full((len(tiles), 2), value, np.float32)


def test_a_slide_of_another_store_with_the_same_id_is_embedded_anew(store, tmp_path):
    training = TileStore(store)
    external = TileStore(shutil.copytree(store, tmp_path / "external"))  # same slide ids
    rows = training.slides("test")
    cache = FeatureCache(tmp_path / "features")
    cache.fill(constant(1.0), training, rows, progress=False)
    assert np.all(cache.features(rows[0].slide_id) == 1.0)
    cache.fill(constant(2.0), external, external.slides("test"), progress=False)
    assert np.all(cache.features(rows[0].slide_id) == 2.0)  # not the training store's embeddings
    assert cache.features(rows[0].slide_id).shape == (rows[0].n_tiles, 2)
    cache.fill(constant(3.0), external, external.slides("test"), progress=False)  # cached now
    assert np.all(cache.features(rows[0].slide_id, [0]) == 2.0)
