"""A tiny local network (the real classes, small blocks) and gradient comparisons for the local tests."""

import weakref

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigjax.layers import Execution
from bigjax.layers.modules import BigBatchNorm, BigConv
from bigjax.local import LocalNetwork
from bigjax.models.resnet import BasicBlock

X = np.random.default_rng(0).normal(size=(1, 61, 45, 3)).astype(np.float32)  # odd sizes
LABEL = 2


def tiny_network(n_modules: int, seed: int = 0, **options) -> LocalNetwork:
    """Stem 7x7/3 to 8 channels and four one-block pieces (8, 16/2, 16, 32/2): x_0 is 11x8."""
    rngs = nnx.Rngs(seed)
    stem = (BigConv(3, 8, 7, stride=3, padding=3, rngs=rngs), BigBatchNorm(8))
    pieces = [[BasicBlock(8, 8, 1, rngs)], [BasicBlock(8, 16, 2, rngs)],
              [BasicBlock(16, 16, 1, rngs)], [BasicBlock(16, 32, 2, rngs)]]
    # final_kernel 1: H keeps x_K's 3x2 positions (one position would GroupNorm to 0, refused)
    options = dict(dict(aux_kernel=2, final_kernel=1, patch=6, n_patches=3), **options)
    net = LocalNetwork(stem, pieces, (8, 16, 16, 32), (1, 2, 2, 4), n_modules, 3, stem_channels=8,
                       rngs=rngs, **options)
    randomize_batch_norm(net, seed)
    return net


def randomize_batch_norm(model: nnx.Module, seed: int) -> None:
    """Running statistics and scales away from 0/1, so a frozen BatchNorm is not the identity."""
    rng = np.random.default_rng(seed + 100)
    for _, bn in nnx.iter_modules(model):
        if isinstance(bn, BigBatchNorm):
            n = bn.mean.shape
            bn.mean[...] = jnp.asarray(rng.normal(0, 0.2, n), jnp.float32)
            bn.var[...] = jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.float32)
            bn.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, n), jnp.float32)


def module_state(net: LocalNetwork, i: int) -> nnx.State:
    return nnx.state(net.local_modules[i], nnx.Param)


def rel_err(a, b) -> float:
    """max |a - b| over all leaves / max |b| over all leaves (a gradient's scale is its largest entry)."""
    pairs = [(np.asarray(jax.device_get(x), np.float64), np.asarray(jax.device_get(y), np.float64))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)]
    diff = max(float(np.max(np.abs(x - y), initial=0)) for x, y in pairs)
    return diff / max(max(float(np.max(np.abs(y), initial=0)) for _, y in pairs), 1e-30)


def watch_holds(monkeypatch):
    """``(held, alive, observer)``: ``held`` gets a weak reference to every array an ``Execution``
    holds (``Execution.hold``, patched), and the ``observer`` appends to ``alive``, at each backward
    kernel, how many of them are alive."""
    held, alive = [], []
    hold = Execution.hold

    def watched_hold(self, x):
        held.append(weakref.ref(x))
        return hold(self, x)

    def observer(event, fn, *args, **kwargs):
        if event.endswith("_backward"):
            alive.append(sum(r() is not None for r in held))
        return fn(*args, **kwargs)

    monkeypatch.setattr(Execution, "hold", watched_hold)
    return held, alive, observer
