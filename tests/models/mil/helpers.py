"""Small configurations of every aggregator and jitted calls, shared by the MIL tests."""

import jax
import jax.numpy as jnp
from flax import nnx

from bigjax.models.mil import bag_loss, build

IN_DIM, N_CLASSES = 12, 3

# Paper structure at toy widths, so each test runs in seconds on a CPU.
SMALL = {
    "abmil": dict(hidden=24, attn_dim=16),
    "gated_abmil": dict(hidden=24, attn_dim=16),
    "abmil_bernoulli": dict(hidden=24, attn_dim=16),
    "gated_abmil_bernoulli": dict(hidden=24, attn_dim=16),
    "dtfd": dict(dim=24, attn_dim=16),
    "transmil": dict(dim=32, heads=4),  # 16 landmarks: bags of 37 tiles exercise the padding
    "gma": dict(hidden=24, attn_dim=16),
    "mean": dict(hidden=24),
    "max": dict(hidden=24),
}


@nnx.jit(static_argnames="train")
def forward(model: nnx.Module, features: jax.Array, train: bool) -> dict:
    """The jitted call the training loop makes."""
    return model(features, train=train)


@nnx.jit
def loss_grad(model: nnx.Module, features: jax.Array, label: int) -> tuple:
    """(gradient of the bag loss w.r.t. the parameters, the outputs), both in train mode."""
    return nnx.grad(lambda m: _loss_and_out(m, features, label), has_aux=True)(model)


def _loss_and_out(model: nnx.Module, features: jax.Array, label: int) -> tuple:
    out = model(features, train=True)
    return bag_loss(out, label), out


def n_classes(name: str) -> int:
    """The classes of the small aggregator: the one-class (Bernoulli) heads are binary."""
    return 2 if name.endswith("_bernoulli") else N_CLASSES


def make(name: str, seed: int = 0, **kwargs) -> nnx.Module:
    """A small aggregator with parameter and dropout streams."""
    return build(name, IN_DIM, n_classes(name), rngs=nnx.Rngs(params=seed, dropout=seed + 1),
                 **{**SMALL[name], **kwargs})


def bag(n: int, seed: int = 0) -> jax.Array:
    """A random bag of n tile features."""
    return jax.random.normal(jax.random.key(seed), (n, IN_DIM), jnp.float32)
