"""Partitioned 2-D convolution: the "Big-Layers" paper's Algorithms 3 (forward) and 4 (backward).

Forward, one pass: for each partition (images, then row bands with halo rows) the input band is sent to
the compute device, a jitted kernel convolves it and the output band comes back to host memory.
Backward, one pass: each band's input, output cotangent (and output, for statistics) go to the device;
the kernel returns the band's input gradient and weight gradient. Weight gradients accumulate on the
device; input-gradient bands overlap by the halo, and the overlap is added (overlap-add) into the next
band's gradient while it is still on the device, so only disjoint rows travel back to the host.

Beyond the paper (the fused path used by the Big ResNet): the op may apply ``relu(x * a + b)`` to its
input band on the device before convolving (a folded BatchNorm + ReLU of the previous layer), and may
return the per-channel mean and biased variance of its output, accumulated in the same pass
(see ``moments``). Every big activation then crosses the bus once per direction per pass.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bigjax.layers import compiled, moments, spill
from bigjax.layers.bands import join_on_host, take_band
from bigjax.layers.execution import Execution, ensure_eager, zeros_like
from bigjax.layers.plan import ConvGeometry, Footprint, Partition, plan_partitions

__all__ = ["big_conv2d", "big_conv2d_stats", "conv2d", "kernel_grad", "check_budget"]

_DIMS = ("NHWC", "HWIO", "NHWC")


def conv2d(x, kernel, geom: ConvGeometry, pad_rows=None):
    """Plain convolution with torch's padding; ``pad_rows`` overrides the (top, bottom) padding."""
    rows = geom.padding[0], geom.padding[0]
    return lax.conv_general_dilated(
        x, kernel, window_strides=geom.stride,
        padding=(pad_rows or rows, (geom.padding[1], geom.padding[1])),
        rhs_dilation=geom.dilation, dimension_numbers=_DIMS)


@dataclass(frozen=True)
class _Spec:
    geom: ConvGeometry
    ex: Execution
    stats: bool  # also return the output's per-channel mean and biased variance
    input_grad: bool = True  # False: the input is not differentiated (a model's image), no dx


def _band_forward(x, kernel, bias, a, b, *, geom, pad):
    """Output band of one input band (halo included): conv(relu(x*a+b) or x) + bias, computed in the
    kernel's dtype (a band kept narrower in host memory, ``Execution.host_dtype``, is widened here)."""
    x = x.astype(kernel.dtype)
    z = x if a is None else jax.nn.relu(x * a + b)
    y = conv2d(z, kernel, geom, pad)
    return y if bias is None else y + bias


@functools.partial(jax.jit, static_argnames=("geom", "pad", "stats"))
def _forward_kernel(x, kernel, bias, a, b, acc, *, geom, pad, stats):
    """Output band, rounded to the input's (host) dtype, and, with ``stats``, the moments so far
    (of the unrounded band) with this band's merged in."""
    y = _band_forward(x, kernel, bias, a, b, geom=geom, pad=pad)
    return y.astype(x.dtype), (moments.accumulate_moments(acc, y) if stats else None)


def kernel_grad(z, g, geom: ConvGeometry, pad):
    """Gradient of the kernel of ``conv2d(z, kernel, geom, pad)`` for output cotangent ``g``.

    dW[i, j, c, o] = sum over n, h, w of z_pad[n, h*s + i*d, w*s + j*d, c] * g[n, h, w, o], written
    as one convolution in XLA's canonical layout: batch = input channels, features = images, the
    cotangent as a window dilated by the stride, the kernel's dilation as the window stride. It
    equals jax.vjp's weight gradient; XLA:CPU runs jax.vjp's form of it (``f01b_i01o->01bf``) as
    a naive loop inside a ``while`` loop (50x slower, the compiled engine's band loops) but this
    form as its fast convolution everywhere.
    """
    (sh, sw), (dh, dw), (eh, ew) = geom.stride, geom.dilation, geom.span
    ho, wo = g.shape[1:3]
    z = jnp.pad(z, ((0, 0), pad, (geom.padding[1],) * 2, (0, 0)))
    z = z[:, : (ho - 1) * sh + eh, : (wo - 1) * sw + ew]
    dk = lax.conv_general_dilated(jnp.transpose(z, (3, 1, 2, 0)), jnp.transpose(g, (1, 2, 0, 3)),
                                  window_strides=(dh, dw), padding="VALID", rhs_dilation=(sh, sw),
                                  dimension_numbers=_DIMS)
    return jnp.transpose(dk, (1, 2, 0, 3))


@functools.partial(jax.jit, static_argnames=("geom", "pad", "emit", "take"))
def _backward_kernel(acc, carry, x, kernel, bias, a, b, g, *, geom, pad, emit, take):
    """Band input gradient (emit rows, carry rows) and accumulated parameter gradients.

    Computed in the kernel's dtype, the overlap-add carry included; only the emitted rows are rounded
    to the host dtype of ``x``."""
    narrow, wide = x.dtype, kernel.dtype
    x, g = x.astype(wide), g.astype(wide)
    _, pull = jax.vjp(lambda x, *p: _band_forward(x, kernel, *p, geom=geom, pad=pad), x, bias, a, b)
    dx, dbias, da, db = pull(g)
    z = x if a is None else jax.nn.relu(x * a + b)
    dparams = (kernel_grad(z, g, geom, pad), dbias, da, db)
    dx = dx.at[:, : carry.shape[1]].add(carry)  # overlap-add of the previous band's halo
    out = jnp.pad(dx[:, :take], ((0, 0), (0, emit - take), (0, 0), (0, 0)))
    return jax.tree.map(jnp.add, acc, tuple(dparams)), out.astype(narrow), dx[:, take:]


@functools.partial(jax.jit, static_argnames=("geom", "pad"))
def _parameter_grad_kernel(acc, x, kernel, bias, g, *, geom, pad):
    """The band's kernel (and bias) gradient only, for an input nobody differentiates."""
    g = g.astype(kernel.dtype)
    dparams = (kernel_grad(x.astype(kernel.dtype), g, geom, pad),
               None if bias is None else jnp.sum(g, axis=(0, 1, 2)))
    return jax.tree.map(jnp.add, acc, dparams)


@jax.jit
def _stats_cotangent(g, y, mean, g_mean, g_var, count):
    """Cotangent of y: its own plus what flows back through its batch mean and variance."""
    return g + moments.moments_cotangent(y, mean, g_mean, g_var, count)


def _footprint(kernel, a, stats, backward, narrow=0.0) -> Footprint:
    """Device buffers per partition (in band / out band units of the kernel's dtype), fwd or bwd.

    Fixed: the kernel (and its gradient accumulator in the backward pass) and a few per-channel
    vectors (bias, prologue, statistics). The prologue materialises relu(x*a+b) beside the input band.
    A band kept in a narrower host dtype (``narrow`` = its itemsize over the kernel's, else 0) is
    widened beside itself, and what goes back is rounded beside the wide result: those narrow copies
    are the fractions below.
    """
    *_, cin, cout = kernel.shape
    fixed = (1 + backward) * (kernel.size + 6 * (cin + cout)) * kernel.dtype.itemsize
    pro = a is not None
    if backward:  # in: x, dx, prologue (+ narrow x, rounded dx); out: g, y, scratch (+ narrow g, y)
        return Footprint(in_buffers=2 + pro + 2 * narrow, out_buffers=2 + stats + narrow * (1 + stats),
                         fixed_bytes=fixed, carry=True)
    return Footprint(in_buffers=1 + pro + narrow, out_buffers=2 + narrow, fixed_bytes=fixed)


def check_budget(shape, kernel_shape, geom: ConvGeometry, budget: int) -> None:
    """Raise the planner's ``ValueError`` if ``budget`` cannot hold one partition of this conv's
    fused forward and backward (float32) on an input of ``shape``: a CLI asks before it generates or
    tiles data."""
    kernel = np.zeros(kernel_shape, np.float32)
    for backward in (False, True):
        plan_partitions(shape, kernel_shape[-1], geom, _footprint(kernel, None, True, backward),
                        budget, 4, "convolution")


def _plan(spec, x, kernel, a, backward):
    wide = kernel.dtype.itemsize
    narrow = x.dtype.itemsize / wide if x.dtype.itemsize < wide else 0
    fp = _footprint(kernel, a, spec.stats, backward, narrow)
    return plan_partitions(x.shape, kernel.shape[-1], spec.geom, fp, spec.ex.max_partition_bytes,
                           max(x.dtype.itemsize, wide), "convolution")


def _place(spec, x, kernel, bias, a, b):
    """The input in host memory, the kernel and per-channel vectors on the compute device."""
    ensure_eager("big_conv2d", x, kernel, bias, a, b)
    ex = spec.ex
    x = x if isinstance(x, spill.Spilled) else ex.to_host(x)  # a store's bands are read as used
    return (x, *(None if v is None else ex.to_compute(v) for v in (kernel, bias, a, b)))


def _band(ex, v, n0, n1, r0, r1):
    """Images [n0, n1), rows [r0, r1) of host array ``v``, on the compute device."""
    return ex.to_compute(ex.call("take_band", take_band, v, n0, n1, r0, r1))


def _residual_bands(spec, plan, x, y):
    """Iterators over the backward's input bands (with halos) and, with statistics, output bands of
    the residuals ``x``, ``y``, in host memory: cut from RAM, or read from the spill store one band
    ahead (``spill.bands``)."""
    ex = spec.ex
    xs = spill.bands(ex, x, [(p.n0, p.n1, p.i0, p.i1) for p in plan])
    ys = spill.bands(ex, y, [(p.n0, p.n1, p.r0, p.r1) for p in plan]) if spec.stats else None
    return xs, ys


def _forward(spec, x, kernel, bias, a, b):
    """Algorithm 3: stream input bands to the device, output bands back to the host (placed args)."""
    ex = spec.ex
    _plan(spec, x, kernel, a, backward=True)  # fail now, not after the forward, if bwd cannot fit
    if ex.engine == "compiled":
        return _compiled_forward(spec, ex.restore(x), kernel, bias, a, b)
    bands, acc = [], None
    plan = _plan(spec, x, kernel, a, backward=False)
    xs = spill.bands(ex, x, [(p.n0, p.n1, p.i0, p.i1) for p in plan])
    for p in plan:
        ex.window.admit(ex)
        xb = ex.to_compute(next(xs))
        yb, acc = ex.call("conv_forward", _forward_kernel, xb, kernel, bias, a, b, acc,
                          geom=spec.geom, pad=(p.pad_top, p.pad_bottom), stats=spec.stats)
        bands.append((p, ex.to_host_async(yb)))
        ex.window.track(bands[-1][1])
        del xb, yb
    y = join_on_host(ex, bands)
    return (y, *moments.finish_moments(acc)) if spec.stats else y


def _emitted_rows(plan: list[Partition], h: int) -> list[tuple[int, int]]:
    """Rows [start, end) of the input gradient each band emits (overlap-added, disjoint): from where
    the band before it in its image stopped (0 for an image's first) to the next band's first input
    row (the image's last row for its last)."""
    rows, start = [], 0
    for k, p in enumerate(plan):
        nxt = plan[k + 1] if k + 1 < len(plan) else None
        end = nxt.i0 if nxt is not None and nxt.n0 == p.n0 else h
        start = 0 if p.r0 == 0 else start
        rows.append((start, end))
        start = end
    return rows


def _backward(spec, res, cts):
    """Algorithm 4: per band, input gradient (overlap-added) to the host, weight gradient on device."""
    x, kernel, bias, a, b, y, mean = res
    ex = spec.ex
    g = ex.to_host(cts[0] if spec.stats else cts)
    count = g_mean = g_var = None
    if spec.stats:
        count = ex.to_compute(np.float32(np.prod(y.shape[:-1])))
        g_mean, g_var = ex.to_compute(cts[1]), ex.to_compute(cts[2])
    if ex.engine == "compiled":
        res = (ex.restore(x), kernel, bias, a, b, ex.restore(y), mean)
        spill.release(x, y)  # ``res`` holds the arrays until the pass ends
        return _compiled_backward(spec, res, g, (mean, g_mean, g_var, count))
    plan = _plan(spec, x, kernel, a, backward=True)
    if not spec.input_grad:
        grads = _parameter_backward(spec, plan, res, g, (mean, g_mean, g_var, count))
        spill.release(x, y)
        return grads
    acc = zeros_like((kernel, bias, a, b))
    bands, carry = [], None
    xs, ys = _residual_bands(spec, plan, x, y)
    for p, (start, end) in zip(plan, _emitted_rows(plan, x.shape[1])):
        ex.window.admit(ex)
        if p.r0 == 0:  # a new image chunk: nothing to overlap-add yet
            carry = ex.to_compute(np.zeros((p.n1 - p.n0, 0, *x.shape[2:]), kernel.dtype))
        gb = _band(ex, g, p.n0, p.n1, p.r0, p.r1)
        if spec.stats:
            yb = ex.to_compute(next(ys))
            gb = ex.call("conv_backward", _stats_cotangent, gb, yb, mean, g_mean, g_var, count)
            del yb
        xb = ex.to_compute(next(xs))
        acc, out, carry = ex.call(
            "conv_backward", _backward_kernel, acc, carry, xb, kernel, bias, a, b, gb,
            geom=spec.geom, pad=(p.pad_top, p.pad_bottom), emit=end - start,
            take=min(p.i1, end) - start)
        bands.append((p, ex.to_host_async(out)))
        ex.window.track(bands[-1][1])
        del xb, gb, out
    del xs, ys
    spill.release(x, y)  # the last read of this op's residuals: freed now, not when the pass ends
    return (join_on_host(ex, bands), *acc)


def _band_bytes(v, n, rows):
    """Bytes of ``n`` images x ``rows`` rows of NHWC ``v``."""
    return n * rows * int(np.prod(v.shape[2:])) * v.dtype.itemsize


def _per_image(plan: list[Partition]) -> bool:
    """Whether the plan cuts images into row bands (then every image has image 0's bands)."""
    return len(plan) > 1 and plan[0].n1 - plan[0].n0 == 1 and plan[1].n0 == 0


def _image_0(plan: list[Partition], per_image: bool) -> list[Partition]:
    """The partitions a compiled pass's runs are built from: image 0's where its loop repeats them
    over the images, else all."""
    return [p for p in plan if p.n0 == 0] if per_image else plan


def _parameter_backward(spec, plan, res, g, statistics):
    """Algorithm 4 without the input gradient (the input is not differentiated, e.g. the image a
    model starts from): per band, only the kernel's gradient; nothing goes back to the host."""
    x, kernel, bias, a, b, y, mean = res
    ex = spec.ex
    acc = zeros_like((kernel, bias))
    xs, ys = _residual_bands(spec, plan, x, y)
    for p in plan:
        ex.window.admit(ex)
        gb = _band(ex, g, p.n0, p.n1, p.r0, p.r1)
        if spec.stats:
            gb = ex.call("conv_backward", _stats_cotangent, gb, ex.to_compute(next(ys)),
                         *statistics)
        acc = ex.call("conv_backward", _parameter_grad_kernel, acc, ex.to_compute(next(xs)),
                      kernel, bias, gb, geom=spec.geom, pad=(p.pad_top, p.pad_bottom))
        ex.window.track(acc)
        del gb
    return (None, *acc, None, None)


def _compiled_forward(spec, x, kernel, bias, a, b):
    """Algorithm 3 as one program looping over the partitions (``compiled``)."""
    ex = spec.ex
    plan = _plan(spec, x, kernel, a, backward=False)
    per_image = _per_image(plan)
    items = [((p.n1 - p.n0, p.i1 - p.i0, p.pad_top, p.pad_bottom), (p.n0, p.i0, p.r0))
             for p in _image_0(plan, per_image)]
    oh, ow = spec.geom.out_size(*x.shape[1:3])
    out_shape = (x.shape[0], oh, ow, kernel.shape[-1])
    buf, acc = ex.call(
        "conv_forward", compiled.forward_program, ex.to_staging(x), kernel, bias, a, b,
        place=ex.placement(), plan=tuple(compiled.runs(items)), per_image=per_image,
        out_shape=out_shape, geom=spec.geom, stats=spec.stats, kernel_fn=_forward_kernel,
        prefetch=ex.prefetch != 0)
    out = jax.ShapeDtypeStruct(out_shape, x.dtype)
    ex.band_copies(sum(_band_bytes(x, p.n1 - p.n0, p.i1 - p.i0) for p in plan),
                   sum(_band_bytes(out, p.n1 - p.n0, p.r1 - p.r0) for p in plan))
    y = ex.from_staging(buf)
    return (y, *moments.finish_moments(acc)) if spec.stats else y


def _compiled_backward(spec, res, g, statistics):
    """Algorithm 4 as one program looping over the partitions (``compiled``)."""
    x, kernel, bias, a, b, y, mean = res
    ex = spec.ex
    plan = _plan(spec, x, kernel, a, backward=True)
    per_image = _per_image(plan)
    looped = _image_0(plan, per_image)
    items = [((p.n1 - p.n0, p.r1 - p.r0, p.i1 - p.i0, p.pad_top, p.pad_bottom, end - start,
               min(p.i1, end) - start, p.r0 == 0), (p.n0, p.r0, p.i0, start))
             for p, (start, end) in zip(looped, _emitted_rows(looped, x.shape[1]))]
    ys = ex.to_staging(y) if spec.stats else None  # read only for the statistics' cotangent
    dx, grads = ex.call(
        "conv_backward", compiled.backward_program, ex.to_staging(x), kernel, bias, a, b,
        ex.to_staging(g), ys, *statistics, place=ex.placement(), plan=tuple(compiled.runs(items)),
        per_image=per_image, geom=spec.geom, stats=spec.stats,
        kernel_fn=_backward_kernel if spec.input_grad else _parameter_grad_kernel,
        cotangent_fn=_stats_cotangent, prefetch=ex.prefetch != 0, input_grad=spec.input_grad)
    h2d = sum(_band_bytes(g, p.n1 - p.n0, p.r1 - p.r0) * (1 + spec.stats)
              + _band_bytes(x, p.n1 - p.n0, p.i1 - p.i0) for p in plan)
    ex.band_copies(h2d, _band_bytes(x, x.shape[0], x.shape[1]) if spec.input_grad else 0)
    if not spec.input_grad:
        return (None, *grads, None, None)
    return (ex.from_staging(dx), *grads)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _conv(spec, x, kernel, bias, a, b):
    return _forward(spec, *_place(spec, x, kernel, bias, a, b))


def _conv_fwd(spec, x, kernel, bias, a, b):
    placed = _place(spec, x, kernel, bias, a, b)
    out = _forward(spec, *placed)
    # the output is read back only for its statistics' cotangent; beyond host_memory, both
    # activations wait on disk (``Execution.keep``)
    y, mean = (spec.ex.keep(out[0]), out[1]) if spec.stats else (None, None)
    return out, (spec.ex.keep(placed[0]), *placed[1:], y, mean)


_conv.defvjp(_conv_fwd, _backward)


def _spec(x, kernel, stride, padding, dilation, execution, stats, prologue=False) -> _Spec:
    """The op's static settings. Outside ``jit`` an input is a tracer exactly when something
    differentiates it (the image a model starts from is not), so the backward knows whether to
    compute the input gradient; with a prologue it does (its parameters' gradients need it)."""
    if not isinstance(execution, Execution):
        raise TypeError(f"execution must be a bigjax.layers.Execution, got {execution!r}")
    geom = ConvGeometry.make(kernel.shape[:2], stride, padding, dilation)
    input_grad = prologue or isinstance(x, jax.core.Tracer)
    return _Spec(geom, execution, stats, input_grad)


def big_conv2d(x, kernel, bias=None, *, stride=1, padding=0, dilation=1, execution: Execution):
    """Memory-bounded conv2d of an NHWC activation in host memory (Big-Layers Algorithms 3–4).

    Args:
      x: (N, H, W, Cin) float array, numpy or JAX; kept in (or moved to) host memory. Or a store
        (``spill.from_store``: a tensorstore array, the image a model starts from) whose bands
        are read as the passes need them.
      kernel: (KH, KW, Cin, Cout) HWIO weights; bias: optional (Cout,).
      stride, padding, dilation: ints or (rows, cols) pairs, as ``torch.nn.functional.conv2d``.
      execution: the compute and host devices and the partition budget.
    Returns:
      (N, OH, OW, Cout) output in host memory; differentiable with ``jax.grad`` outside ``jit``.
    """
    spec = _spec(x, kernel, stride, padding, dilation, execution, stats=False)
    return _conv(spec, x, kernel, bias, None, None)


def big_conv2d_stats(x, kernel, *, pre_scale=None, pre_shift=None, stride=1, padding=0,
                     dilation=1, execution: Execution):
    """Fused conv: ``y = conv(relu(x * pre_scale + pre_shift))`` plus y's per-channel moments.

    The prologue (a folded BatchNorm + ReLU of the layer before) runs on each input band on the device,
    and y's mean and biased variance are accumulated in the same pass, so the BatchNorm after this conv
    needs no pass of its own. Gradients flow through the statistics exactly.

    Returns:
      (y in host memory, mean (Cout,), biased variance (Cout,)) — the statistics on the compute device.
    """
    if (pre_scale is None) != (pre_shift is None):
        raise ValueError("pre_scale and pre_shift go together (a folded BatchNorm), got only one")
    spec = _spec(x, kernel, stride, padding, dilation, execution, stats=True,
                 prologue=pre_scale is not None)
    return _conv(spec, x, kernel, None, pre_scale, pre_shift)
