"""Tiny encoders and single-device references for the encoder-mesh tests.

``tiny_resnet`` is a ResNet-18 cut to its stem and one block of stages 1 and 2 (a stride-2 projection
shortcut included): every kind of layer of the real encoder, a few seconds to compile.

Exactness in float64. The mesh and one device sum in different orders; in float32 that round-off
(~1e-7) is amplified where a ReLU or a max-pool choice flips on a value within round-off of its
threshold, and how often that happens depends on the CPU (a 1e-5 bound held on Intel Xeon and failed
with 1.6e-3 on AMD EPYC). In float64 both paths agree to ~1e-15 (measured), so the tests that claim
the mesh computes one device's gradient run in float64 (``float64()``, ``to_float64``) with bound
``EXACT``: a bound that measures the algorithm, not the CPU.
"""

import contextlib

import jax
import numpy as np
from flax import nnx

from bigjax.models import mil
from bigjax.models.resnet import BigResNet, ResNet

TILES = np.random.default_rng(0).normal(size=(5, 29, 27, 3)).astype(np.float32)  # 5: odd, ragged
LABEL = 2
EXACT = 1e-10  # float64: measured ~2e-15 relative to the largest gradient (xla and explicit)


@contextlib.contextmanager
def float64():
    """float64 arithmetic for the block (``jax.enable_x64``): arrays made inside stay float64."""
    with jax.enable_x64(True):
        yield


def to_float64(build, *args, **kwargs):
    """``build(*args, **kwargs)`` with its floating Params/BatchStats cast to float64.

    Built with x64 off: under ``jax.enable_x64`` initialisers draw float64 numbers, other parameters
    than the float32 tests' (and the bfloat16 test's) models have.
    """
    with jax.enable_x64(False):
        module = build(*args, **kwargs)
    state = nnx.state(module)
    nnx.update(module, jax.tree.map(
        lambda v: v.astype(np.float64) if jax.numpy.issubdtype(v.dtype, np.floating) else v, state))
    return module


def tiny_resnet(big: bool = False, seed: int = 0, stages: int = 2) -> ResNet:
    """ResNet-18's stem and the first block of its first ``stages`` (1 or 2) stages."""
    model = BigResNet(18, big_stages=4, rngs=nnx.Rngs(seed)) if big else ResNet(18, rngs=nnx.Rngs(seed))
    model.layer1 = nnx.List([model.layer1[0]])
    model.layer2 = nnx.List([model.layer2[0]] if stages == 2 else [])
    model.layer3, model.layer4 = nnx.List([]), nnx.List([])
    model.embed_dim = 64 * stages
    return model


def head(name: str = "abmil", in_dim: int = 128, **kwargs):
    return mil.build(name, in_dim, 3, rngs=nnx.Rngs(1), **kwargs)


def _slide_loss(encoder, head, tiles):
    return mil.bag_loss(head(encoder(tiles, train=True), train=True), LABEL)


def one_device(encoder, head, tiles=TILES):
    """Loss and (encoder, head) gradients of the same model on one device (plain jitted nnx)."""
    return nnx.jit(nnx.value_and_grad(_slide_loss, argnums=(0, 1)))(encoder, head, tiles)


def per_shard_reference(encoder, head, shards):
    """Each shard encoded on its own (its own BatchNorm batch), features concatenated, one device."""
    def loss(encoder, head, shards):
        features = [encoder(x, train=True) for x in shards]
        return mil.bag_loss(head(jax.numpy.concatenate(features), train=True), LABEL)
    return nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)))(encoder, head, shards)


def per_shard_running_stats(encoder, shards):
    """Running statistics as the mesh keeps them with per-shard BatchNorm: each shard's replica
    updated once from the same start, then averaged with weights = the shards' tile counts."""
    states = []
    for x in shards:
        replica = nnx.clone(encoder)
        nnx.jit(lambda m, x: m(x, train=True))(replica, x)
        states.append(nnx.state(replica, nnx.BatchStat))
    weights = np.array([len(x) for x in shards], np.float64) / sum(len(x) for x in shards)
    return jax.tree.map(lambda *v: sum(w * np.asarray(a) for w, a in zip(weights, v)).astype(v[0].dtype),
                        *states)


def assert_close(ours, theirs, tol, dtype=None):
    """Every leaf within ``tol`` of the reference, relative to the largest value of its tree.

    Per tree, not per leaf: a gradient that is zero in exact arithmetic (the bias of a softmax
    score) is round-off in both computations, with no relative precision of its own. ``ours`` has
    ``dtype`` (default: the reference's, float32 or float64).
    """
    ours, theirs = dict(nnx.to_flat_state(ours)), dict(nnx.to_flat_state(theirs))
    assert ours.keys() == theirs.keys()
    scale = max(float(np.max(np.abs(np.asarray(jax.device_get(v.get_value())))))
                for v in theirs.values())
    for path, v in theirs.items():
        a, b = (np.asarray(jax.device_get(x.get_value())) for x in (ours[path], v))
        assert a.dtype == (dtype or b.dtype) and a.dtype in (np.float32, np.float64), (path, a.dtype)
        assert a.shape == b.shape, path
        a, b = a.astype(np.float64), b.astype(np.float64)
        err = float(np.max(np.abs(a - b))) / scale
        assert err < tol, (path, err)


def rel(a, b) -> float:
    a, b = (np.asarray(jax.device_get(x), np.float64) for x in (a, b))
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def cosine(a, b) -> float:
    """Cosine of the angle between two gradient trees, flattened."""
    u, v = (np.concatenate([np.ravel(jax.device_get(x)) for x in jax.tree.leaves(t)]).astype(np.float64)
            for t in (a, b))
    return float(u @ v / np.linalg.norm(u) / np.linalg.norm(v))
