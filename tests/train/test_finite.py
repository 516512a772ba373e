"""Counting NaN/inf over model and optimiser state, on every placement, skipping keys and integers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from bigjax.models import mil
from bigjax.train.finite import first_non_finite, non_finite_count


def model_and_optimizer():
    model = mil.build("abmil", 8, 3, rngs=nnx.Rngs(0), hidden=16, attn_dim=8, dropout=0.5)  # RNG keys
    return model, nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)


def test_finite_state_counts_zero():
    model, opt = model_and_optimizer()
    assert non_finite_count(nnx.state((model, opt))) == 0
    assert first_non_finite(nnx.state((model, opt))) is None


def test_counts_nan_and_inf_in_parameters_and_optimizer_state():
    model, opt = model_and_optimizer()
    model.classifier.kernel[...] = model.classifier.kernel[...].at[0, 1].set(jnp.nan).at[2, 2].set(-jnp.inf)
    mu = opt.opt_state[0].mu["embed"]["kernel"]
    mu[...] = jnp.full(mu[...].shape, jnp.nan)  # a poisoned Adam moment, parameters of that layer fine
    assert non_finite_count(nnx.state((model, opt))) == 2 + 8 * 16
    assert non_finite_count(nnx.state(model)) == 2
    assert first_non_finite(nnx.state(model)) == ("classifier/kernel", 2)
    assert first_non_finite(nnx.state(opt))[1] == 8 * 16


def test_mixed_leaves_and_placements():
    host, compute = jax.devices()[1], jax.devices()[0]
    tree = {"a": jax.device_put(jnp.array([1.0, jnp.nan, jnp.inf]), host),
            "b": jax.device_put(jnp.array([jnp.nan], jnp.bfloat16), compute),
            "c": np.array([np.nan, 1.0], np.float64), "steps": jnp.array([3, 4]),
            "key": jax.random.key(0), "flag": np.array([True]),
            "pinned": jax.device_put(jnp.array([jnp.nan, 0.0, jnp.nan]),
                                     jax.sharding.SingleDeviceSharding(compute, memory_kind="pinned_host"))}
    assert non_finite_count(tree) == 2 + 1 + 1 + 2
    assert first_non_finite(tree) == ("a", 2)
    assert non_finite_count({}) == 0
