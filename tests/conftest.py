"""Test session setup: two CPU devices, and full float32 precision for exact comparisons.

* ``bigjax.layers.placement`` keeps big activations on CPU device 1 while kernels run on device 0, so
  a test can tell exactly which arrays crossed to the compute device.
* On a GPU, float32 convolutions default to TF32 (~1e-3 relative): the equality tests compare the
  partitioned ops with the plain ones at "highest" precision (no effect on a CPU).
"""

import gc

import jax
import pytest

jax.config.update("jax_num_cpu_devices", 2)
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(autouse=True, scope="module")
def _fresh_compilation_caches():
    """Every compiled executable maps ~6 regions of memory, and jax keeps them all. The default suite's
    one process died of a segfault in XLA's compiler, twice at the same test, most likely past the
    kernel's 65,530 mappings (``vm.max_map_count``). Dropping the caches after each test module
    keeps the count bounded (at most 15,354 in a whole run)."""
    yield
    jax.clear_caches()
    gc.collect()
