"""Non-finite values in a state tree: the check that keeps a NaN step out of the checkpoints.

The loss alone does not show a poisoned state: an update can turn parameters (or Adam moments) into
NaN while the loss of that step is still finite, so the loop checks the parameters and optimiser state
themselves before it saves, and names the first non-finite leaf when it refuses.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["non_finite_count", "first_non_finite"]


def non_finite_count(tree) -> int:
    """Number of NaN/inf entries over the floating-point leaves of ``tree`` (params, optimiser state).

    Integer, boolean and PRNG-key leaves are skipped. Device leaves are counted in one jitted call per
    placement, so no array moves between devices; host-memory leaves (``pinned_host``), which a GPU
    kernel cannot read, and numpy leaves are counted with numpy.
    """
    groups: dict = {}
    host = 0
    for leaf in _float_leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if sharding is None or sharding.memory_kind not in (None, "device"):
            host += int(np.sum(~np.isfinite(np.asarray(leaf))))
        else:
            groups.setdefault(sharding, []).append(leaf)
    return host + sum(int(_count(leaves)) for leaves in groups.values())


def first_non_finite(tree) -> tuple[str, int] | None:
    """(path, count) of the first leaf, in tree order, holding a NaN or inf; None when all are finite."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if _is_float(leaf):
            count = non_finite_count(leaf)
            if count:
                name = jax.tree_util.keystr(path, simple=True, separator="/")
                return name.removesuffix("/value"), count  # an NNX Variable's payload
    return None


@jax.jit
def _count(leaves):
    return sum((jnp.sum(~jnp.isfinite(x), dtype=jnp.int32) for x in leaves), jnp.int32(0))


def _float_leaves(tree):
    return [x for x in jax.tree.leaves(tree) if _is_float(x)]


def _is_float(x) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)
