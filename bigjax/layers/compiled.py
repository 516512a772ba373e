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
loop body differently). Which engine is faster on an accelerator is a GPU measurement
(docs/benchmarks.md).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

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


def _loop(run: Run, body, state, image=0):
    """Apply ``body(state, shape, offsets)`` to every partition of ``run`` (images offset by
    ``image``). A state whose accumulator is still None (a pass's first moments) peels the run's
    first partition, so that the loop carry has one structure."""
    def step(k, st):
        n0, *rest = run.at(k)
        return body(st, run.shape, (n0 + image, *rest))

    first = 0
    if state[1] is None and run.count > 1:
        state, first = step(0, state), 1
    if run.count - first == 1:
        return step(first, state)
    return lax.fori_loop(first, run.count, step, state)


def _passes(plan: tuple, per_image: bool, n_images: int, body, state):
    """Every run in order; with ``per_image`` the runs are image 0's, repeated over the images."""
    for run in plan:
        state = _loop(run, body, state)
    if not per_image or n_images == 1:
        return state

    def image(i, st):
        for run in plan:
            st = _loop(run, body, st, image=i)
        return st
    return lax.fori_loop(1, n_images, image, state)


@functools.partial(jax.jit, static_argnames=("place", "plan", "per_image", "out_shape", "geom",
                                             "stats", "kernel_fn"))
def forward_program(x, kernel, bias, a, b, *, place: Placement, plan: tuple, per_image: bool,
                    out_shape: tuple, geom, stats: bool, kernel_fn):
    """One pass of Algorithm 3: the output in host memory and, with ``stats``, its moments.

    ``plan``: runs of (images, input rows, pad top, pad bottom) partitions at (n0, i0, r0).
    ``kernel_fn``: the eager engine's band kernel (``conv._forward_kernel``).
    """
    def apply(state, shape, offsets):
        buf, acc = state
        n, in_rows, top, bottom = shape
        n0, i0, r0 = offsets
        xb = place.to_device(_band(x, n0, i0, n, in_rows))
        yb, acc = kernel_fn(xb, kernel, bias, a, b, acc, geom=geom, pad=(top, bottom), stats=stats)
        return _write(buf, place.to_host(yb), n0, r0), acc

    return _passes(plan, per_image, x.shape[0], apply, (place.zeros(out_shape, x.dtype), None))


@functools.partial(jax.jit, static_argnames=("place", "plan", "per_image", "geom", "stats",
                                             "kernel_fn", "cotangent_fn"))
def backward_program(x, kernel, bias, a, b, g, y, mean, g_mean, g_var, count, *, place: Placement,
                     plan: tuple, per_image: bool, geom, stats: bool, kernel_fn, cotangent_fn):
    """One pass of Algorithm 4: the input gradient in host memory and the parameters' gradients.

    ``plan``: runs of (images, output rows, input rows, pad top, pad bottom, emit, take, reset)
    partitions at (n0, r0, i0, first emitted row). The overlap-add carry travels in the loop state;
    it is empty at each image's first band (``reset``) and after its last. ``kernel_fn`` and
    ``cotangent_fn``: the eager engine's band kernels (``conv._backward_kernel``,
    ``conv._stats_cotangent``).
    """
    _, _, w, cin = x.shape

    def apply(state, shape, offsets):
        buf, acc, carry = state
        n, out_rows, in_rows, top, bottom, emit, take, reset = shape
        n0, r0, i0, start = offsets
        if reset:
            carry = jnp.zeros((n, 0, w, cin), kernel.dtype)
        gb = place.to_device(_band(g, n0, r0, n, out_rows))
        if stats:
            yb = place.to_device(_band(y, n0, r0, n, out_rows))
            gb = cotangent_fn(gb, yb, mean, g_mean, g_var, count)
        xb = place.to_device(_band(x, n0, i0, n, in_rows))
        acc, out, carry = kernel_fn(acc, carry, xb, kernel, bias, a, b, gb, geom=geom,
                                    pad=(top, bottom), emit=emit, take=take)
        return _write(buf, place.to_host(out), n0, start), acc, carry

    acc = jax.tree.map(jnp.zeros_like, (kernel, bias, a, b))
    carry = jnp.zeros((plan[0].shape[0], 0, w, cin), kernel.dtype)
    buf, acc, _ = _passes(plan, per_image, x.shape[0], apply,
                          (place.zeros(x.shape, x.dtype), acc, carry))
    return buf, acc
