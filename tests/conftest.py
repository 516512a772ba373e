"""Test session setup: two CPU devices, so the host device is distinct from the compute device.

``bigjax.layers.placement`` then keeps big activations on CPU device 1 while kernels run on device 0,
and a test can tell exactly which arrays crossed to the compute device.
"""

import jax

jax.config.update("jax_num_cpu_devices", 2)
