"""Compiled band loops: each pass of a partitioned conv as one XLA program (``engine="compiled"``).

The eager engine (``conv``) dispatches every band from Python: a slice, a copy, a kernel, a copy back,
and a join at the end, so a step makes thousands of small dispatches. Here one jitted program per pass
(forward; backward) loops over the same partitions, in the same order, with ``lax.fori_loop``: the
program takes the activations where they live in host memory (the compute device's ``pinned_host``
memory where copies are staged, as on a GPU; its own memory on a CPU), cuts each band with
``dynamic_slice``, moves it to device memory with an in-program ``device_put`` between memory kinds,
runs the eager engine's band kernel on it, moves the result back and writes it in place into a host
buffer with ``dynamic_update_slice``, the pattern XLA's host offloading schedules as asynchronous
copies (JAX docs, "Memory spaces and host offloading"). Nothing is concatenated, and the host issues
one dispatch per pass instead of several per band.

The plan is the eager engine's (``plan.plan_partitions``): consecutive partitions of one shape whose
positions advance by a fixed step form a *run*, one ``fori_loop`` (the first band of an image, its
middle bands and its last band are three runs); where an image is split into row bands, a loop over
images runs those runs once per image. The band kernels, their order and hence the BatchNorm moments'
merge order are the eager engine's, so the results agree with it to float round-off (XLA fuses the
loop body differently). With ``Execution.prefetch`` not 0 each loop is double-buffered: the iteration
that computes partition k loads partition k + 1 and stores partition k - 1, copies that do not depend
on its kernel, so the device holds two partitions' bands (deeper prefetch is not built). Which engine
is faster on an accelerator is a GPU measurement (docs/benchmarks.md).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import SingleDeviceSharding

__all__ = ["Run", "runs", "forward_program", "backward_program", "Placement"]


@dataclass(frozen=True)
class Run:
    """``count`` partitions of one static shape ``shape``; the k-th starts at ``start + k * step``."""

    shape: tuple
    start: tuple
    step: tuple
    count: int

    def at(self, k):
        """Start offsets of the k-th partition (k may be traced)."""
        return tuple(s + k * d for s, d in zip(self.start, self.step))


def runs(items: list[tuple[tuple, tuple]]) -> list[Run]:
    """Group (static shape, start offsets) items, in order, into runs of one shape and a fixed step."""
    out: list[Run] = []
    for shape, start in items:
        last = out[-1] if out else None
        if last is not None and last.shape == shape:
            step = tuple(b - a for a, b in zip(last.at(last.count - 1), start))
            if last.count == 1 or step == last.step:
                out[-1] = Run(shape, last.start, step, last.count + 1)
                continue
        out.append(Run(shape, start, (0,) * len(start), 1))
    return out


@dataclass(frozen=True)
class Placement:
    """Memory kinds of one compiled pass: host buffers and device bands, both on the compute device."""

    device: jax.Device
    host_kind: str  # "pinned_host" where copies are staged (an accelerator), else "device"

    @property
    def host(self) -> SingleDeviceSharding:
        return SingleDeviceSharding(self.device, memory_kind=self.host_kind)

    def to_device(self, x):
        if self.host_kind == "device":
            return x
        return jax.device_put(x, SingleDeviceSharding(self.device, memory_kind="device"))

    def to_host(self, x):
        return x if self.host_kind == "device" else jax.device_put(x, self.host)

    def zeros(self, shape, dtype):
        """A host buffer the loop writes in place (XLA allocates a broadcast sent to host in host
        memory)."""
        return self.to_host(jnp.zeros(shape, dtype))


def _band(x, n0, r0, n, rows):
    """Images [n0, n0 + n), rows [r0, r0 + rows) of NHWC ``x``, offsets traced or static."""
    return lax.dynamic_slice(x, (n0, r0, 0, 0), (n, rows, *x.shape[2:]))


def _write(buf, band, n0, r0):
    return lax.dynamic_update_slice(buf, band.astype(buf.dtype), (n0, r0, 0, 0))


@dataclass(frozen=True)
class _Pass:
    """A pass's work on one partition in three phases, so that a loop can overlap them.

    ``load(shape, offsets)``: its bands, moved to device memory; ``compute(acc, shape, bands)``:
    (acc, its result on the device); ``store(buf, shape, offsets, result)``: the result written into
    the host buffer. ``acc`` is what passes from partition to partition (moments, gradients, carry).
    """

    load: Callable
    compute: Callable
    store: Callable


def _loop(run: Run, work: _Pass, state, image, prefetch: bool):
    """Every partition of ``run`` (images offset by ``image``), state = (host buffer, acc).

    With ``prefetch`` (double buffering) partition k + 1's bands are loaded and partition k - 1's
    result is stored in the iteration that computes partition k: neither depends on that kernel, so
    XLA may run the copies beside it; the loop then holds two partitions' bands. The first partition
    is computed before the loop in both cases, so that an accumulator that starts as None (a pass's
    first moments) has one structure in the loop carry.
    """
    def at(k):
        n0, *rest = run.at(k)
        return (n0 + image, *rest)

    shape, last = run.shape, run.count - 1
    buf, acc = state
    acc, out = work.compute(acc, shape, work.load(shape, at(0)))
    if not prefetch or last == 0:
        buf = work.store(buf, shape, at(0), out)

        def step(k, st):
            buf, acc = st
            acc, out = work.compute(acc, shape, work.load(shape, at(k)))
            return work.store(buf, shape, at(k), out), acc
        return lax.fori_loop(1, run.count, step, (buf, acc)) if last else (buf, acc)

    def step(k, st):  # k = 1 .. last - 1: load k + 1, compute k, store k - 1
        buf, acc, previous, bands = st
        ahead = work.load(shape, at(k + 1))
        acc, out = work.compute(acc, shape, bands)
        return work.store(buf, shape, at(k - 1), previous), acc, out, ahead

    state = lax.fori_loop(1, last, step, (buf, acc, out, work.load(shape, at(1))))
    buf, acc, previous, bands = state
    acc, out = work.compute(acc, shape, bands)
    buf = work.store(buf, shape, at(last - 1), previous)
    return work.store(buf, shape, at(last), out), acc


def _passes(plan: tuple, per_image: bool, n_images: int, work: _Pass, state, prefetch: bool):
    """Every run in order; with ``per_image`` the runs are image 0's, repeated over the images."""
    for run in plan:
        state = _loop(run, work, state, 0, prefetch)
    if not per_image or n_images == 1:
        return state

    def image(i, st):
        for run in plan:
            st = _loop(run, work, st, i, prefetch)
        return st
    return lax.fori_loop(1, n_images, image, state)


@functools.partial(jax.jit, static_argnames=("place", "plan", "per_image", "out_shape", "geom",
                                             "stats", "kernel_fn", "prefetch"))
def forward_program(x, kernel, bias, a, b, *, place: Placement, plan: tuple, per_image: bool,
                    out_shape: tuple, geom, stats: bool, kernel_fn, prefetch: bool):
    """One pass of Algorithm 3: the output in host memory and, with ``stats``, its moments.

    ``plan``: runs of (images, input rows, pad top, pad bottom) partitions at (n0, i0, r0).
    ``kernel_fn``: the eager engine's band kernel (``conv._forward_kernel``).
    """
    def load(shape, offsets):
        n, in_rows, *_ = shape
        return place.to_device(_band(x, offsets[0], offsets[1], n, in_rows))

    def compute(acc, shape, xb):
        *_, top, bottom = shape
        yb, acc = kernel_fn(xb, kernel, bias, a, b, acc, geom=geom, pad=(top, bottom), stats=stats)
        return acc, yb

    def store(buf, shape, offsets, yb):
        return _write(buf, place.to_host(yb), offsets[0], offsets[2])

    return _passes(plan, per_image, x.shape[0], _Pass(load, compute, store),
                   (place.zeros(out_shape, x.dtype), None), prefetch)


@functools.partial(jax.jit, static_argnames=("place", "plan", "per_image", "geom", "stats",
                                             "kernel_fn", "cotangent_fn", "prefetch", "input_grad"))
def backward_program(x, kernel, bias, a, b, g, y, mean, g_mean, g_var, count, *, place: Placement,
                     plan: tuple, per_image: bool, geom, stats: bool, kernel_fn, cotangent_fn,
                     prefetch: bool, input_grad: bool = True):
    """One pass of Algorithm 4: the input gradient in host memory and the parameters' gradients.

    ``plan``: runs of (images, output rows, input rows, pad top, pad bottom, emit, take, reset)
    partitions at (n0, r0, i0, first emitted row). The overlap-add carry travels in the loop state;
    it is empty at each image's first band (``reset``) and after its last. ``kernel_fn`` and
    ``cotangent_fn``: the eager engine's band kernels (``conv._backward_kernel``,
    ``conv._stats_cotangent``). Without ``input_grad`` (an input nobody differentiates) ``kernel_fn``
    is ``conv._parameter_grad_kernel``, nothing is stored and the input gradient is None.
    """
    _, _, w, cin = x.shape

    def load(shape, offsets):
        n, out_rows, in_rows = shape[:3]
        n0, r0, i0, _ = offsets
        return tuple(place.to_device(_band(v, n0, r, n, rows)) for v, r, rows in
                     ((g, r0, out_rows), (y, r0, out_rows), (x, i0, in_rows)) if v is not None)

    def compute(acc, shape, bands):
        grads, carry = acc
        n, _, _, top, bottom, emit, take, reset = shape
        if reset:
            carry = jnp.zeros((n, 0, w, cin), kernel.dtype)
        gb, *yb, xb = bands
        if stats:
            gb = cotangent_fn(gb, yb[0], mean, g_mean, g_var, count)
        if not input_grad:
            return (kernel_fn(grads, xb, kernel, bias, gb, geom=geom, pad=(top, bottom)), carry), None
        grads, out, carry = kernel_fn(grads, carry, xb, kernel, bias, a, b, gb, geom=geom,
                                      pad=(top, bottom), emit=emit, take=take)
        return (grads, carry), out

    def store(buf, shape, offsets, out):
        return buf if out is None else _write(buf, place.to_host(out), offsets[0], offsets[3])

    grads = jax.tree.map(jnp.zeros_like, (kernel, bias, a, b)[:2 + 2 * input_grad])
    carry = jnp.zeros((plan[0].shape[0], 0, w, cin), kernel.dtype)
    buf = place.zeros(x.shape, x.dtype) if input_grad else None
    buf, (grads, _) = _passes(plan, per_image, x.shape[0], _Pass(load, compute, store),
                              (buf, (grads, carry)), prefetch)
    return buf, grads
