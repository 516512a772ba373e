"""One local module's gradient with its output held by the host budget between forward and backward.

Local learning (Zhang et al.) takes each module's gradient alone: its loss on the previous module's
(detached) output, differentiated with respect to its own parameters. Taken as one call
(``nnx.value_and_grad``), the module's output, its loss's auxiliary result, stays alive in RAM until
the backward ends. Here the forward and the backward run apart (``jax.vjp`` and its pullback), and in
between the output goes to the engine's spill store (``Execution.hold``), by the rule a residual is
kept by: within ``host_memory`` it stays in RAM, counted; beyond it, it waits on disk. The loss reads
the previous module's held output back for its forward only (``Execution.take``), so neither
boundary sits in RAM through a backward. At 16,384² each is 1.8 GiB (docs/benchmarks.md, eighth
session).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["held_grad"]


def held_grad(model: nnx.Module, wrt, loss_fn: Callable, x_prev, execution=None):
    """``(loss, x, grads)`` of ``loss_fn(model, x_prev) -> (loss, x)``, ``grads`` over ``model``'s
    Variables that ``wrt`` (an NNX filter) selects. With an ``execution`` (an ``Execution``; None:
    both as they are), ``x_prev`` (what the module before held) is taken back for the forward only,
    and ``x`` is held between the forward and the backward. What the loss mutates (BatchNorm
    statistics, a Dropout's RNG count) is written back to ``model``."""
    graphdef, params, rest = nnx.split(model, wrt, ...)

    def forward(params):
        m = nnx.merge(graphdef, params, rest, copy=True)  # fresh Variables: mutable in this trace
        loss, x = loss_fn(m, x_prev if execution is None else execution.take(x_prev))
        return loss, (x, nnx.state(m, nnx.Not(wrt)))

    loss, pullback, (x, updated) = jax.vjp(forward, params, has_aux=True)
    if execution is not None:
        x = execution.hold(x)
    (grads,) = pullback(jnp.ones_like(loss))
    nnx.update(model, updated)
    return loss, x, grads
