"""``--encoder=mesh``: the in-memory encoder trained end to end, each batch's tiles over the encoder mesh.

Importing this module registers the mode in ``bigjax.train.modes`` (the lead's registry). Every device
of the run is one shard (``encoder_mesh()``: on a CPU, ``jax_num_cpu_devices`` sets how many; over
several processes, all processes' devices). The batch's B×K tiles go through the mesh together with
synchronised BatchNorm, as the ``inmemory`` mode's encoder sees them together on one device, and the
aggregator's mean bag loss is computed once on the gathered features: the step's loss and gradients
are the ``inmemory`` step's.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigjax.models import mil
from bigjax.parallel.mesh import encoder_mesh
from bigjax.parallel.step import mesh_value_and_grad
from bigjax.train import features, modes

__all__ = ["Mesh", "batch_loss"]


def batch_loss(head, feats, labels):
    """Mean bag loss of B bags whose K tiles each were encoded together: feats (B*K, D), labels (B,)."""
    bags = feats.reshape(labels.shape[0], -1, feats.shape[-1])
    return jnp.mean(jnp.stack([mil.bag_loss(head(bags[i], train=True), labels[i])
                               for i in range(labels.shape[0])]))


@nnx.jit
def _update(model, optimizer, grads):
    optimizer.update(model, grads)


@modes.register("mesh")
class Mesh(modes.EncoderMode):
    """The in-memory encoder trained end to end on the encoder mesh (every device of the run)."""

    def __init__(self, config, workdir):
        super().__init__(config, workdir)
        self.mesh = encoder_mesh()

    def inputs(self, model, batch):
        """Normalised tiles in host memory (B, K, T, T, 3): the mesh lays them out over its devices."""
        return features.normalize_host(modes.augmented_tiles(batch), self.mean, self.std)

    def step(self, model, optimizer, inputs, labels):
        tiles = inputs.reshape(-1, *inputs.shape[2:])
        loss, (g_encoder, g_head) = mesh_value_and_grad(
            model.encoder, model.head, tiles, np.asarray(labels, np.int32), mesh=self.mesh,
            loss_fn=batch_loss)
        _update(model, optimizer, nnx.State({"encoder": g_encoder, "head": g_head}))
        return loss
