"""How the Big path runs: where big activations live, where kernels run, how much one partition holds.

An ``Execution`` is a small frozen value handed to every Big-Layers op and to a Big model's call; the
parameter modules hold none of it. Two executions with different compute devices are two streaming
engines, and they can run side by side in one process (the encoder mesh runs one per device).

Placement. Big activations are JAX arrays committed to a *host device*, a CPU device, and every host op
(ReLU, max-pool, residual add, the folded BatchNorm affine) is a function jitted there. We chose this over
numpy / ``pinned_host`` arrays because

* host ops run multi-threaded through XLA:CPU instead of single-threaded numpy;
* an array on the CPU device has an ordinary ``float32[...]`` type (a ``pinned_host`` memory kind is part
  of the JAX type, so every cotangent would have to carry it, see shared/JAX-NOTES.md);
* on a machine with only CPUs the host device can be a *distinct* virtual device
  (``jax_num_cpu_devices=2``), so tests see exactly which arrays crossed to the compute device.

By default the compute device is ``jax.devices()[0]`` (the GPU where there is one) and the host device
is another CPU device when there is one, else the compute device itself (moving between them then costs
nothing, and the partitioned ops still bound what each kernel sees).

Instrumentation. Every copy, band slice or join and kernel call of the ops goes through
``Execution.call(event, fn, ...)``; an ``observer`` (see ``EVENTS``) sees each one — the benchmark's
partition counter, stopwatch and traffic counter are observers, no private name is patched.
``crossing_bytes`` says what one copy moves between host memory and the compute device.

Asynchrony. No op reads a device value back to the host inside a step: band statistics are merged on
the device (``moments``), copies are ``device_put``s that return at once, and the one blocking read
left (adopting an accelerator's ``pinned_host`` buffer as a CPU-device array) is the ``host_read``
event, so an observer can count it. ``prefetch`` bounds how far dispatch runs ahead (``stream``).

Engines. ``engine="eager"`` runs the loops above from Python; ``engine="compiled"`` runs each pass of a
conv as one XLA program over the same partitions (``compiled``), with the activations it reads and
writes in the compute device's host memory (``placement``: ``pinned_host`` where copies are staged).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field, replace
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts
from jax.sharding import SingleDeviceSharding

from bigjax.layers import spill
from bigjax.layers.compiled import Placement
from bigjax.layers.spill import SpillStore
from bigjax.layers.stream import Window

__all__ = ["Execution", "DEFAULT_PARTITION_BYTES", "ENGINES", "EVENTS", "ensure_eager", "zeros_like"]

DEFAULT_PARTITION_BYTES = 256 * 2**20
ENGINES = ("eager", "compiled")

# what an observer is told about: (event, what it is)
EVENTS = {
    "to_compute": "a partition or parameter sent to the compute device",
    "to_host": "a result sent back to host memory",
    "host_read": "a blocking read of device memory by the host (an accelerator's pinned_host buffer)",
    "wait": "waiting for the copies of an older partition (prefetch depth reached)",
    "staging": "an activation copied between host memory and the compute device's host memory "
               "(its pinned_host memory on an accelerator) for a compiled pass; nothing crosses the bus",
    "band_copies": "the bytes a compiled pass moves across the bus inside its program (host->device, "
                   "device->host; counted from its plan, announced after the pass is dispatched)",
    "take_band": "a band cut out of a host activation",
    "join_bands": "output bands joined into a host activation",
    "conv_forward": "a forward conv kernel on one partition (the compiled engine: a pass's program)",
    "conv_backward": "a backward conv kernel on one partition (with its statistics cotangent; the "
                     "compiled engine: a pass's program)",
    "batch_norm": "a BatchNorm kernel (moments, affine or their pullbacks) on one partition",
    "whole_forward": "a module (a residual block) run whole as one device program, its working set "
                     "within the budget (``whole``): forward, keeping its VJP's residuals",
    "whole_backward": "a whole module's backward program",
    "host_forward": "a host op's forward (ReLU, add, pooling, folded BatchNorm)",
    "host_backward": "a host op's backward",
    "attention_forward": "a streamed-attention online-softmax step (one query block, one key block)",
    "attention_backward": "a recomputed streamed-attention block's gradient step (dk, dv or dq)",
    "vit_forward": "a ViT stage (embedding, block, head, a streamed block's half) on one partition",
    "vit_backward": "a recomputed ViT stage's pullback on one partition",
    "spill_write": "a row band of an activation beyond host_memory written to the spill store "
                   "(asynchronous; its first argument is the band's bytes)",
    "spill_read": "a row band read back from the spill store (asynchronous; first argument: bytes)",
    "spill_wait": "the engine blocked on the spill store: a band it needs now, or writes in flight "
                  "beyond spill.PENDING_BYTES",
    "input_read": "a row band read from a caller's store, the image a model starts from "
                  "(``spill.from_store``; asynchronous; first argument: bytes)",
    "input_wait": "the engine blocked on such a read (a slide's band still decoding)",
}

# observer(event, fn, *args, **kwargs) must return fn(*args, **kwargs)
Observer = Callable[..., object]


@dataclass(frozen=True)
class Execution:
    """Devices and partition budget of one streaming engine.

    Attributes:
      max_partition_bytes: bound on what one partition of any big layer puts on the compute device.
      compute: the device that runs the per-partition kernels (default ``jax.devices()[0]``).
      host: the CPU device whose memory holds big activations (default: see the module docstring).
      observer: called for every event (``EVENTS``) instead of running it directly; None = no hook.
      pinned_staging: send device->host copies through the compute device's ``pinned_host`` memory
        (``to_host``); None = where the compute device is not a CPU. True on a CPU runs the
        accelerator's code path (the tests do).
      prefetch: partitions whose copies may still be in flight when the next one is dispatched
        (``stream.Window``; default 1, double buffering); None = unbounded. The compiled engine
        double-buffers its loops unless it is 0.
      engine: "eager" streams each partition from Python (copies, band kernels, joins); "compiled"
        runs each pass of a conv as one XLA program that loops over the same partitions in the
        compute device's host memory (``compiled``). The same results, to float round-off. A
        compiled pass reads its spilled residuals whole (its one program takes whole arrays), where
        the eager ops read them in bands of a partition: with ``host_memory`` the compiled engine's
        peak is a pass's arrays above the budget (the CLIs refuse the pair).
      whole_blocks: run a residual block as one device program (``whole``) where XLA's account of
        its forward and backward fits ``max_partition_bytes``; False streams every block op by op.
      host_dtype: the dtype big activations (and their cotangents) are kept in between ops, e.g.
        ``bfloat16``: half the bytes in host RAM and across the bus each way. The kernels still compute
        in the parameters' dtype: each band is widened on the device and its result rounded there
        before it goes back. None = the input's dtype (float32 end to end).
      host_memory, spill_dir: host RAM for the step's activations, bytes: the residuals it keeps
        plus room for the activations in flight beside them (``spill.IN_FLIGHT``); the residuals
        beyond it wait in a tensorstore store under ``spill_dir`` (``spill``); None = all in RAM.
      stream_stem: a ResNet's stem (conv, BatchNorm, ReLU, max-pool) runs in row bands that recompute
        its conv from the input (``layers.stem``), so neither its conv output, the step's largest
        activation, nor that output's cotangent is ever whole; None = where the engine is eager and
        host RAM is the choice: bounded (``host_memory`` set) or narrow activations (``host_dtype``,
        which meets issue 21's 0.8x of float32's activations only so). Eager only.
    """

    max_partition_bytes: int = DEFAULT_PARTITION_BYTES
    compute: jax.Device | None = None
    host: jax.Device | None = None
    observer: Observer | None = field(default=None, compare=False)
    prefetch: int | None = 1
    pinned_staging: bool | None = None
    host_dtype: object = None
    engine: str = "eager"
    whole_blocks: bool = True
    host_memory: int | None = None
    spill_dir: str | os.PathLike | None = None
    stream_stem: bool | None = None
    window: Window = field(init=False, compare=False, repr=False)
    spill: SpillStore | None = field(init=False, compare=False, repr=False)

    def __post_init__(self):
        budget = self.max_partition_bytes
        if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget <= 0:
            raise ValueError(f"max_partition_bytes must be a positive number of bytes, got {budget!r}")
        compute = self.compute or jax.devices()[0]
        object.__setattr__(self, "max_partition_bytes", int(budget))
        object.__setattr__(self, "compute", compute)
        object.__setattr__(self, "host", self.host or _default_host(compute))
        if self.prefetch is not None and (isinstance(self.prefetch, bool) or self.prefetch < 0):
            raise ValueError(f"prefetch must be None or a number of partitions >= 0, "
                             f"got {self.prefetch!r}")
        object.__setattr__(self, "window", Window(self.prefetch))
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.host_dtype is not None:
            dtype = jnp.dtype(self.host_dtype)
            if not jnp.issubdtype(dtype, jnp.floating):
                raise ValueError(f"host_dtype must be a floating dtype, got {self.host_dtype!r}")
            object.__setattr__(self, "host_dtype", dtype)
        object.__setattr__(self, "spill", self._spill_store())
        if self.stream_stem and self.engine != "eager":
            raise ValueError(f"stream_stem needs the eager engine, got engine={self.engine!r}")

    @property
    def streams_stem(self) -> bool:
        """Whether a ResNet's stem runs streamed (``stream_stem``, or its default)."""
        if self.stream_stem is None:
            return self.engine == "eager" and (self.host_memory is not None or self.host_dtype is not None)
        return self.stream_stem

    def _spill_store(self) -> SpillStore | None:
        memory = self.host_memory
        if memory is None:
            if self.spill_dir is not None:
                raise ValueError(f"spill_dir={self.spill_dir!r} needs host_memory (the bytes kept "
                                 "in RAM before activations spill)")
            return None
        if isinstance(memory, bool) or not isinstance(memory, (int, np.integer)) or memory < 0:
            raise ValueError(f"host_memory must be a number of bytes >= 0, got {memory!r}")
        if self.spill_dir is None:
            raise ValueError(f"host_memory={memory} needs spill_dir (a local directory for the "
                             "activations beyond it)")
        return SpillStore(int(memory), self.spill_dir)

    def keep(self, x):
        """A residual activation as the backward will get it: ``x`` itself, or, beyond
        ``host_memory``, a handle to its copy in the spill store (``spill``); one in RAM behind a
        ``spill.Kept`` handle its readers' backwards ``release``, freed after the last."""
        return spill.keep_in_ram(self, x if self.spill is None else self.spill.keep(self, x))

    def restore(self, v):
        """What ``keep`` gave (or a tuple/list of them), every spilled one (or an input store,
        ``spill.from_store``) read back whole to host memory."""
        return spill.restore(self, v)

    def hold(self, x):
        """``x`` as a caller holds it from one computation to the next: in RAM within
        ``host_memory``, else a handle to its copy in the spill store (``spill.hold``)."""
        return spill.hold(self, x)

    def take(self, v):
        """What ``hold`` gave, as an array in host memory (``spill.take``)."""
        return spill.take(self, v)

    def replace(self, **changes) -> "Execution":
        """A copy with some fields changed (e.g. another compute device or an observer)."""
        return replace(self, **changes)

    def call(self, event: str, fn: Callable, *args, **kwargs):
        """Run ``fn(*args, **kwargs)``, through the observer when there is one."""
        if self.observer is None:
            return fn(*args, **kwargs)
        return self.observer(event, fn, *args, **kwargs)

    def stored(self, x):
        """``x`` cast to ``host_dtype`` where it lives (a model's input before its first big op)."""
        if self.host_dtype is None or x.dtype == self.host_dtype:
            return x
        return x.astype(self.host_dtype)

    def input(self, x, dtype):
        """A Big model's input as its first layer reads it: a tensorstore array (the slide) behind a
        handle whose bands that layer reads (``spill.from_store``), converted to ``host_dtype`` or
        else ``dtype`` (the model's) as they are read; an array in host memory, in ``host_dtype``
        (``stored``). The one rule for every model, so a slide fed either way gives one result."""
        if isinstance(x, ts.TensorStore):
            return spill.from_store(x, self.host_dtype or dtype)
        return self.to_host(self.stored(x))

    def to_host(self, x) -> jax.Array:
        """Commit ``x`` (numpy or JAX) to the host device; a no-op when it is already there.

        From an accelerator the copy is a DMA into that device's ``pinned_host`` memory, which the CPU
        device then adopts through a numpy view: 47 GB/s on an H100, where a direct ``device_put`` to
        the CPU backend ran at 0.8 GB/s (docs/benchmarks.md). A traced ``x`` (a model differentiated
        with respect to its input) takes the differentiable ``device_put``, whose transpose returns the
        cotangent to where ``x`` was.
        """
        return self.call("to_host", self._to_host, x)

    def _to_host(self, x):
        if isinstance(x, jax.core.Tracer):
            return jax.device_put(x, self.host)
        if isinstance(x, jax.Array):
            if x.devices() == {self.host}:
                return x
            if not _pinned(x) and self._staged(x):
                x = jax.device_put(x, _pinned_on(x))
            if _pinned(x):
                x = self.call("host_read", np.asarray, x)
        return jax.device_put(x, self.host)

    def to_host_async(self, x) -> jax.Array:
        """Start sending device array ``x`` to host memory and return at once (an output band).

        Where copies are staged through ``pinned_host`` memory, this returns the pinned copy, still
        in flight; ``to_host`` adopts it later (``bands.join_on_host``), so the band loop never waits
        for a band to land. Elsewhere it is ``to_host``.
        """
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and self._staged(x):
            return self.call("to_host", jax.device_put, x, _pinned_on(x))
        return self.to_host(x)

    def _staged(self, x: jax.Array) -> bool:
        return self.stages_from(next(iter(x.devices())))

    def stages_from(self, device: jax.Device) -> bool:
        """Whether copies from ``device`` to host memory go through its ``pinned_host`` memory."""
        staging = self.pinned_staging
        return device != self.host and (device.platform != "cpu" if staging is None else staging)

    def placement(self) -> Placement:
        """Memory kinds of a compiled pass: host buffers in the compute device's ``pinned_host``
        memory where copies are staged (an accelerator), else in its own memory."""
        return Placement(self.compute, "pinned_host" if self.stages_from(self.compute) else "device")

    def to_staging(self, x) -> jax.Array:
        """Host array ``x`` where a compiled pass reads it (``placement``); a no-op where it is."""
        sharding = self.placement().host
        if isinstance(x, jax.Array) and x.sharding == sharding and x.committed:
            return x
        return self.call("staging", jax.device_put, x, sharding)

    def from_staging(self, x) -> jax.Array:
        """A compiled pass's output back on the host device (``to_host`` without crossing the bus:
        where it is staged in ``pinned_host`` memory, the blocking adoption is the ``host_read``)."""
        return self.call("staging", self._to_host, x)

    def band_copies(self, h2d: int, d2h: int) -> None:
        """Announce the bytes a compiled pass moved across the bus (none where host is compute)."""
        if self.compute != self.host:
            self.call("band_copies", lambda *_: None, h2d, d2h)

    def to_compute(self, x) -> jax.Array:
        """Send ``x`` (a partition, a parameter) to the compute device (a no-op where it is)."""
        return self.call("to_compute", self._to_compute, x)

    def _to_compute(self, x):
        if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
            if _pinned(x):  # the memory kind named: JAX's CPU backend refuses a bare device
                return jax.device_put(x, SingleDeviceSharding(self.compute, memory_kind="device"))
            if x.committed and x.devices() == {self.compute}:
                return x  # an uncommitted one is committed (no copy): kernels see one placement
        return jax.device_put(x, self.compute)

    def to_device_of(self, x, like) -> jax.Array:
        """Put ``x`` where ``like`` (an array, or anything with an array's ``sharding``) lives
        (numpy counts as the compute device), e.g. a cotangent."""
        sharding = getattr(like, "sharding", None)
        if sharding is not None:
            event = "to_host" if sharding.device_set == {self.host} else "to_compute"
            return self.call(event, jax.device_put, x, sharding)
        return self.to_compute(x)

    def crossing_bytes(self, event: str, x) -> int:
        """Bytes a ``to_compute``/``to_host`` of ``x`` moves between host memory and compute device.

        Zero when ``x`` is already where it goes, or when host and compute are one device; a numpy
        array counts as host memory. A traced ``x`` (the model differentiated in its input) counts
        whole: it comes from the compute device.
        """
        if event not in ("to_compute", "to_host") or self.compute == self.host:
            return 0
        size = int(np.prod(np.shape(x), dtype=np.int64)) * np.dtype(x.dtype).itemsize
        if isinstance(x, jax.core.Tracer):
            return size
        if isinstance(x, jax.Array):
            if _pinned(x):  # host RAM already
                return size if event == "to_compute" else 0
            target = self.compute if event == "to_compute" else self.host
            return 0 if x.devices() == {target} else size
        return size if event == "to_compute" else 0


@functools.partial(jax.jit, keep_unused=True)
def zeros_like(tree):
    """Zeros shaped and placed like each array of ``tree`` (None stays None), made on its device.

    Jitted: an eager ``jnp.zeros_like`` sends its fill value from the host, an implicit transfer;
    ``keep_unused``: the (unread) inputs are what places the computation on their device.
    """
    return jax.tree.map(jnp.zeros_like, tree)


def _pinned(x: jax.Array) -> bool:
    return x.sharding.memory_kind == "pinned_host"


def _pinned_on(x: jax.Array) -> SingleDeviceSharding:
    return SingleDeviceSharding(next(iter(x.devices())), memory_kind="pinned_host")


def _default_host(compute: jax.Device) -> jax.Device:
    cpus = jax.devices("cpu")
    others = [d for d in cpus if d != compute]
    return others[0] if others else cpus[0]


def ensure_eager(op: str, *arrays) -> None:
    """Raise a clear TypeError when a Big-Layers op is traced (under ``jit``, ``vmap``, ``scan``).

    The ops stream partitions in a Python loop with concrete shapes and placements, so they must run
    eagerly; ``jax.grad``/``jax.vjp``/``nnx.grad`` outside ``jit`` are fine.
    """
    for a in jax.tree.leaves(arrays):
        if isinstance(a, jax.core.Tracer):
            raise TypeError(
                f"{op} streams partitions between host and device in a Python loop and must run "
                f"eagerly; it was called on a traced value ({type(a).__name__}), i.e. under "
                "jax.jit/vmap/scan. Call it outside jit (jax.grad, jax.vjp and nnx.grad work); only "
                "the model tail after the big stages is jitted."
            )
