"""Big-Layers: partitioned, host-offloaded ops (``jax.custom_vjp``) of the "Big-Layers" paper.

Activations live in host memory; each heavy op streams partitions to the compute device. Every op takes
an ``Execution`` (``execution``: where arrays live and kernels run, the partition budget, an observer
hook); ``plan`` decides the partitions.
"""

from bigjax.layers.batchnorm import big_batch_norm, big_batch_norm_inference
from bigjax.layers.conv import big_conv2d, big_conv2d_stats
from bigjax.layers.execution import DEFAULT_PARTITION_BYTES, EVENTS, Execution
from bigjax.layers.host import add as host_add
from bigjax.layers.host import global_avg_pool as host_global_avg_pool
from bigjax.layers.host import max_pool as host_max_pool
from bigjax.layers.host import relu as host_relu
from bigjax.layers.modules import BigBatchNorm, BigConv

__all__ = [
    "big_conv2d", "big_conv2d_stats", "big_batch_norm", "big_batch_norm_inference",
    "host_relu", "host_add", "host_max_pool", "host_global_avg_pool",
    "BigConv", "BigBatchNorm", "Execution", "EVENTS", "DEFAULT_PARTITION_BYTES",
]
