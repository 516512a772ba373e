"""What narrow host activations (``Execution.host_dtype``) cost in gradient accuracy.

The error of a bfloat16-stored step is measured against the float32-stored step on the same input
and parameters (relative L2 over every parameter gradient). A ResNet's gradient is not smooth in its
input (ReLU and max-pool switch), so the same error is also measured for the in-memory twin when
only its *input* is rounded to bfloat16: the size of error that any rounding of this input causes,
beside which the engine's own can be read.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["relative_l2", "narrow_host_error"]


def relative_l2(grads, reference) -> float:
    """||grads - reference|| / ||reference|| over all leaves together."""
    pairs = list(zip(jax.tree.leaves(grads), jax.tree.leaves(reference)))
    diff = sum(float(jnp.sum(jnp.square(a.astype(jnp.float32) - b))) for a, b in pairs)
    norm = sum(float(jnp.sum(jnp.square(b))) for _, b in pairs)
    return (diff / norm) ** 0.5 if norm else 0.0


def narrow_host_error(grad_of: Callable, twin_grad_of: Callable, x: np.ndarray, execution,
                      host_dtype) -> dict[str, float]:
    """Gradient errors of ``host_dtype`` storage and of rounding only the input.

    Args:
      grad_of(x, execution): parameter gradients of the Big model's step.
      twin_grad_of(x): parameter gradients of the in-memory twin's step.
      x: the float32 input; execution: the engine (its ``host_dtype`` is replaced).
    Returns:
      ``{"grad_error": narrow vs float32 storage, "input_rounding_error": the twin's, input only}``
    """
    wide = grad_of(x, execution.replace(host_dtype=None))
    narrow = grad_of(x, execution.replace(host_dtype=host_dtype))
    rounded = np.asarray(jnp.asarray(x).astype(host_dtype).astype(jnp.float32))
    return {"grad_error": relative_l2(narrow, wide),
            "input_rounding_error": relative_l2(twin_grad_of(rounded), twin_grad_of(x))}

