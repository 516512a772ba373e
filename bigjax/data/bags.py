"""Bags of tiles for training and evaluation, reproducible from the seed and read ahead of use.

Every random choice is a pure function of integers, so a resumed run sees the same data:

- slide order of an epoch: `epoch_order(n_slides, seed, epoch)`;
- a training bag's tiles: `bag_indices(n_tiles, k, seed, epoch, slide_index)` (K distinct tiles;
  when the slide has fewer than K, every tile repeated evenly);
- its augmentation: `slide_rng(seed, epoch, slide_index, AUGMENT)`;
- evaluation draw r of a slide: `bag_indices(n_tiles, k, seed, EVAL_EPOCH, slide_index, draw=r)`.

`slide_index` is the slide's position in the `slides` list passed in (manifest order).
Reads are issued as tensorstore futures `read_ahead` bags before they are needed, and the whole
stream runs in a background thread (`prefetch`), so the training step does not wait on I/O.
"""
from __future__ import annotations

import collections
import queue
import threading
import time
from functools import partial
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np

from bigjax.data.augment import AugmentConfig, AugmentParams, sample_params
from bigjax.data.manifest import ManifestRow
from bigjax.data.store import TileStore

TILES, AUGMENT, ORDER = 0, 1, 2  # independent random streams of one (seed, epoch, slide)
EVAL_EPOCH = -1  # the "epoch" of evaluation draws, apart from every training epoch


class Bag(NamedTuple):
    """K tiles of one slide with its label; `aug` is the slide's augmentation draw (None when off)."""

    tiles: np.ndarray  # uint8 (K, T, T, 3)
    label: int
    slide_id: str
    indices: np.ndarray  # int64 (K,), tile indices in the slide
    aug: AugmentParams | None = None
    draw: int = 0


class Chunk(NamedTuple):
    """Consecutive tiles [start, start + len(tiles)) of a slide with n_tiles tiles (the last chunk ends at n_tiles)."""

    tiles: np.ndarray  # uint8 (n, T, T, 3)
    label: int
    slide_id: str
    start: int
    n_tiles: int


def slide_rng(seed: int, epoch: int, slide_index: int, stream: int, draw: int = 0) -> np.random.Generator:
    """The generator of one (seed, epoch, slide, stream, draw): the same integers give the same numbers."""
    return np.random.default_rng([seed, epoch + 1, slide_index, stream, draw])


def epoch_order(n_slides: int, seed: int, epoch: int) -> np.ndarray:
    """The order slides are visited in `epoch`: a permutation of range(n_slides)."""
    return np.random.default_rng([seed, epoch + 1, ORDER]).permutation(n_slides)


def bag_indices(n_tiles: int, k: int, seed: int, epoch: int, slide_index: int, draw: int = 0) -> np.ndarray:
    """K tile indices of one slide, sorted (for read locality).

    With n_tiles >= k: k distinct tiles. With fewer, tiles repeat evenly: every tile k // n_tiles
    times, and k % n_tiles distinct tiles once more, so no tile of a small slide is left out.
    """
    if n_tiles <= 0:
        raise ValueError(f"slide {slide_index}: cannot draw a bag from {n_tiles} tiles")
    rng = slide_rng(seed, epoch, slide_index, TILES, draw)
    repeats, extra = divmod(k, n_tiles)
    chosen = np.concatenate([np.tile(np.arange(n_tiles), repeats), rng.choice(n_tiles, size=extra, replace=False)])
    return np.sort(chosen)


def train_bags(store: TileStore, slides: Sequence[ManifestRow], *, k: int, seed: int, epoch: int, start: int = 0,
               augment: AugmentConfig | None = AugmentConfig(), read_ahead: int = 4) -> Iterator[Bag]:
    """One epoch of training bags, one per slide, in `epoch_order`; run in a prefetch thread.

    Args:
      store: the tile store.
      slides: the training slides (e.g. `manifest.select(rows, "train")`); all must have tiles.
      k: tiles per bag (256 PANDA, 512 CAMELYON).
      seed, epoch: determine order, tiles and augmentation.
      start: skip the first `start` bags of the epoch (to resume mid-epoch) without reading them.
      augment: ranges of the per-slide augmentation draw put in `Bag.aug`; None for no draw.
      read_ahead: bags whose reads are in flight (and queued) ahead of the consumer.
    """
    order = epoch_order(len(slides), seed, epoch)[start:]

    def plan():
        for i in order:
            row = slides[i]
            indices = bag_indices(row.n_tiles, k, seed, epoch, int(i))
            aug = None if augment is None else sample_params(slide_rng(seed, epoch, int(i), AUGMENT), augment)
            yield row, indices, partial(Bag, label=row.label, slide_id=row.slide_id, indices=indices, aug=aug)

    return prefetch(_read_in_order(store, plan(), read_ahead), read_ahead)


def eval_draws(store: TileStore, slides: Sequence[ManifestRow], *, k: int, repeats: int, seed: int,
               read_ahead: int = 4) -> Iterator[Bag]:
    """R repeated random K-tile bags per slide (100 × 256 PANDA, 10 × 2048 CAMELYON), slide by slide.

    Bag.draw is the repeat number; draws do not depend on any training epoch.
    """
    def plan():
        for i, row in enumerate(slides):
            for r in range(repeats):
                indices = bag_indices(row.n_tiles, k, seed, EVAL_EPOCH, i, draw=r)
                yield row, indices, partial(Bag, label=row.label, slide_id=row.slide_id, indices=indices, draw=r)

    return prefetch(_read_in_order(store, plan(), read_ahead), read_ahead)


def eval_chunks(store: TileStore, slides: Sequence[ManifestRow], *, chunk: int = 4096,
                read_ahead: int = 2) -> Iterator[Chunk]:
    """Every tile of every slide, in order, streamed in chunks of at most `chunk` tiles."""
    def plan():
        for row in slides:
            for start in range(0, row.n_tiles, chunk):
                indices = np.arange(start, min(start + chunk, row.n_tiles))
                yield row, indices, partial(Chunk, label=row.label, slide_id=row.slide_id, start=start,
                                            n_tiles=row.n_tiles)

    return prefetch(_read_in_order(store, plan(), read_ahead), read_ahead)


def prefetch(items: Iterable, depth: int = 4) -> Iterator:
    """Iterate `items` in a background thread, keeping up to `depth` ready; errors are re-raised here."""
    ready: queue.Queue = queue.Queue(maxsize=max(depth, 1))
    stop = threading.Event()
    done = object()

    def produce():
        try:
            for item in items:
                if not _put(ready, (None, item), stop):
                    return
            _put(ready, (None, done), stop)
        except BaseException as err:  # hand any failure to the consumer
            _put(ready, (err, None), stop)

    thread = threading.Thread(target=produce, name="bigjax-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            err, item = ready.get()
            if err is not None:
                raise err
            if item is done:
                return
            yield item
    finally:
        stop.set()
        thread.join()  # reads in flight finish before the caller (or the interpreter) moves on


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Put unless the consumer has gone away; False when it has."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


def _read_in_order(store: TileStore, plan: Iterable[tuple[ManifestRow, np.ndarray, Callable]],
                   read_ahead: int) -> Iterator:
    """For each planned (row, indices, make), start the read `read_ahead` items early; yield make(tiles) in order."""
    pending: collections.deque = collections.deque()
    for row, indices, make in plan:
        pending.append((store.read_async(row.slide_id, indices), make))
        if len(pending) > read_ahead:
            future, make_first = pending.popleft()
            yield make_first(future.result())
    while pending:
        future, make_first = pending.popleft()
        yield make_first(future.result())


def measure_bag_reads(store: TileStore, slides: Sequence[ManifestRow], *, k: int = 256, n_bags: int = 64,
                      seed: int = 0, read_ahead: int = 4) -> dict:
    """Throughput of reading random K-tile training bags (no augmentation) from `store`.

    Returns:
      dict with bags, tiles, unique_tiles (tiles actually read: a slide with fewer than K tiles repeats
      them), seconds, tiles_per_s, unique_tiles_per_s, mb_per_s (MB = 1e6 bytes of bag tiles).
    """
    bags = n_tiles = n_unique = n_bytes = 0
    start = time.perf_counter()
    epoch = 0
    while bags < n_bags:
        for bag in train_bags(store, slides, k=k, seed=seed, epoch=epoch, augment=None, read_ahead=read_ahead):
            bags, n_tiles, n_bytes = bags + 1, n_tiles + len(bag.tiles), n_bytes + bag.tiles.nbytes
            n_unique += len(np.unique(bag.indices))
            if bags == n_bags:
                break
        epoch += 1
    seconds = time.perf_counter() - start
    return {"bags": bags, "tiles": n_tiles, "unique_tiles": n_unique, "seconds": round(seconds, 3),
            "tiles_per_s": round(n_tiles / seconds), "unique_tiles_per_s": round(n_unique / seconds),
            "mb_per_s": round(n_bytes / seconds / 1e6)}
