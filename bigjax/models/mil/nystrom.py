"""Nyström self-attention for one token sequence, as TransMIL uses it.

Softmax attention `softmax(Q K^T) V` is approximated with m landmarks (segment means of Q and K):
`softmax(Q K~^T) pinv(softmax(Q~ K~^T)) softmax(Q~ K^T) V` (eq. 15 of Xiong et al.), with the
pseudo-inverse from 6 iterations of the Razavi et al. Newton scheme, plus a depthwise convolution of
V along the sequence as a residual.

References:
    Xiong et al. Nyströmformer: A Nyström-based algorithm for approximating self-attention.
    AAAI 2021.
    The module TransMIL imports: https://github.com/lucidrains/nystrom-attention (its layers keep
    PyTorch's default init, as here).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from bigjax.models.mil.init import torch_conv, torch_linear


def iterative_pinv(x: jax.Array, iterations: int) -> jax.Array:
    """Moore-Penrose pseudo-inverse of each (m, m) matrix in x (..., m, m) by Newton iterations.

    Args:
        x: stack of square matrices.
        iterations: number of iterations (6 in the paper and in TransMIL).

    Returns:
        the approximate pseudo-inverses, same shape as x.

    References:
        Razavi et al. A new iterative method for finding approximate inverses, 2014;
        Xiong et al. 2021.
    """
    abs_x = jnp.abs(x)
    # The initial scale uses the largest row and column sums over the whole stack, as the
    # reference does; it guarantees convergence for every matrix in it.
    z = jnp.swapaxes(x, -1, -2) / (abs_x.sum(-1).max() * abs_x.sum(-2).max())
    eye = jnp.eye(x.shape[-1], dtype=x.dtype)
    for _ in range(iterations):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nnx.Module):
    """Multi-head Nyström attention over a sequence x (n, dim), with the value-conv residual.

    Args:
        dim: token size.
        heads: number of heads.
        dim_head: size per head.
        n_landmarks: number of landmarks m; the sequence is zero-padded at the front to a multiple
            of m and each landmark is the mean of ceil(n / m) consecutive tokens.
        pinv_iterations: Newton iterations for the pseudo-inverse.
        residual_kernel: length of the depthwise conv on V along the sequence.
        dropout: rate on the output projection when train=True.
        rngs: parameter and dropout randomness.

    Returns (from __call__):
        (out (n, dim), attention row of token 0 (n,) averaged over heads) — the row is the
        Nyström approximation of softmax attention, so it sums to about, not exactly, 1.
    """

    def __init__(self, dim: int, *, heads: int, dim_head: int, n_landmarks: int,
                 pinv_iterations: int = 6, residual_kernel: int = 33, dropout: float = 0.0,
                 rngs: nnx.Rngs):
        self.heads, self.dim_head = heads, dim_head
        self.n_landmarks, self.pinv_iterations = n_landmarks, pinv_iterations
        self.to_qkv = torch_linear(dim, 3 * heads * dim_head, use_bias=False, rngs=rngs)
        self.to_out = torch_linear(heads * dim_head, dim, rngs=rngs)
        self.dropout = nnx.Dropout(dropout, rngs=rngs)
        # One kernel per head, shared over that head's dim_head channels (the reference's
        # Conv2d(heads, heads, (k, 1), groups=heads)).
        self.res_conv = torch_conv(heads, heads, (residual_kernel,), padding=residual_kernel // 2,
                                   groups=heads, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
        n, m = x.shape[0], self.n_landmarks
        pad = -n % m
        x = jnp.pad(x, ((pad, 0), (0, 0)))
        q, k, v = jnp.split(self.to_qkv(x).reshape(-1, 3 * self.heads, self.dim_head), 3, axis=1)
        q, k, v = (t.transpose(1, 0, 2) for t in (q, k, v))  # (heads, n + pad, dim_head)
        q = q * self.dim_head ** -0.5
        q_landmarks = q.reshape(self.heads, m, -1, self.dim_head).mean(axis=2)
        k_landmarks = k.reshape(self.heads, m, -1, self.dim_head).mean(axis=2)
        attn1 = jax.nn.softmax(q @ jnp.swapaxes(k_landmarks, 1, 2))
        attn2_inv = iterative_pinv(jax.nn.softmax(q_landmarks @ jnp.swapaxes(k_landmarks, 1, 2)),
                                   self.pinv_iterations)
        attn3 = jax.nn.softmax(q_landmarks @ jnp.swapaxes(k, 1, 2))
        out = (attn1 @ attn2_inv) @ (attn3 @ v) + self._value_residual(v)
        out = out.transpose(1, 0, 2).reshape(-1, self.heads * self.dim_head)
        out = self.dropout(self.to_out(out), deterministic=not train)
        first_row = (attn1[:, pad:pad + 1] @ attn2_inv @ attn3)[:, 0, pad:].mean(axis=0)
        return out[pad:], first_row

    def _value_residual(self, v: jax.Array) -> jax.Array:
        """Depthwise conv of V (heads, n, dim_head) along n, per head."""
        # conv layout (batch=dim_head, length=n, channels=heads)
        return self.res_conv(v.transpose(2, 1, 0)).transpose(2, 1, 0)
