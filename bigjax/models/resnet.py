"""ResNet-18/34/50 tile encoders whose stem and first stages are Big-Layers, the rest a jitted tail.

``BigResNet(depth, big_stages)`` runs the stem and the first ``big_stages`` residual stages with
partitioned, host-offloaded ops (``resnet_paths.Fused`` by default, or the paper's ``Separate`` ops)
and the remaining stages as an ordinary jitted Flax tail on the compute device of the ``Execution`` it
is called with (devices and partition budget; the model holds parameters only); it returns the pooled
embedding (512 or 2048 wide) in that device's memory, so a MIL head and ``nnx.grad`` sit on top with
nothing special — with respect to the parameters and to the input. ``ResNet`` is the in-memory twin with the same parameters (torchvision's
layout and init; ResNet-50 is v1.5, stride on the 3x3 conv). ``load_torchvision`` imports weights.

References: He et al., "Deep Residual Learning for Image Recognition" (2016); torchvision.models.resnet.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigjax.layers import host
from bigjax.layers.execution import Execution
from bigjax.layers.modules import BigBatchNorm, BigConv
from bigjax.models.resnet_paths import Fused, InMemory, Separate, stem

__all__ = ["ResNet", "BigResNet", "in_memory_twin", "load_torchvision", "remat_trunk"]


def _conv_bn(cin, cout, k, stride, padding, rngs):
    return (BigConv(cin, cout, k, stride=stride, padding=padding, rngs=rngs), BigBatchNorm(cout))


def _downsample(cin, cout, stride, rngs):
    """torchvision's projection shortcut (1x1 conv + BN) where the shape changes, else None."""
    if stride == 1 and cin == cout:
        return None
    return nnx.List(_conv_bn(cin, cout, 1, stride, 0, rngs))


class BasicBlock(nnx.Module):
    """Two 3x3 convs with BatchNorm and an identity or projection shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(self, cin, planes, stride, rngs):
        self.conv1, self.bn1 = _conv_bn(cin, planes, 3, stride, 1, rngs)
        self.conv2, self.bn2 = _conv_bn(planes, planes, 3, 1, 1, rngs)
        self.downsample = _downsample(cin, planes, stride, rngs)

    def __call__(self, path, x, train):
        x, skip = path.fork(x)
        h = path.relu(path.conv_bn(x, self.conv1, self.bn1, train))
        h = path.conv_bn(h, self.conv2, self.bn2, train)
        return path.add_relu(h, _shortcut(self, path, skip, train))


class Bottleneck(nnx.Module):
    """1x1 reduce, 3x3 (with the stride, torchvision v1.5), 1x1 expand x4 (ResNet-50)."""

    expansion = 4

    def __init__(self, cin, planes, stride, rngs):
        self.conv1, self.bn1 = _conv_bn(cin, planes, 1, 1, 0, rngs)
        self.conv2, self.bn2 = _conv_bn(planes, planes, 3, stride, 1, rngs)
        self.conv3, self.bn3 = _conv_bn(planes, planes * 4, 1, 1, 0, rngs)
        self.downsample = _downsample(cin, planes * 4, stride, rngs)

    def __call__(self, path, x, train):
        x, skip = path.fork(x)
        h = path.relu(path.conv_bn(x, self.conv1, self.bn1, train))
        h = path.relu(path.conv_bn(h, self.conv2, self.bn2, train))
        h = path.conv_bn(h, self.conv3, self.bn3, train)
        return path.add_relu(h, _shortcut(self, path, skip, train))


def _shortcut(block, path, x, train):
    if block.downsample is None:
        return x
    conv, bn = block.downsample
    return path.conv_bn(x, conv, bn, train)


def _stem_ops(module, path, x, train):
    return stem(path, x, *module, train)


def _block_ops(block, path, x, train):
    return block(path, x, train)


def _run(path, module, ops, x, train):
    """``ops(module, path, x, train)``; or, where the path runs a module whole (``Fused.whole``:
    one device program, where it fits the partition budget), that."""
    whole = getattr(path, "whole", None)
    y = None if whole is None else whole(module, ops, x, train)
    return ops(module, path, x, train) if y is None else y


_ARCH = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)),
         50: (Bottleneck, (3, 4, 6, 3))}


class ResNet(nnx.Module):
    """In-memory ResNet encoder (the twin): NHWC float32 in, pooled (N, 512|2048) embedding out."""

    def __init__(self, depth: int = 18, *, rngs: nnx.Rngs | None = None):
        if depth not in _ARCH:
            raise ValueError(f"depth must be one of {sorted(_ARCH)}, got {depth}")
        rngs = rngs or nnx.Rngs(0)
        block, counts = _ARCH[depth]
        self.depth = depth
        self.conv1, self.bn1 = _conv_bn(3, 64, 7, 2, 3, rngs)
        cin = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), counts)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, planes, 2 if i and not j else 1, rngs))
                cin = planes * block.expansion
            setattr(self, f"layer{i + 1}", nnx.List(blocks))
        self.embed_dim = cin

    def stem(self, path, x, train):
        """conv 7x7/2, BatchNorm, ReLU, max-pool 3x3/2."""
        return _run(path, nnx.List([self.conv1, self.bn1]), _stem_ops, x, train)

    def stages(self, path, x, start, stop, train):
        """Residual stages ``start`` to ``stop`` (0-based, stop exclusive)."""
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4)[start:stop]:
            for block in layer:
                x = _run(path, block, _block_ops, x, train)
        return x

    def __call__(self, x, *, train: bool):
        x = self.stages(InMemory, self.stem(InMemory, x, train), 0, 4, train)
        return jnp.mean(x, axis=(1, 2))


def remat_trunk(model: ResNet, path, x, train: bool, *, stem: bool = True):
    """The stem and the four stages with each residual block (and, with ``stem``, the stem) under
    ``nnx.remat`` (Chen et al., "Training deep nets with sublinear memory cost"): the backward keeps
    each block's input and recomputes its inner activations, one block at a time; the BatchNorm
    running-statistics updates are kept. Returns the last stage's map (jittable; any path)."""
    def run_stem(m, h):
        return m.stem(path, h, train)

    x = (nnx.remat(run_stem) if stem else run_stem)(model, x)
    block_step = nnx.remat(lambda block, h: block(path, h, train))
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            x = block_step(block, x)
    return x


@functools.partial(nnx.jit, static_argnames=("start", "train"))
def _tail(model, x, start, train):
    """The stages after the big ones and the global average pool: one jitted Flax function."""
    return jnp.mean(model.stages(InMemory, x, start, 4, train), axis=(1, 2))


class BigResNet(ResNet):
    """ResNet whose stem and first ``big_stages`` stages are Big-Layers (host activations).

    Args:
      depth: 18, 34 or 50.
      big_stages: 0–4 residual stages run big after the (always big) stem; the rest is a jitted tail.
      fused: conv + BatchNorm statistics in one pass and BatchNorm applied where used (default), or
        the paper's separate ops (False). Both give the same results.
    Call ``model(x, train=..., execution=...)`` outside ``jit`` (``nnx.grad`` works, with respect to
    the parameters and to ``x``) with NHWC float32 x, numpy or JAX, or a tensorstore array (NHWC
    or HWC, e.g. a slide's zarr array, not differentiated) whose row bands the stem's conv reads
    as it needs them; ``execution`` (devices and partition budget) defaults to ``Execution()``.
    """

    def __init__(self, depth: int = 18, *, big_stages: int = 4, fused: bool = True,
                 rngs: nnx.Rngs | None = None):
        if not 0 <= big_stages <= 4:
            raise ValueError(f"big_stages must be in 0..4, got {big_stages}")
        super().__init__(depth, rngs=rngs)
        self.big_stages, self.fused = big_stages, fused

    def __call__(self, x, *, train: bool, execution: Execution | None = None):
        ex = execution or Execution()
        if ex.host_dtype is not None and not self.fused:
            raise ValueError("host_dtype (narrow host activations) needs the fused path; the "
                             "separate ops compute in their activations' dtype")
        path = Fused(ex) if self.fused else Separate(ex)
        x = ex.input(x, self.conv1.kernel.get_value().dtype)  # a slide's store: read in bands
        x = self.stages(path, self.stem(path, x, train), 0, self.big_stages, train)
        if self.big_stages == 4:
            return ex.to_compute(host.global_avg_pool(x, execution=ex))
        wide = self.conv1.kernel.get_value().dtype
        return _tail(self, ex.to_compute(x).astype(wide), start=self.big_stages, train=train)


def in_memory_twin(model: ResNet) -> ResNet:
    """A plain in-memory ``ResNet`` with a copy of ``model``'s parameters and batch statistics."""
    twin = ResNet(model.depth)
    nnx.update(twin, nnx.clone(nnx.state(model)))
    return twin


_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
               "var": "running_var"}


def load_torchvision(model: ResNet, source: str | Path | Mapping[str, np.ndarray]) -> None:
    """Load torchvision/timm ResNet weights (``conv1.weight``, ``layer1.0.bn1.running_mean``, …).

    Args:
      model: a ``ResNet``/``BigResNet`` of the matching depth; updated in place.
      source: a ``.safetensors`` file or a name → array mapping (no torch needed). Conv weights are
        OIHW and are transposed to HWIO; ``fc.*`` and ``num_batches_tracked`` are ignored.
    Raises:
      KeyError / ValueError naming the unknown, missing or mis-shaped key.
    """
    tensors = _read_tensors(source)
    flat = nnx.to_flat_state(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))
    wanted = {".".join(map(str, (*path[:-1], _TORCH_LEAF[path[-1]]))): (path, var)
              for path, var in flat}
    unknown = sorted(k for k in tensors if k not in wanted and not _ignored(k))
    if unknown:
        raise KeyError(f"{_name(source)}: unknown key(s) for ResNet-{model.depth}: {unknown[:5]}")
    missing = sorted(k for k in wanted if k not in tensors)
    if missing:
        raise KeyError(f"{_name(source)}: missing key(s) for ResNet-{model.depth}: {missing[:5]}")
    updated = [(path, var.replace(_converted(name, tensors[name], path[-1], var)))
               for name, (path, var) in wanted.items()]
    nnx.update(model, nnx.from_flat_state(updated))


def _read_tensors(source) -> dict[str, np.ndarray]:
    if isinstance(source, (str, Path)):
        from safetensors.numpy import load_file
        return load_file(str(source))
    return dict(source)


def _ignored(key: str) -> bool:
    return key.startswith("fc.") or key.endswith("num_batches_tracked")


def _name(source) -> str:
    return str(source) if isinstance(source, (str, Path)) else "weights"


def _converted(name, value, leaf, var):
    value = np.asarray(value, np.float32)
    if leaf == "kernel":
        value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value
    expected = var.get_value().shape
    if value.shape != expected:
        raise ValueError(f"{name}: shape {value.shape} does not fit the model's {expected}"
                         + (" (HWIO after transposing OIHW)" if leaf == "kernel" else ""))
    return jnp.asarray(value)
