"""The peers of Big-Layers in the sweep: what a JAX user would pick instead to fit a large input.

* ``remat_forward`` — ``jax.checkpoint`` (``nnx.remat``) around every residual block: only the block
  boundaries are kept, the rest is recomputed in the backward pass (the rematerialisation family that
  Pinckaers et al.'s streaming CNNs belong to).
* ``offload_forward`` — JAX's activation offload policy: every activation the layers produce is named
  (``checkpoint_name``) and the whole forward runs under ``jax.checkpoint`` with
  ``save_and_offload_only_these_names(offload_src="device", offload_dst="pinned_host")``, so the
  residuals of the backward pass wait in host memory instead of on the device (JAX's guide "Memory
  spaces and host offloading", activation offloading).

Both are the in-memory ``ResNet`` forward, jittable, with the same parameters and results.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from flax import nnx

from bigjax.models.resnet import ResNet, remat_trunk
from bigjax.models.resnet_paths import InMemory

__all__ = ["ACTIVATION", "OFFLOAD_POLICY", "remat_forward", "offload_forward", "offload_support"]

ACTIVATION = "activation"  # the name every offloaded activation carries

OFFLOAD_POLICY = jax.checkpoint_policies.save_and_offload_only_these_names(
    names_which_can_be_saved=[], names_which_can_be_offloaded=[ACTIVATION],
    offload_src="device", offload_dst="pinned_host")


def remat_forward(model: ResNet, x):
    """The in-memory forward with every residual block under ``nnx.remat`` (activations recomputed)."""
    return jnp.mean(remat_trunk(model, InMemory, x, True, stem=False), axis=(1, 2))


class Named:
    """``InMemory`` with every output named ``ACTIVATION``, so a checkpoint policy can pick it."""

    fork = staticmethod(InMemory.fork)

    @staticmethod
    def conv_bn(x, conv, bn, train):
        return checkpoint_name(InMemory.conv_bn(x, conv, bn, train), ACTIVATION)

    @staticmethod
    def relu(x):
        return checkpoint_name(InMemory.relu(x), ACTIVATION)

    @staticmethod
    def add_relu(x, shortcut):
        return checkpoint_name(InMemory.add_relu(x, shortcut), ACTIVATION)

    @staticmethod
    def stem_pool(x):
        return checkpoint_name(InMemory.stem_pool(x), ACTIVATION)


def _named_forward(model: ResNet, x):
    x = model.stages(Named, model.stem(Named, x, True), 0, 4, True)
    return jnp.mean(x, axis=(1, 2))


offload_forward = nnx.remat(_named_forward, policy=OFFLOAD_POLICY)
offload_forward.__doc__ = "The in-memory forward whose named activations are offloaded to pinned_host."


@functools.cache
def offload_support() -> str | None:
    """None where the offload policy compiles and runs on the default backend, else the reason.

    Probed once on a tiny function (a named ``tanh`` under the policy, differentiated and jitted).
    """
    def f(x):
        return jnp.sum(jax.checkpoint(lambda v: jnp.sin(checkpoint_name(jnp.tanh(v), ACTIVATION)),
                                      policy=OFFLOAD_POLICY)(x))
    try:
        jax.block_until_ready(jax.jit(jax.grad(f))(jnp.ones((4, 4), jnp.float32)))
    except Exception as err:  # noqa: BLE001 - any failure means "not on this backend"; say which
        return f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    return None
