"""A spill store: the activations a step must keep, beyond a host-RAM budget, on local disk.

What a Big-Layers training step keeps alive from its forward to its backward is exactly the residuals
of its custom_vjp ops (what each forward saves for its backward: a conv's input and output, a host op's
inputs, a whole block's residuals); every other forward value is freed once its consumer ran. So the
policy is applied to residuals, by the ops themselves (``keep`` in a forward, ``restore``/``bands`` in
a backward): an activation is kept in RAM while the residuals resident in RAM, plus room for
``IN_FLIGHT`` activations as large as the largest yet, stay within ``Execution.host_memory``; else it
is written to a tensorstore array on disk and the residual holds only a ``Spilled`` handle — a
pytree without array leaves (the handle is its aux data), which JAX's eager autodiff carries like any
residual. Each activation is kept once, however many ops save it (the store remembers it by its
buffer).

Why the room: besides its residuals, a step holds activations that are no op's residual, which a
budget on residuals alone does not see. In the backward of a residual block, three whole cotangents of
the block's size are alive at once (the block output's, the shortcut's and the conv's); in the forward,
an op's input and output beside the block input the shortcut adds. The forward keeps activations in
the order it makes them, so without the room the budget fills with the first stage's, which the
backward reads last, beside that stage's cotangents. With it, what a step holds beyond
``host_memory`` is what no activation's size sets: the parameter gradients, the partitions in flight
and XLA's temporaries (measured: 0.16-0.19 GiB with 64 MiB partitions at 1024²-8192², ResNet-18,
where without the room it grew with the side: 0.65 GiB at 4096², 2.11 at 8192²; docs/benchmarks.md,
seventh session). A budget below ``IN_FLIGHT`` × the largest activation spills everything, and those
in-flight activations exceed it.

What a caller holds between two computations is under the same rule (``hold``, ``take``): local
learning's step holds each module's output, through that module's backward, until the next module
reads it; held as an array it would sit in RAM beside all the budget counts (at 16,384², a module's
input and output, 1.8 GiB each). Beyond the budget it waits on disk, written once however many ops
also keep it, and where it lives is decided again when it is taken.

Layout: one zarr v3 array per spilled activation, uncompressed (activations are noise to a compressor,
and compression would cost CPU the kernels need), on tensorstore's ``file`` driver, one chunk per row
band of one image: a band read is one contiguous file read, and a conv's backward reads its bands with
their halos from one or two chunks. Writes are tensorstore futures started in the forward and waited on
only when too many bytes are in flight (``PENDING_BYTES``); in a conv's backward the next band's read
is started before the current band's kernels run (``bands``). A read lands in a 64-byte aligned buffer
that the host device adopts as the band's array: tensorstore's own output array is misaligned for
XLA, which copied it, one fresh buffer and one pass more per byte read (docs/benchmarks.md, tenth
session).

Lifetime: the arrays live in ``<spill_dir>/bigjax-spill-<pid>/``; an array's files are removed once
the last op backward that reads it ``release``s its handle (as the backward goes, like ``Kept``), or
when the handle is dropped (a forward with no backward), the process directory at exit; a run killed
before that leaves a directory whose pid is dead, which the next store in that ``spill_dir`` removes
before writing (``SpillStore``). ``SpillStore.peak_on_disk`` is the most bytes its files held at once.

Events (``Execution.observer``): ``spill_write`` per band written, ``spill_read`` per band read; their
first argument is the band's byte count; they start the I/O, and ``spill_wait`` is the engine blocked
on it. ``SpillStats`` is an observer adding up the bytes.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import logging
import os
import shutil
import weakref
from collections import deque
from pathlib import Path

import jax
import numpy as np
import tensorstore as ts

from bigjax.layers import pages
from bigjax.layers.bands import aligned_empty, take_band

__all__ = ["SpillStore", "Spilled", "Kept", "SpillStats", "from_store", "keep_in_ram", "release",
           "restore", "bands", "hold", "take", "IN_FLIGHT", "PENDING_BYTES", "CHUNK_BYTES"]

CHUNK_BYTES = 8 * 2**20  # target bytes of one chunk (a row band of one image)
IN_FLIGHT = 3  # activations alive beside the residuals (a block's three cotangents): room kept free
PENDING_BYTES = 64 * 2**20  # writes in flight beyond which the forward waits for the oldest
log = logging.getLogger(__name__)
_PREFIX = "bigjax-spill-"
_COUNTER = itertools.count()
_ROOTS: dict[Path, Path] = {}  # spill_dir -> this process's directory in it
# one file per chunk, its bytes as they are (tensorstore's zarr3 default would nest the chunks in a
# sharded file with a checksummed index: a band read then costs an index read and a checksum)
_RAW = [{"name": "bytes", "configuration": {"endian": "little"}}]


class Spilled:
    """A host activation written to the spill store: its tensorstore array and its shape and dtype.

    A pytree node with no children, so a custom_vjp residual holding it carries no array. Like
    ``Kept`` it counts the op backwards that will read it (``readers``); the last ``release`` removes
    its files (``removed``), as does the handle's death, whichever comes first."""

    def __init__(self, store: ts.TensorStore, path: Path | None, shape, dtype, pending,
                 on_removal=None):
        self.store, self.path, self.shape, self.dtype = store, path, tuple(shape), np.dtype(dtype)
        self._pending = pending  # the write futures, waited on before the first read
        self.readers = 0
        self._remove = None
        if path is not None:  # the store's own files (not a caller's store, ``from_store``)
            self._remove = weakref.finalize(self, _remove, path, pending, on_removal)

    @property
    def removed(self) -> bool:
        return self._remove is not None and not self._remove.alive

    def release(self) -> None:
        self.readers -= 1
        if self.readers == 0 and self._remove is not None:
            self._remove()  # a finalizer runs once: the handle's death then does nothing

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def written(self) -> None:
        """Wait until every band of this array is on disk (its write futures resolved)."""
        for f in self._pending:
            f.result()
        self._pending.clear()


jax.tree_util.register_pytree_node(Spilled, lambda s: ((), s), lambda s, _: s)


class Kept:
    """A residual kept in host RAM, behind a handle counting the op backwards that will read it.

    Like ``Spilled`` a pytree node with no children, so what JAX's eager pullback keeps until the
    whole backward ends is the empty handle: each op's backward ``release``s it after its last read,
    and at zero the handle drops its array, whose memory returns at once (goal 1 of issue 21, "free
    what the backward no longer needs as it goes"). A forward with no backward frees the array when
    the handle dies."""

    def __init__(self, array: jax.Array):
        self._array, self.readers = array, 0
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim

    @property
    def nbytes(self) -> int:
        return 0 if self._array is None else self._array.nbytes

    def get(self) -> jax.Array:
        if self._array is None:
            raise RuntimeError(f"a released residual (shape {self.shape}) was read: an op's "
                               "backward read it after its last reader released it")
        return self._array

    def release(self) -> None:
        self.readers -= 1
        if self.readers == 0:
            _KEPT.pop(_key(self._array), None)
            self._array = None


jax.tree_util.register_pytree_node(Kept, lambda s: ((), s), lambda s, _: s)
_KEPT: dict[int, "weakref.ref[Kept]"] = {}  # buffer -> the live handle holding it


def _key(x: jax.Array) -> int:
    return x.unsafe_buffer_pointer()


def _host_activation(ex, x) -> bool:
    """Whether ``x`` is what the residual policies handle: a concrete 4-D array on the host device
    (a tracer, under ``jit``, must stay a real array)."""
    return (isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and x.ndim == 4
            and x.devices() == {ex.host})


def keep_in_ram(ex, x):
    """``x`` behind a ``Kept`` handle, one handle per buffer however many ops keep it (each keep is
    one more reader). Anything but a host activation (``_host_activation``) stays as it is."""
    if not _host_activation(ex, x):
        return x
    ref = _KEPT.get(_key(x))
    handle = ref() if ref is not None else None
    if handle is None or handle._array is not x:
        handle = Kept(x)
        _KEPT[_key(x)] = weakref.ref(handle)
    handle.readers += 1
    return handle


def release(*residuals) -> None:
    """The calling backward has read these residuals for the last time (tuples/lists leaf by leaf)."""
    for v in residuals:
        if isinstance(v, (tuple, list)):
            release(*v)
        elif isinstance(v, (Kept, Spilled)):
            v.release()


def from_store(store: ts.TensorStore, dtype=None) -> Spilled:
    """A caller's tensorstore array (NHWC, or HWC: one image) as an input the Big ops read band by
    band (the slide a model starts from, never resident whole), its values converted to ``dtype``
    (default: its own dtype) as they are read. The store is only read, never removed."""
    if store.rank == 3:
        store = store[ts.newaxis]
    if store.rank != 4:
        raise ValueError(f"a store input must be NHWC or HWC, got rank {store.rank} "
                         f"(shape {tuple(store.shape)})")
    dtype = np.dtype(dtype or store.dtype.numpy_dtype)
    if store.dtype.numpy_dtype != dtype:
        store = ts.cast(store, ts.dtype(dtype.name))
    origin = store.domain.origin
    if any(origin):  # index from zero, as the bands are cut
        store = store.translate_to[0, 0, 0, 0]
    return Spilled(store, None, store.shape, dtype, [])


def _remove(path: Path, pending, on_removal) -> None:
    for f in pending:  # a write still in flight would re-create files after the removal
        try:
            f.result()
        except Exception:  # noqa: BLE001 - removing anyway; the write's error was the op's
            pass
    shutil.rmtree(path, ignore_errors=True)
    if on_removal is not None:
        on_removal()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _process_root(spill_dir: Path) -> Path:
    """This process's directory under ``spill_dir``; on first use, stale ones of dead pids removed."""
    if spill_dir not in _ROOTS:
        spill_dir.mkdir(parents=True, exist_ok=True)
        for old in spill_dir.glob(_PREFIX + "*"):
            pid = old.name[len(_PREFIX):]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
        root = spill_dir / f"{_PREFIX}{os.getpid()}"
        root.mkdir(exist_ok=True)
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        _ROOTS[spill_dir] = root
    return _ROOTS[spill_dir]


class SpillStore:
    """The residuals of one engine (``Execution``): kept in RAM up to ``host_memory`` bytes, the
    rest on disk under ``spill_dir``. Creating one makes freed buffers return to the OS
    (``pages.return_freed_buffers``): a host budget is meant to bound the resident set."""

    def __init__(self, host_memory: int, spill_dir):
        pages.return_freed_buffers()
        pages.advise_huge_pages()
        self.host_memory = host_memory
        self.spill_dir = Path(spill_dir).resolve()
        self.resident = 0  # bytes of kept activations in RAM that are alive
        self.largest = 0  # the largest activation offered to ``keep`` so far
        self.on_disk = self.peak_on_disk = 0  # bytes of spilled activations whose files exist
        self._known: dict[int, tuple] = {}  # buffer -> (array, handle or None: in RAM), both weak
        self._in_flight: deque = deque()  # (bytes, write future) of every band not yet written

    def keep(self, ex, x):
        """``x`` itself (kept in RAM within the budget) or a ``Spilled`` handle to its copy on disk.

        Only concrete 4-D arrays on the host device (activations) are considered; anything else is
        returned as is."""
        if not _host_activation(ex, x):
            return x
        key = _key(x)
        ref, handle = self._known.get(key, (None, None))
        if ref is not None and ref() is x:
            if handle is None:
                return x
            spilled = handle()
            if spilled is not None and not spilled.removed:  # still kept by an op's residuals
                spilled.readers += 1  # written once, read by one more backward
                return spilled
        if self._fits(x.nbytes):
            self._remember(x)
            return x
        spilled = self._write(ex, x)
        spilled.readers = 1
        self._remember(x, spilled)
        return spilled

    def adopt(self, x: jax.Array, spilled: Spilled) -> bool:
        """``x`` holds ``spilled``'s values, read back: kept in RAM (counted) where it fits the
        budget now, and then True; else an op keeping ``x`` keeps ``spilled``'s copy."""
        in_ram = self._fits(x.nbytes)
        self._remember(x, None if in_ram else spilled)
        return in_ram

    def _fits(self, nbytes: int) -> bool:
        """Whether an activation of ``nbytes`` stays in RAM (the largest yet updated first): the
        kept ones, it and the room."""
        if nbytes > self.largest:
            self._larger(nbytes)
        return self.resident + nbytes + IN_FLIGHT * self.largest <= self.host_memory

    def _remember(self, x: jax.Array, spilled: Spilled | None = None) -> None:
        """``x`` is in RAM, counted in ``resident``, or (``spilled``) that copy's array; both weak:
        the files go at the last release, or when the last residual holding the handle is dropped,
        and the entry when ``x`` dies."""
        key, resident = _key(x), (x.nbytes if spilled is None else 0)
        self.resident += resident
        self._known[key] = (weakref.ref(x), None if spilled is None else weakref.ref(spilled))
        weakref.finalize(x, self._forget, key, resident)

    def _larger(self, nbytes: int) -> None:
        """The largest activation yet: say, each time it grows, if the room for it in flight outgrows
        the budget (a figure from a smaller one that came first, such as the image, would understate
        what the step holds)."""
        room = IN_FLIGHT * nbytes
        if 0 < self.host_memory < room:
            # "at least": larger ones may follow, and with every activation spilled a step's peak-RSS
            # rise was 3.5 and 2.9 of its largest, partitions and parameter gradients included
            # (4096², 16,384²; docs/benchmarks.md, twelfth and thirteenth sessions)
            log.warning("host_memory=%.2f GiB is below the room for %d activations of %.2f GiB in "
                        "flight: every activation spills, and the step holds at least %.2f GiB of "
                        "them", self.host_memory / 2**30, IN_FLIGHT, nbytes / 2**30, room / 2**30)
        self.largest = nbytes

    def _forget(self, key: int, resident: int) -> None:
        """``x`` is gone: its buffer may serve another array; ``resident`` bytes left RAM."""
        self._known.pop(key, None)
        self.resident -= resident

    def _write(self, ex, x: jax.Array) -> Spilled:
        n, h, w, c = x.shape
        rows = max(1, min(h, CHUNK_BYTES // max(1, w * c * x.dtype.itemsize)))
        path = _process_root(self.spill_dir) / str(next(_COUNTER))
        store = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)},
                         "metadata": {"shape": list(x.shape), "data_type": x.dtype.name,
                                      "codecs": _RAW, "chunk_grid": {"name": "regular",
                                      "configuration": {"chunk_shape": [1, rows, w, c]}}}},
                        create=True, dtype=ts.dtype(x.dtype.name)).result()
        values = jax.device_get(x)  # a view of the host buffer where it can be (a CPU device)
        pending = []
        for i in range(n):
            for r in range(0, h, rows):
                band = values[i:i + 1, r:r + rows]
                future = ex.call("spill_write", _start_write, band.nbytes, store, i, r, band)
                pending.append(future)
                self._in_flight.append((band.nbytes, future))
                self._throttle(ex)
        self.on_disk += x.nbytes
        self.peak_on_disk = max(self.peak_on_disk, self.on_disk)
        return Spilled(store, path, x.shape, x.dtype, pending,
                       functools.partial(self._removed, x.nbytes))

    def _removed(self, nbytes: int) -> None:
        self.on_disk -= nbytes

    def _throttle(self, ex) -> None:
        """Wait for the oldest writes while more than ``PENDING_BYTES`` are in flight."""
        while self._in_flight and sum(b for b, _ in self._in_flight) > PENDING_BYTES:
            ex.call("spill_wait", self._in_flight.popleft()[1].result)
        while self._in_flight and self._in_flight[0][1].done():
            self._in_flight.popleft()


def restore(ex, v):
    """A spilled ``v`` read back whole onto the host device (every band's read started first), a
    ``Kept`` one's array; anything else as is. A tuple or list is restored leaf by leaf."""
    if isinstance(v, Kept):
        return v.get()
    if isinstance(v, (tuple, list)):
        v = type(v)(u.get() if isinstance(u, Kept) else u for u in v)
        reads = [read_start(ex, u) if isinstance(u, Spilled) else u for u in v]
        return type(v)(read_finish(ex, r) if isinstance(u, Spilled) else r
                       for u, r in zip(v, reads))
    return read_finish(ex, read_start(ex, v)) if isinstance(v, Spilled) else v


def hold(ex, x):
    """``x`` as a caller holds it between two computations (a local module's output, from its
    forward, through its backward, to the next module's input), by the rule ``keep`` applies to a
    residual: ``x`` itself within ``host_memory`` (counted in it), else a ``Spilled`` handle to its
    copy on disk, written once however many ops also keep it. ``take`` gives the array back. Without
    a store, ``x`` as it is."""
    return x if ex.spill is None else ex.spill.keep(ex, x)


def take(ex, v):
    """What ``hold`` gave, as an array in host memory. A spilled one is read back whole and decided
    again (``SpillStore.adopt``; the budget may have room now, the backward that ran while it was
    held having freed its residuals): kept in RAM, its copy on disk released; else its copy stays
    the array's, so an op that keeps the array keeps that copy (no second write), and the holder's
    reader is released when the array dies."""
    if not isinstance(v, Spilled):
        return v
    x = restore(ex, v)
    if ex.spill is not None and ex.spill.adopt(x, v):
        v.release()
    else:
        weakref.finalize(x, v.release)
    return x


def _start_write(nbytes, store, i, r, band):
    # tensorstore copies the band into a chunk buffer of its own; asked to write from the
    # activation's buffer instead (``can_reference_source_data_indefinitely``), it kept 0.5 GiB of
    # a 1 GiB activation resident after its writes and every reference of ours had gone, out of
    # the budget's sight (docs/benchmarks.md, tenth session)
    return store[i:i + 1, r:r + band.shape[1]].write(band)


def _start_read(nbytes, view, out):
    return ts.array(out, copy=False, write=True).write(view)


def read_start(ex, v: Spilled, n0=0, n1=None, r0=0, r1=None):
    """Start reading images [n0, n1), rows [r0, r1) of ``v``: one ``spill_read`` (``input_read`` for a
    caller's store, ``from_store``), which tensorstore serves from the chunks (row bands) the rows lie
    in, into one array."""
    if v.removed:
        raise RuntimeError(f"a released residual (shape {v.shape}) was read: an op's backward read "
                           "it from the spill store after its last reader released it")
    if v._pending:
        ex.call("spill_wait", v.written)
    event, wait = ("spill_read", "spill_wait") if v.path is not None else ("input_read", "input_wait")
    view = v.store[n0:n1, r0:r1]
    out = aligned_empty(view.shape, v.dtype)
    return ex.call(event, _start_read, out.nbytes, view, out), out, wait


def read_finish(ex, started) -> jax.Array:
    """The band whose read ``read_start`` started, on the host device: the buffer it was read into,
    which the host device adopts without a copy (64-byte aligned)."""
    future, out, wait = started
    ex.call(wait, future.result)
    return ex.to_host(out)


def bands(ex, v, ranges):
    """Yield band ``(n0, n1, r0, r1)`` of host activation ``v`` for each of ``ranges``, in host memory.

    A spilled ``v`` is read from disk with the next band's read started before the current band is
    yielded (its kernels then overlap the read); an array in RAM is cut (``take_band``)."""
    if isinstance(v, Kept):
        v = v.get()
    if not isinstance(v, Spilled):
        for rng in ranges:
            yield ex.call("take_band", take_band, v, *rng)
        return
    ahead = None
    for k, rng in enumerate(ranges):
        current = ahead or read_start(ex, v, *rng)
        ahead = read_start(ex, v, *ranges[k + 1]) if k + 1 < len(ranges) else None
        yield read_finish(ex, current)


class SpillStats:
    """An observer adding up one engine's spill traffic: bytes and bands written and read.

    ``written``/``read`` are bytes, ``writes``/``reads`` band counts, ``largest_read`` the bytes of
    the largest band read, since creation or ``reset``; it passes every event on (``inner``, e.g.
    another observer, or runs it)."""

    def __init__(self, inner=None):
        self.inner = inner
        self.reset()

    def reset(self) -> None:
        self.written = self.read = self.writes = self.reads = self.largest_read = 0

    def __call__(self, event, fn, *args, **kwargs):
        if event == "spill_write":
            self.written += args[0]
            self.writes += 1
        elif event == "spill_read":
            self.read += args[0]
            self.reads += 1
            self.largest_read = max(self.largest_read, args[0])
        if self.inner is not None:
            return self.inner(event, fn, *args, **kwargs)
        return fn(*args, **kwargs)
