"""bigjax: train whole-slide-image tile encoders end to end with memory-bounded Big-Layers.

Packages: ``layers`` (partitioned host-offloaded ops), ``models`` (Big ResNet, MIL aggregators),
``data`` (slides, tile stores, bags), ``train`` (optimisers, loop, checkpoints), ``metrics``, ``bench``.
"""

__version__ = "0.1.0"
