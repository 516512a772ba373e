"""Big-Layers: partitioned, host-offloaded ops (``jax.custom_vjp``) of the "Big-Layers" paper.

Activations live in host memory; each heavy op streams partitions to the compute device. See
``placement`` for where arrays live, ``plan`` for how partitions are chosen.
"""

from bigjax.layers.batchnorm import big_batch_norm, big_batch_norm_inference
from bigjax.layers.conv import big_conv2d, big_conv2d_stats
from bigjax.layers.host import add as host_add
from bigjax.layers.host import global_avg_pool as host_global_avg_pool
from bigjax.layers.host import max_pool as host_max_pool
from bigjax.layers.host import relu as host_relu
from bigjax.layers.modules import BigBatchNorm, BigConv
from bigjax.layers.placement import compute_device, host_device, to_compute, to_host

__all__ = [
    "big_conv2d", "big_conv2d_stats", "big_batch_norm", "big_batch_norm_inference",
    "host_relu", "host_add", "host_max_pool", "host_global_avg_pool",
    "BigConv", "BigBatchNorm", "compute_device", "host_device", "to_compute", "to_host",
]
