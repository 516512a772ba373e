"""The encoder mesh (Campanella et al., "Beyond MIL"): a slide's tiles over N devices, end to end.

* ``mesh``: the 1-D device axis, the tiles' layout over it (padded, masked), global arrays.
* ``exchange``: the paper's step inside ``shard_map`` — ``gather``, ``aggregate``, ``scatter``,
  ``pseudo_loss`` / ``encoder_vjp``, encoder gradients summed over the axis.
* ``step``: ``mesh_value_and_grad`` (explicit exchange, or plain autodiff with XLA's collectives).
* ``batchnorm``: BatchNorm over shards, synchronised or per shard. ``encoder``: one shard's forward.
* ``big``: the same with Big-Layers shards, N streaming engines driven eagerly.
* ``distributed`` / ``launch``: several processes (``jax.distributed``, gloo on CPU).
* ``mode``: the mesh forms of ``big`` and ``inmemory`` (``--devices`` > 1) for ``bigjax.train.modes``
  (registers on import; not imported here).
* ``memory``: tiles per device that fit, from one shard's compiled step.

References: Campanella et al., "Beyond Multiple Instance Learning: Full Resolution All-In-Memory
End-To-End Pathology Slide Modeling" (2024).
"""

from bigjax.parallel.big import big_mesh_value_and_grad
from bigjax.parallel.mesh import AXIS, ShardLayout, encoder_mesh
from bigjax.parallel.step import COLLECTIVES, mesh_value_and_grad

__all__ = ["AXIS", "ShardLayout", "encoder_mesh", "mesh_value_and_grad", "big_mesh_value_and_grad",
           "COLLECTIVES"]
