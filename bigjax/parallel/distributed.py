"""Several processes, one encoder mesh: ``jax.distributed`` from arguments or the environment.

Each process owns its local devices; after ``initialize`` ``jax.devices()`` lists every process's
devices, so ``encoder_mesh()`` spans them all and the mesh step runs unchanged (each process passes
the same host values; ``mesh.to_mesh`` hands each its own slices). On CPUs the cross-process
collectives are gloo's (``jax_cpu_collectives_implementation``). Only the main process (id 0) writes
checkpoints, metrics and results: guard writes with ``is_main_process()``.

Environment (what ``python -m bigjax.parallel.launch`` sets): ``JAX_COORDINATOR_ADDRESS`` (JAX reads
this one itself), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (the same names, for the other two
arguments of ``jax.distributed.initialize``).
"""

from __future__ import annotations

import os

import jax

__all__ = ["initialize", "is_main_process", "launched", "share_from_main", "ENV"]

ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
# a process that finishes waits at exit for the others, e.g. process 0's final evaluation
SHUTDOWN_TIMEOUT_S = 24 * 3600
# a loaded machine can starve a process's heartbeats for minutes (a 4-minute compile was seen here)
HEARTBEAT_TIMEOUT_S = 900


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Join a multi-process run, from the arguments or else ``ENV``; False when it is one process.

    Call before anything else uses JAX's backend. Without a coordinator (argument or environment)
    nothing is initialised and the run is a single process.

    Raises:
      ValueError naming the missing setting when a coordinator is given without the others.
    """
    coordinator = coordinator or os.environ.get(ENV[0])
    if not coordinator:
        return False
    settings = {"num_processes": num_processes, "process_id": process_id}
    for (name, value), env in zip(list(settings.items()), ENV[1:]):
        if value is None:
            if env not in os.environ:
                raise ValueError(f"coordinator {coordinator} given but not {name} (argument or "
                                 f"${env})")
            settings[name] = int(os.environ[env])
    # CPU collectives across processes; on a GPU run this only concerns the CPU devices
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, shutdown_timeout_seconds=SHUTDOWN_TIMEOUT_S,
                               heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S, **settings)
    return True


def is_main_process() -> bool:
    """True in process 0 (and in a single-process run): the one that writes outputs."""
    return jax.process_index() == 0


def launched() -> bool:
    """True in a process that a launcher started as part of a multi-process run (``ENV`` is set)."""
    return bool(os.environ.get(ENV[0]))


def share_from_main(model, optimizer, step: int) -> int:
    """Process 0's model and optimiser state put into every process's, and its ``step`` returned.

    A multi-process run starts (or resumes from a checkpoint) in process 0 only; the others take its
    state here (``multihost_utils.broadcast_one_to_all``), so every process feeds the mesh the same
    replicated parameters.
    """
    from jax.experimental import multihost_utils

    from bigjax.train.checkpoint import load_state_tree, state_tree

    tree, step = multihost_utils.broadcast_one_to_all((state_tree(model, optimizer), step))
    load_state_tree(tree, model, optimizer)
    return int(step)
