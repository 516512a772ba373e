"""TransMIL and its Nyström attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tests.models.mil.helpers import N_CLASSES, bag, forward, make
from flax import nnx

from bigjax.models.mil import TransMIL
from bigjax.models.mil.nystrom import NystromAttention, iterative_pinv


def test_iterative_pinv_inverts_a_row_stochastic_matrix():
    x = np.random.default_rng(0).random((2, 6, 6)) + 3 * np.eye(6)
    x = (x / x.sum(-1, keepdims=True)).astype(np.float32)
    np.testing.assert_allclose(iterative_pinv(jnp.asarray(x), 12), np.linalg.inv(x), atol=1e-4)


def test_nystrom_is_exact_softmax_attention_with_one_token_per_landmark():
    n, dim, heads = 8, 16, 2
    # 16 Newton iterations: under PyTorch's init (weights std 1/sqrt(3 fan_in)) this softmax is
    # nearly uniform, so ill-conditioned; 10 left 1.6e-4 of convergence error, 16 none visible
    attn = NystromAttention(dim, heads=heads, dim_head=8, n_landmarks=n, pinv_iterations=16,
                            rngs=nnx.Rngs(0))
    attn.res_conv.kernel[...] = jnp.zeros_like(attn.res_conv.kernel[...])
    x = jax.random.normal(jax.random.key(1), (n, dim))
    q, k, v = jnp.split((x @ attn.to_qkv.kernel[...]).reshape(n, 3 * heads, 8), 3, axis=1)
    weights = jax.nn.softmax(jnp.einsum("ihd,jhd->hij", q, k) / np.sqrt(8))
    exact = jnp.einsum("hij,jhd->ihd", weights, v).reshape(n, -1)
    exact = exact @ attn.to_out.kernel[...] + attn.to_out.bias[...]
    out, first_row = nnx.jit(lambda a, x: a(x, train=False))(attn, x)
    np.testing.assert_allclose(out, exact, atol=1e-4)
    np.testing.assert_allclose(first_row, weights[:, 0].mean(0), atol=1e-4)


def test_square_padding_repeats_the_first_tiles():
    model = make("transmil")
    # 7 tiles pad to a 3x3 grid with copies of tiles 0 and 1; a bag that already holds those
    # copies (9 tiles) must see the same grid and so give the same logits.
    x = bag(7)
    np.testing.assert_allclose(forward(model, x, False)["logits"],
                               forward(model, jnp.concatenate([x, x[:2]]), False)["logits"],
                               rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_paper_size_transmil_runs_on_odd_bags():
    model = TransMIL(1024, N_CLASSES, rngs=nnx.Rngs(0))
    for n in (1, 7, 37, 300):
        out = model(jax.random.normal(jax.random.key(n), (n, 1024)), train=False)
        assert out["logits"].shape == (N_CLASSES,) and out["attention"].shape == (n,)
        assert np.isfinite(np.asarray(out["logits"])).all()
