"""Locally supervised training of a whole-slide ResNet-34 (Zhang et al., MICCAI 2022).

``local_resnet34`` / ``LocalNetwork`` (the split, heads, RFR decoders), ``train_step`` (one slide, every module updated
by its own optimiser, no gradient across a module boundary), ``make_optimizers``.
"""

from bigjax.local.model import LocalModule, LocalNetwork, local_resnet34
from bigjax.local.step import make_optimizers, module_grad, paths_for, train_step

__all__ = ["LocalModule", "LocalNetwork", "local_resnet34", "make_optimizers", "module_grad", "paths_for",
           "train_step"]
