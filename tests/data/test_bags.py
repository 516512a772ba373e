"""Bags: reproducible from (seed, epoch), resumable mid-epoch, evaluation streams, prefetch."""
import numpy as np
import pytest

from bigjax.data.bags import bag_indices, epoch_order, eval_chunks, eval_draws, prefetch, train_bags
from bigjax.data.manifest import read_manifest, select
from bigjax.data.store import TileStore


@pytest.fixture()
def data(store_dir):
    return TileStore(store_dir), select(read_manifest(store_dir / "manifest.csv"))


def _summary(bags):
    return [(b.slide_id, b.label, b.indices.tolist(), b.tiles.tobytes(), b.aug) for b in bags]


def test_bag_indices_replacement_only_when_short():
    few = bag_indices(10, 32, seed=0, epoch=0, slide_index=3)
    assert len(few) == 32 and set(few) == set(range(10))
    many = bag_indices(100, 32, seed=0, epoch=0, slide_index=3)
    assert len(np.unique(many)) == 32
    np.testing.assert_array_equal(many, bag_indices(100, 32, seed=0, epoch=0, slide_index=3))
    assert not np.array_equal(many, bag_indices(100, 32, seed=0, epoch=1, slide_index=3))
    assert not np.array_equal(many, bag_indices(100, 32, seed=0, epoch=0, slide_index=4))


def test_train_bags_reproducible_from_seed_and_epoch(data):
    store, slides = data
    first = _summary(train_bags(store, slides, k=16, seed=5, epoch=2))
    assert first == _summary(train_bags(store, slides, k=16, seed=5, epoch=2))
    assert [s for s, *_ in first] == [slides[i].slide_id for i in epoch_order(len(slides), 5, 2)]
    other = _summary(train_bags(store, slides, k=16, seed=5, epoch=3))
    assert [x[2] for x in other] != [x[2] for x in first]
    for bag in train_bags(store, slides, k=16, seed=5, epoch=2):
        np.testing.assert_array_equal(bag.tiles, store.read(bag.slide_id, bag.indices))


def test_resume_mid_epoch_gives_the_rest(data):
    store, slides = data
    full = _summary(train_bags(store, slides, k=8, seed=1, epoch=0))
    assert _summary(train_bags(store, slides, k=8, seed=1, epoch=0, start=4)) == full[4:]


def test_eval_chunks_cover_every_tile_once(data):
    store, slides = data
    chunks = list(eval_chunks(store, slides[:2], chunk=40))
    for row in slides[:2]:
        mine = [c for c in chunks if c.slide_id == row.slide_id]
        assert [c.start for c in mine] == list(range(0, row.n_tiles, 40))
        np.testing.assert_array_equal(np.concatenate([c.tiles for c in mine]),
                                      store.read(row.slide_id, np.arange(row.n_tiles)))


def test_eval_draws_repeat_and_reproduce(data):
    store, slides = data
    draws = list(eval_draws(store, slides, k=8, repeats=3, seed=0))
    assert [(b.slide_id, b.draw) for b in draws] == [(s.slide_id, r) for s in slides for r in range(3)]
    assert _summary(draws) == _summary(eval_draws(store, slides, k=8, repeats=3, seed=0))
    assert len({tuple(b.indices) for b in draws[:3]}) == 3


def test_prefetch_reraises_and_stops_early():
    def failing():
        yield 1
        raise RuntimeError("disk on fire")

    stream = prefetch(failing())
    assert next(stream) == 1
    with pytest.raises(RuntimeError, match="disk on fire"):
        next(stream)
    endless = prefetch(iter(range(10**9)), depth=2)
    assert [next(endless) for _ in range(3)] == [0, 1, 2]
    endless.close()  # joins the producer thread; must not hang
