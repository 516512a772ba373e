"""Three ways to run the same ResNet layers: in memory, Big-Layers as in the paper, Big-Layers fused.

A residual block is written once (``resnet.BasicBlock``/``Bottleneck``) against the small interface
below: ``fork`` (a block's input, to its first conv and its shortcut), ``conv_bn`` (a conv and its
BatchNorm), ``relu``, ``add_relu`` (the block's end) and ``stem_pool`` (ReLU + max-pool after the
stem). A path may add ``whole`` to run a block, or the stem, as one program where it can, and
``streamed_stem`` to run the stem in row bands that never hold its conv output (``Fused`` has both;
``stem`` picks). Each path implements it:

* ``InMemory`` — plain Flax on the compute device, jittable: the tail after the big stages and the
  in-memory twin.
* ``Separate`` — the paper's Big-Layers: a partitioned conv, a two-pass partitioned BatchNorm, ReLU and
  the residual add as host ops. Every op streams its activation on its own.

The two Big paths are built with an ``Execution`` (devices and partition budget) and hand it to every
op; the parameter modules hold none of it.
* ``Fused`` — the same mathematics with fewer trips across the bus: the conv accumulates its output's
  BatchNorm statistics in its own pass, and its BatchNorm is kept *folded* (``y, a, b`` with
  ``BN(y) = y*a + b``) until the next op applies it — the next conv on the device, in its prologue
  (with the ReLU), or the block's end on the host (with the residual add and ReLU) in one pass. A
  block (or the stem) whose whole working set fits the partition budget runs as one device program
  instead (``layers.whole``, ``Execution.whole_blocks``): the in-memory ops, one custom_vjp.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import jax
from flax import nnx

from bigjax.layers import host, stem as streamed
from bigjax.layers.execution import Execution
from bigjax.layers.host import max_pool_plain
from bigjax.layers.modules import BigBatchNorm
from bigjax.layers.whole import run_whole

__all__ = ["InMemory", "Separate", "Fused", "Folded", "stem"]


def stem(path, x, conv, bn, train):
    """conv, BatchNorm, ReLU, max-pool on ``path``: streamed where the path streams the stem
    (``Fused.streamed_stem``), else op by op."""
    streamed_stem = getattr(path, "streamed_stem", None)
    y = None if streamed_stem is None else streamed_stem(x, conv, bn, train)
    return path.stem_pool(path.conv_bn(x, conv, bn, train)) if y is None else y


class InMemory:
    """Plain layers on the compute device (jittable)."""

    @staticmethod
    def fork(x):
        return x, x

    @staticmethod
    def conv_bn(x, conv, bn, train):
        return bn.plain(conv.plain(x), train=train)

    @staticmethod
    def relu(x):
        return jax.nn.relu(x)

    @staticmethod
    def add_relu(x, shortcut):
        return jax.nn.relu(x + shortcut)

    @staticmethod
    def stem_pool(x):
        return max_pool_plain(jax.nn.relu(x))


@dataclass(frozen=True)
class Separate:
    """The paper's Big-Layers: each op streams its own activation; ReLU and add on the host."""

    execution: Execution

    def fork(self, x):
        return host.fork(x, execution=self.execution)

    def conv_bn(self, x, conv, bn, train):
        ex = self.execution
        return bn(conv(x, execution=ex), train=train, execution=ex)

    def relu(self, x):
        return host.relu(x, execution=self.execution)

    def add_relu(self, x, shortcut):
        ex = self.execution
        return host.relu(host.add(x, shortcut, execution=ex), execution=ex)

    def stem_pool(self, x):
        ex = self.execution
        return host.max_pool(host.relu(x, execution=ex), execution=ex)


@dataclass(frozen=True)
class Folded:
    """A conv output ``y`` (host) whose BatchNorm ``y*a + b`` (and ReLU) is not applied yet."""

    y: jax.Array
    a: jax.Array
    b: jax.Array
    relu: bool = False


def _in_memory(module, x, *, ops, train):
    """``ops`` in memory, in the parameters' dtype, the output in ``x``'s (``host_dtype``)."""
    wide = jax.tree.leaves(nnx.state(module, nnx.Param))[0].dtype
    return ops(module, InMemory, x.astype(wide), train).astype(x.dtype)


@dataclass(frozen=True)
class Fused:
    """Big-Layers with BatchNorm statistics from the conv's pass and BatchNorm applied where used."""

    execution: Execution

    def whole(self, module, ops, x, train):
        """``ops(module, InMemory, x, train)`` as one device program, or None where it does not fit
        the budget or ``whole_blocks`` is off (the caller then runs ``ops`` on this path)."""
        if not self.execution.whole_blocks:
            return None
        return run_whole(module, x, _in_memory, (("ops", ops), ("train", train)), self.execution)

    def fork(self, x):
        return host.fork(x, execution=self.execution)

    def conv_bn(self, x, conv, bn, train):
        ex = self.execution
        if isinstance(x, Folded):
            if not x.relu:
                raise ValueError("a folded BatchNorm feeds a conv only through a ReLU")
            y, mean, var = conv.with_stats(x.y, x.a, x.b, execution=ex)
        else:
            y, mean, var = conv.with_stats(x, execution=ex)
        a, b = bn.folded(mean, var, y.size // y.shape[-1], train=train, execution=ex)
        return Folded(y, a, b)

    @staticmethod
    def relu(x: Folded) -> Folded:
        return replace(x, relu=True)

    def add_relu(self, x: Folded, shortcut):
        ex = self.execution
        if isinstance(shortcut, Folded):
            return host.affine_add_relu(x.y, x.a, x.b, shortcut.y, shortcut.a, shortcut.b,
                                        execution=ex)
        return host.affine_add_relu(x.y, x.a, x.b, shortcut, execution=ex)

    def stem_pool(self, x: Folded):
        return host.affine_relu_max_pool(x.y, x.a, x.b, execution=self.execution)

    def streamed_stem(self, x, conv, bn, train):
        """The stem in row bands recomputing its conv (``layers.stem``), or None where the execution
        does not stream it (``Execution.streams_stem``), the input is differentiated or the conv
        has a bias (the caller then runs it op by op)."""
        ex = self.execution
        if not ex.streams_stem or isinstance(x, jax.core.Tracer) or conv.bias is not None:
            return None
        kernel = conv.kernel[...]
        mean = var = None
        if train or not isinstance(bn, BigBatchNorm):  # a GroupNorm's are the map's own, always
            mean, var = streamed.stem_moments(x, kernel, conv.geom, execution=ex)
        h, w = conv.geom.out_size(*x.shape[1:3])
        a, b = bn.folded(mean, var, x.shape[0] * h * w, train=train, execution=ex)
        return streamed.stem_pool(x, kernel, a, b, conv.geom, execution=ex)
