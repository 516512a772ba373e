"""Big-Layers: partitioned, host-offloaded ops (``jax.custom_vjp``) of the "Big-Layers" paper."""

from bigjax.layers.conv import big_conv2d, big_conv2d_stats
from bigjax.layers.placement import compute_device, host_device, to_compute, to_host

__all__ = ["big_conv2d", "big_conv2d_stats", "compute_device", "host_device", "to_compute", "to_host"]
