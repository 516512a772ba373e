"""The gradient error of narrow host activations, and of rounding the input only."""

import jax.numpy as jnp
import numpy as np
import pytest

from bigjax.bench.precision import narrow_host_error, relative_l2
from bigjax.layers.execution import Execution


def test_relative_l2_is_over_all_leaves_together():
    ref = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}
    assert relative_l2(ref, ref) == 0.0
    assert relative_l2({"a": jnp.array([3.0, 0.0]), "b": jnp.array([5.0])}, ref) == pytest.approx(0.2)


def test_narrow_host_error_compares_the_engine_with_float32_storage():
    seen = []

    def grad_of(x, execution):  # stands for a Big step: what it stores decides its gradient
        seen.append(execution.host_dtype)
        return {"w": jnp.asarray(execution.stored(jnp.asarray(x)), jnp.float32)}

    x = np.array([1.0, 1.0 + 2.0**-10, 3.0], np.float32)
    twin = lambda x: {"w": jnp.asarray(x) ** 2}  # noqa: E731
    out = narrow_host_error(grad_of, twin, x, Execution(host_dtype="float32"), jnp.bfloat16)
    assert seen == [None, jnp.dtype(jnp.bfloat16)]
    assert out["grad_error"] == pytest.approx(relative_l2(x.astype(jnp.bfloat16), x), rel=1e-6)
    assert 0 < out["input_rounding_error"] < 1e-3
