"""One process of the multi-process mesh test, or a single process with N CPU devices.

    python -m bigjax.parallel.launch -n 2 -- tests.parallel.mesh_worker OUT_PREFIX
    python -m tests.parallel.mesh_worker OUT_PREFIX --devices 4

computes a psum over the encoder mesh and the mesh gradient of the test model (tests/parallel/helpers)
in float64,
checks that every process got the same values, and (main process only) writes
``OUT_PREFIX<process id>.npz``.
"""

import argparse

import jax
import numpy as np

from bigjax.parallel import distributed


def _local(tree):
    """Host copies of replicated global arrays (each process holds a full copy)."""
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), tree)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=1, help="CPU devices of this process")
    opts = parser.parse_args()
    jax.config.update("jax_num_cpu_devices", opts.devices)
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.config.update("jax_enable_x64", True)  # exactness in float64 (tests/parallel/helpers.py)
    distributed.initialize()

    from flax import nnx
    from jax import lax
    from jax.experimental import multihost_utils
    from jax.sharding import PartitionSpec as P

    from bigjax.parallel import AXIS, encoder_mesh, mesh_value_and_grad
    from bigjax.parallel.mesh import to_mesh
    from tests.parallel.helpers import LABEL, TILES, head, tiny_resnet, to_float64

    mesh = encoder_mesh()
    ranks = to_mesh(np.arange(mesh.size, dtype=np.float32) + 1, mesh, P(AXIS))
    total = jax.jit(jax.shard_map(lambda r: lax.psum(r, AXIS), mesh=mesh, in_specs=P(AXIS),
                                  out_specs=P()))(ranks)
    loss, (g_enc, g_head) = mesh_value_and_grad(to_float64(tiny_resnet), to_float64(head),
                                                TILES.astype(np.float64), LABEL, mesh=mesh,
                                                dtype=np.float64)
    values = {"psum": total, "loss": loss}
    for name, grads in (("encoder", g_enc), ("head", g_head)):
        for path, v in nnx.to_flat_state(grads):
            values["/".join(map(str, (name, *path)))] = v.get_value()
    values = _local(values)
    everyone = multihost_utils.process_allgather(values["loss"])  # every process's loss
    values["agree"] = np.array(np.all(everyone == values["loss"]))
    values["processes"], values["devices"] = np.array(jax.process_count()), np.array(mesh.size)
    if distributed.is_main_process():
        np.savez(f"{opts.out}{jax.process_index()}.npz", **values)


if __name__ == "__main__":
    main()
