"""``--devices=N``: the encoder modes that train the encoder, each step's tiles over an encoder mesh.

Importing this module registers, in ``bigjax.train.modes``, the mesh form of ``inmemory`` (the jitted
encoder in ``shard_map`` over the mesh, ``bigjax.parallel.step``) and of ``big`` (N Big-Layers
engines, one ``Execution`` per device, ``bigjax.parallel.big``); ``modes.get`` picks them when
``config.devices > 1``. The mesh is the first ``devices`` devices of the run (on a CPU,
``jax_num_cpu_devices`` sets how many; over several processes, all processes' devices).

The batch's B×K tiles go through the mesh together, as the single-device mode's encoder sees them
together; with synchronised BatchNorm (``config.sync_bn``, the default) its statistics are those of
all B×K tiles, and the aggregator's mean bag loss is computed once on the gathered features, so the
step's loss and gradients are the single-device step's (to float32 round-off). Evaluation (the
mode's ``embed``) runs on one device, as in the single-device mode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigjax.host_memory import shard_spill_options, spill_options
from bigjax.layers.execution import Execution
from bigjax.models import mil
from bigjax.parallel.big import big_mesh_value_and_grad
from bigjax.parallel.mesh import encoder_mesh, local
from bigjax.parallel.step import mesh_value_and_grad
from bigjax.train import features, modes

__all__ = ["InMemoryMesh", "BigMesh", "batch_loss"]


def batch_loss(head, feats, labels):
    """Mean bag loss of B bags whose K tiles each were encoded together: feats (B*K, D), labels (B,)."""
    bags = feats.reshape(labels.shape[0], -1, feats.shape[-1])
    return jnp.mean(jnp.stack([mil.bag_loss(head(bags[i], train=True), labels[i])
                               for i in range(labels.shape[0])]))


@nnx.jit
def _update(model, optimizer, grads):
    optimizer.update(model, grads)


def _apply(model, optimizer, loss, g_encoder, g_head):
    """The optimiser update with the mesh's gradients (this process's copies); the loss."""
    _update(model, optimizer, nnx.State({"encoder": local(g_encoder), "head": local(g_head)}))
    return local(loss)


def _tiles(inputs) -> np.ndarray:
    """(B, K, T, T, 3) -> (B*K, T, T, 3): the batch's tiles, sharded over the mesh together."""
    return inputs.reshape(-1, *inputs.shape[2:])


@modes.register_mesh("inmemory")
class InMemoryMesh(modes.InMemory):
    """The in-memory encoder trained end to end, its jitted step over the encoder mesh (``remat``)."""

    settings = (*modes.InMemory.settings, "remat")

    def __init__(self, config, workdir):
        super().__init__(config, workdir)
        self.mesh = encoder_mesh(config.devices)

    def inputs(self, model, batch):
        """Normalised tiles in host memory (B, K, T, T, 3): the mesh lays them out over its devices."""
        return features.normalize_host(modes.augmented_tiles(batch), self.mean, self.std)

    def step(self, model, optimizer, inputs, labels):
        loss, grads = mesh_value_and_grad(model.encoder, model.head, _tiles(inputs),
                                          np.asarray(labels, np.int32), mesh=self.mesh,
                                          sync_bn=self.config.sync_bn, remat=self.config.remat,
                                          loss_fn=batch_loss)
        return _apply(model, optimizer, loss, *grads)


@modes.register_mesh("big")
class BigMesh(modes.Big):
    """The Big ResNet trained end to end over N streaming engines, one per device of the mesh."""

    def __init__(self, config, workdir):
        if config.auto_fit:
            raise ValueError("--big_stages/--max_partition_bytes=auto plans one device; with "
                             f"--devices={config.devices} give both as numbers")
        super().__init__(config, workdir)
        if jax.process_count() > 1:
            raise ValueError(f"--encoder=big over {jax.process_count()} processes: one process "
                             "drives the Big shards' engines (bigjax.parallel.big); run it as one "
                             "process, or use --encoder=inmemory with --processes")
        narrow = None if config.host_dtype == "float32" else config.host_dtype
        spill = spill_options(config.host_memory, config.spill_dir, workdir)
        self.executions = tuple(Execution(config.max_partition_bytes, compute=device,
                                          host_dtype=narrow, engine=config.big_engine,
                                          **shard_spill_options(spill, i, config.devices))
                                for i, device in enumerate(encoder_mesh(config.devices).devices.flat))

    def step(self, model, optimizer, inputs, labels):
        loss, grads = big_mesh_value_and_grad(model.encoder, model.head, _tiles(inputs),
                                              np.asarray(labels, np.int32),
                                              executions=self.executions,
                                              sync_bn=self.config.sync_bn, loss_fn=batch_loss)
        return _apply(model, optimizer, loss, *grads)
