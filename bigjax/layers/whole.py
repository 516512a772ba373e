"""A module run whole, as one device program, where its working set fits the partition budget.

Partitioning pays where an activation exceeds the budget. Where a whole residual block — its input,
temporaries, output and what its backward keeps — fits, streaming it op by op only adds Python round
trips, autodiff bookkeeping and host passes for the elementwise ops (residual add, ReLU). Here such a
module is one ``jax.custom_vjp`` op (the issue's "one custom_vjp per residual block"):

* forward: one jitted program on the compute device returns the module's output, its updated state
  (BatchNorm running statistics) and its VJP, whose residuals are the convolutions' outputs only
  (``jax.checkpoint_policies.checkpoint_dots``: the elementwise results are recomputed in the
  backward, as the Big path recomputes them); the output and the residuals go to host memory;
* backward: the residuals come back and one jitted program applies the VJP.

Residuals that are the program's own inputs (the block's input, its kernels) are not copied out: the
backward takes them from the op's inputs. Whether a module fits is XLA's own account of the two
compiled programs (``memory_analysis``): arguments, outputs and temporaries, less the parameters,
which live on the compute device whatever runs (the budget never counts them); gradients count.
The results equal the in-memory module's under ``jax.jit`` (the same XLA program), so they equal the
partitioned ops' to float round-off.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import jax
import numpy as np
from flax import nnx

from bigjax.layers.execution import Execution, ensure_eager, zeros_like
from bigjax.layers import spill
from bigjax.layers.spill import Spilled

__all__ = ["run_whole", "whole_programs", "WholePrograms"]


@dataclass(frozen=True, eq=False)
class WholePrograms:
    """The jitted primal, forward and backward of one module at one input shape, and their
    footprint on the device (bytes, from the compiled programs).

    They take the module's parameters and its other state as flat lists of arrays (nnx ``State``
    trees cost a ``Variable`` per leaf at every custom_vjp boundary): ``primal(params, rest, x)``
    gives ``(y, new rest)``, ``forward`` also the VJP's residuals that are not inputs, and
    ``backward(residuals, [*params, x], g)`` gives ``(parameter gradients, input gradient)``.
    """

    primal: Callable
    forward: Callable
    backward: Callable
    changed: tuple  # per leaf of the module's other state: whether the module updates it
    footprint: int


_PROGRAMS: dict = {}  # (graphdef, call, static, input avals, device) -> WholePrograms


def _bytes(tree) -> int:
    return sum(int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize
               for a in jax.tree.leaves(tree))


def _device_bytes(compiled, params_bytes: int) -> int | None:
    """What a compiled program puts on its device beyond the parameters (None: no analysis)."""
    m = compiled.memory_analysis()
    if m is None:
        return None
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes - params_bytes)


def _functions(graphdef, trees, call, static):
    """The module's primal and forward of (parameter leaves, state leaves, x), and the backward.

    The forward's trace notes (``trace``) the VJP's tree, which of its leaves are inputs and which
    state leaves the module changes; the backward rebuilds the VJP from the kept residuals and the
    inputs.
    """
    params_tree, rest_tree = trees

    def apply(params, rest, x):
        module = nnx.merge(graphdef, jax.tree.unflatten(params_tree, params),
                           jax.tree.unflatten(rest_tree, rest))
        y = call(module, x, **dict(static))
        return y, jax.tree.leaves(nnx.split(module, nnx.Param, ...)[2])

    trace = {}

    def forward(params, rest, x):
        body = jax.checkpoint(lambda p, x: apply(p, rest, x),
                              policy=jax.checkpoint_policies.checkpoint_dots)
        y, vjp, new_rest = jax.vjp(body, params, x, has_aux=True)
        trace["changed"] = tuple(new is not old for new, old in zip(new_rest, rest))
        inputs = [*params, x]
        leaves, trace["tree"] = jax.tree.flatten(vjp)
        trace["forwarded"] = tuple(next((i for i, a in enumerate(inputs) if a is leaf), None)
                                   for leaf in leaves)
        return y, new_rest, [leaf for leaf, f in zip(leaves, trace["forwarded"]) if f is None]

    def backward(kept, inputs, g):
        kept = iter(kept)
        leaves = [next(kept) if f is None else inputs[f] for f in trace["forwarded"]]
        return jax.tree.unflatten(trace["tree"], leaves)(g)

    return trace, apply, forward, backward


def whole_programs(module: nnx.Module, x, call: Callable, static: tuple,
                   ex: Execution) -> WholePrograms:
    """The programs running ``call(module, x, **dict(static))`` whole on ``ex.compute`` (cached per
    module structure, call, input shapes and device; compiled on first use). ``x`` may be abstract."""
    return _programs(*nnx.split(module, nnx.Param, ...), x, call, static, ex)


def _programs(graphdef, params, rest, x, call, static, ex) -> WholePrograms:
    trees = (jax.tree.structure(params), jax.tree.structure(rest))
    avals = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in jax.tree.leaves((params, rest, x))]
    key = (graphdef, call, static, trees, tuple(avals), ex.compute)
    if key not in _PROGRAMS:
        n = trees[0].num_leaves
        _PROGRAMS[key] = _compile(graphdef, trees, call, static,
                                  (avals[:n], avals[n:-1], avals[-1]), ex)
    return _PROGRAMS[key]


def _compile(graphdef, trees, call, static, avals, ex) -> WholePrograms:
    placed = jax.sharding.SingleDeviceSharding(ex.compute)
    def on_device(tree):
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=placed), tree)

    params, rest, x = on_device(avals)
    trace, *functions = _functions(graphdef, trees, call, static)
    apply, forward, backward = map(jax.jit, functions)
    fwd = forward.lower(params, rest, x).compile()
    y, _, kept = on_device(fwd.out_info)
    bwd = backward.lower(kept, [*params, x], y).compile()
    params_bytes = _bytes(params)
    sizes = (_device_bytes(fwd, params_bytes), _device_bytes(bwd, params_bytes))
    footprint = np.iinfo(np.int64).max if None in sizes else max(sizes)
    return WholePrograms(apply, forward, backward, trace["changed"], footprint)


def run_whole(module: nnx.Module, x: jax.Array, call: Callable, static: tuple,
              ex: Execution) -> jax.Array | None:
    """``call(module, x, **dict(static))`` as one device program, output in host memory, or None
    where it does not fit ``ex.max_partition_bytes`` (the caller then streams it op by op).

    ``call`` must be a module-level function (it keys the compiled programs); the module's state
    other than its parameters (BatchNorm running statistics) is updated as ``call`` updates it.
    """
    if isinstance(x, Spilled):  # an input read band by band from a store (``spill``)
        return None
    if 3 * _bytes(x) > ex.max_partition_bytes:  # input, output and one conv output: cannot fit
        return None
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    programs = _programs(graphdef, params, rest, x, call, static, ex)
    if programs.footprint > ex.max_partition_bytes:
        return None
    new_rest = _Box()
    y = _whole(programs, ex, new_rest, jax.tree.leaves(params), jax.tree.leaves(rest),
               ex.to_host(x))
    updates = [(path, var.replace(new)) for (path, var), new, changed in
               zip(nnx.to_flat_state(rest), new_rest.value, programs.changed) if changed]
    if updates:  # none in inference: a module merged inside a transformation stays untouched
        nnx.update(module, nnx.from_flat_state(updates))
    return y


class _Box:
    """The module's updated state, set by the op's forward. It leaves the custom_vjp through this box
    rather than as an output, whose (zero) cotangent JAX would build from a host constant."""

    value: list


def _on_compute(ex, tree):
    return jax.tree.map(ex.to_compute, tree)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _whole(programs, ex, new_rest, params, rest, x):
    """The module on host activation ``x``: its output in host memory (its new state in the box)."""
    ensure_eager("run_whole", x)
    y, new_rest.value = ex.call("whole_forward", programs.primal,
                                *_on_compute(ex, (params, rest, x)))
    return ex.to_host(y)


def _whole_fwd(programs, ex, new_rest, params, rest, x):
    ensure_eager("run_whole", x)
    ex.window.admit(ex)
    on_compute = _on_compute(ex, (params, rest, x))  # committed: one compilation serves every step
    y, new_rest.value, kept = ex.call("whole_forward", programs.forward, *on_compute)
    kept = [ex.to_host_async(r) for r in kept]
    ex.window.track(kept)
    return ex.to_host(y), (params, on_compute[1], ex.keep(x), [ex.keep(r) for r in kept])


def _whole_bwd(programs, ex, _, saved, g):
    params, rest, saved_x, saved_kept = saved
    x, kept = ex.restore(saved_x), ex.restore(saved_kept)
    spill.release(saved_x, saved_kept)  # ``x``, ``kept`` hold the arrays until this backward returns
    ex.window.admit(ex)
    g_params, g_x = ex.call("whole_backward", programs.backward, _on_compute(ex, kept),
                            _on_compute(ex, [*params, x]), ex.to_compute(g))
    g_params = [ex.to_device_of(gp, p) for gp, p in zip(g_params, params)]
    g_x = ex.to_host(g_x)
    ex.window.track(g_x)
    return g_params, zeros_like(rest), g_x


_whole.defvjp(_whole_fwd, _whole_bwd)
