"""``--encoder=local``: the run's ResNet trained as K gradient-isolated modules (Zhang et al. 2022).

Importing this module registers the mode in ``bigjax.train.modes``. The encoder is a
``bags.LocalResNet`` (``--arch`` resnet18 or resnet34, ``--modules`` K, ``--local_alpha`` α,
``--local_norm`` batch or group); each
step trains every module on its own loss, the last with the run's aggregator, and applies all of
their gradients in one update of the run's optimiser (``bags.local_step``). A module's activations
on a batch of tile bags are small, so each module's gradient is one jitted function (measured on the
quick preset's batch, 4 x 8 tiles of 32 px, 2 CPU cores: ~1 s a step, against ~9 s streaming the same
step through Big-Layers, which gives the same losses); whole slides stream (``experiments.wholeslide``).
Validation and test embeddings are the ResNet's eval-mode forward, as every mode's.
"""

from __future__ import annotations

import logging
import zlib

import numpy as np
from flax import nnx

from bigjax.local.bags import TRAINABLE, LocalResNet, local_step
from bigjax.local.group_norm import to_group_norm
from bigjax.models import arch
from bigjax.models.resnet import ResNet, load_torchvision
from bigjax.train import features, modes

log = logging.getLogger(__name__)

__all__ = ["Local"]


@modes.register("local")
class Local(modes.EncoderMode):
    """Locally supervised training of a ResNet-18/34 tile encoder: K modules, one update per step."""

    settings = modes.LOCAL_SETTINGS

    def build_encoder(self, rngs):
        c = self.config
        if c.arch not in ("resnet18", "resnet34"):
            raise ValueError(f"--encoder=local splits a ResNet-18 or ResNet-34 into its 8 pieces, "
                             f"got --arch={c.arch}")
        depth = arch.RESNETS[c.arch]
        encoder = LocalResNet(depth, c.modules, c.n_classes, alpha=c.local_alpha, norm=c.local_norm,
                              rngs=rngs)
        if c.init:  # the checkpoint holds the ResNet only, not the auxiliary heads
            resnet = ResNet(depth, rngs=rngs)
            load_torchvision(resnet, c.init)
            if c.local_norm == "group":
                to_group_norm(resnet)  # fresh GroupNorms, as the official conversion after loading
            nnx.update(encoder, nnx.state(resnet))
            log.info("encoder %s initialised from %s", c.arch, c.init)
        else:
            log.warning("encoder %s has random initial weights (no --init); Zhang et al. start "
                        "from ImageNet weights", c.arch)
        return encoder

    def trainable(self):
        return TRAINABLE

    def inputs(self, model, batch):
        """Normalised tiles on the device, and the seed of the step's RFR patches (from the bags)."""
        tiles = features.normalize(modes.augmented_tiles(batch), self.mean, self.std)
        key = "|".join(f"{b.slide_id}:{b.indices.tolist()}" for b in batch)
        return tiles, zlib.crc32(key.encode())

    def step(self, model, optimizer, inputs, labels):
        """Every module's gradient, one after another, then one update; returns L_K (the bag loss)."""
        tiles, seed = inputs
        rng = np.random.default_rng([self.config.seed, seed])
        return local_step(model, optimizer, tiles, labels, rng)[-1]
