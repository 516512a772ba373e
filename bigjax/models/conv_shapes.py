"""The convs a ResNet runs on one square image, read from its forward's jaxpr (nothing computed).

``machine_fit`` counts a step's activation bytes and FLOPs from these: the input and output shape,
kernel shape and multiply-adds of every conv, in the order the forward runs them, for any side (the
same layer list the Big model streams). The multiply-adds count only the kernel taps that land
inside the input, as XLA's cost analysis does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bigjax.models.resnet import ResNet

__all__ = ["ARCHS", "conv_shapes"]

ARCHS = {"resnet18": 18, "resnet34": 34, "resnet50": 50}


def conv_shapes(arch: str, side: int) -> list[tuple[tuple, tuple, tuple, int]]:
    """(input shape, output shape, kernel shape HWIO, multiply-adds) of every conv of ``arch`` on one
    ``side``² RGB image, in the order the forward runs them: read from the jaxpr of the model's
    forward (abstract shapes, nothing computed, any side)."""
    graph, state = nnx.split(_model(arch))

    def forward(state, x):
        return nnx.merge(graph, state)(x, train=False)

    jaxpr = jax.make_jaxpr(forward)(state, jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32))
    return [_conv(e) for e in _equations(jaxpr.jaxpr) if e.primitive.name == "conv_general_dilated"]


def _conv(eqn) -> tuple[tuple, tuple, tuple, int]:
    """(input, output, kernel shape, multiply-adds) of one NHWC/HWIO conv; the multiply-adds count
    only the kernel taps that land inside the input (not on its zero padding), as XLA does."""
    x, y, k = (tuple(v.aval.shape) for v in (eqn.invars[0], eqn.outvars[0], eqn.invars[1]))
    p = eqn.params
    taps = [_valid_taps(x[1 + d], y[1 + d], k[d], p["window_strides"][d], p["rhs_dilation"][d],
                        p["padding"][d][0]) for d in (0, 1)]
    return x, y, k, y[0] * taps[0] * taps[1] * k[2] * k[3] // p["feature_group_count"]


def _valid_taps(n_in: int, n_out: int, k: int, stride: int, dilation: int, pad: int) -> int:
    """Pairs (output position, kernel tap) along one axis whose input index is inside the input."""
    total = 0
    for j in range(k):
        offset = j * dilation - pad  # input index = o * stride + offset
        first = max(0, -(offset // stride) if offset < 0 else 0)
        last = min(n_out - 1, (n_in - 1 - offset) // stride)
        total += max(0, last - first + 1)
    return total


def _equations(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs inside it (jit, custom_vjp, ...), in order."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


def _model(arch: str) -> ResNet:
    """The architecture's ResNet with abstract parameters (shapes only: no initialisation runs)."""
    if arch not in ARCHS:
        raise ValueError(f"--arch={arch}: choose one of {', '.join(ARCHS)}")
    return nnx.eval_shape(lambda: ResNet(ARCHS[arch], rngs=nnx.Rngs(0)))
