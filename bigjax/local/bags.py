"""Local training (Zhang et al.) on the training loop's tile bags: the run's ResNet as K modules.

The whole-slide method (``bigjax.local.model``) carried over to bags of tiles:

- the encoder is the run's ResNet-18 or -34 with its own stem (frozen, run without gradient), its 8
  pieces (``split.SPLITS``) grouped into K modules. Its BatchNorm uses the batch's statistics, as the
  other modes' encoders on bags of tiles (``bn_train``): Zhang et al. freeze it because a step is
  one whole slide (batch 1) from ImageNet weights; with a random init and frozen statistics the
  generated PANDA-like run did not learn (val QWK 0 after 5 epochs, against 0.58 for ``frozen``);
- module i < K minimises L_i = mean over the batch's bags of CE(A_i(bag), y) + α·L1(R_i(S(x_i)),
  S(x_{i−1})). A tile is the instance, as for the run's aggregator: A_i is gated-attention MIL
  (``mil.GatedABMIL``) over the bag's tiles, each its map's mean (on a whole slide the instances are
  the map's positions). S samples n patches, each in a random tile of the batch, at the same place in
  x_i and x_{i−1}; the patch side is the whole-slide one (128 px of the stem's output over the
  feature stride) clipped to a tile's map;
- module K minimises the run's bag loss with the run's aggregator H on the tiles' pooled embeddings,
  as every other encoder mode.

``local_step`` takes the modules' gradients one after another, each alone (a stop_gradient at every
boundary, one module's activations alive at a time), then applies them in one update of the run's
optimiser: the official trainer's manual backward per module and one optimiser step (one AdamW over
all parameters is per-parameter, so it equals one optimiser per module). In memory each module's
gradient is one jitted function; with an ``Execution`` the blocks stream through Big-Layers.

References:
    Zhang et al., MICCAI 2022; official code cvlab-stonybrook/local_learning_wsi (trainer.py
    ``LocalModule.training_step``, network/resnet.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigjax.layers import host
from bigjax.layers.execution import Execution
from bigjax.local.group_norm import NORMS, require_one_map, to_group_norm
from bigjax.local.held_grad import held_grad
from bigjax.local.rfr import RFRDecoder, check_patches, rfr_patches, sample_tile_patches
from bigjax.local.split import SPLITS, module_pieces
from bigjax.models import mil
from bigjax.models.resnet import ResNet
from bigjax.models.resnet_paths import Fused, InMemory
from bigjax.train import steps

__all__ = ["AuxiliaryLoss", "LocalResNet", "module_params", "TRAINABLE", "local_step"]

_STEM = (("encoder", "conv1"), ("encoder", "bn1"))
# what the optimiser updates: every parameter but the frozen stem's
TRAINABLE = nnx.All(nnx.Param, lambda path, _: tuple(path[:2]) not in _STEM)


class AuxiliaryLoss(nnx.Module):
    """A_i (gated-attention MIL over a bag's tiles) and R_i (the RFR decoder) of a module i < K."""

    def __init__(self, channels: int, in_channels: int, scale: int, n_classes: int, *,
                 rngs: nnx.Rngs):
        self.classifier = mil.build("gated_abmil", channels, n_classes, rngs=rngs)
        self.decoder = RFRDecoder(channels, in_channels, scale, rngs=rngs)


class LocalResNet(ResNet):
    """A ResNet-18/34 tile encoder whose residual blocks form K modules, with A_i and R_i for i < K.

    Its eval-mode forward and embedding are the plain ``ResNet``'s (the arch's ``eval_forward``).

    Args:
      depth: 18 or 34.
      n_modules: K; it must divide the 8 pieces.
      n_classes: slide classes (of the auxiliary classifiers).
      alpha: weight of the RFR loss (1).
      n_patches: RFR patches per module and step (10).
      patch: RFR patch side in the stem output's pixels (128), over each module's stride.
      bn_train: the blocks' BatchNorm normalises with the batch's statistics (and updates the
        running ones), else with the running statistics (frozen, as Zhang et al.).
      norm: "batch", or "group": every BatchNorm of the ResNet (not of the RFR decoders) made
        GroupNorm(C, C), each tile normalised by its own statistics (``group_norm``).
    """

    def __init__(self, depth: int, n_modules: int, n_classes: int, *, alpha: float = 1.0,
                 n_patches: int = 10, patch: int = 128, bn_train: bool = True, norm: str = "batch",
                 rngs: nnx.Rngs):
        if depth not in SPLITS:
            raise ValueError(f"local training splits ResNet-18 or ResNet-34, got ResNet-{depth}")
        if norm not in NORMS:
            raise ValueError(f"norm={norm!r}: choose one of {', '.join(NORMS)}")
        super().__init__(depth, rngs=rngs)
        if norm == "group":
            to_group_norm(self)  # before the auxiliary decoders exist: they keep BatchNorm
        self.norm = norm
        pieces, channels, strides = SPLITS[depth]
        groups = module_pieces(n_modules, len(pieces))
        self.module_blocks = tuple(tuple((layer, b) for p in g for layer, start, stop in [pieces[p]]
                                         for b in range(start, stop)) for g in groups)
        aux, scales, in_channels, in_stride = [], [], 64, 1
        for i, g in enumerate(groups):
            c, stride = channels[g[-1]], strides[g[-1]]
            scales.append(stride // in_stride)
            if i < n_modules - 1:
                aux.append(AuxiliaryLoss(c, in_channels, scales[-1], n_classes, rngs=rngs))
            in_channels, in_stride = c, stride
        self.aux = nnx.List(aux)
        self.scales = tuple(scales)
        self.patches = tuple(max(1, patch // strides[g[-1]]) for g in groups)
        self.alpha, self.n_patches, self.bn_train = alpha, n_patches, bn_train

    @property
    def n_modules(self) -> int:
        return len(self.module_blocks)

    def blocks(self, i: int) -> list:
        """Module i's residual blocks, in order."""
        return [getattr(self, f"layer{layer}")[b] for layer, b in self.module_blocks[i]]


def module_params(encoder: LocalResNet, i: int):
    """The NNX filter of module i's parameters: its blocks and A_i, R_i — or, for the last, H."""
    prefixes = [("encoder", f"layer{layer}", b) for layer, b in encoder.module_blocks[i]]
    prefixes.append(("encoder", "aux", i) if i < encoder.n_modules - 1 else ("head",))
    return nnx.All(nnx.Param, lambda path, _: any(tuple(path[:len(p)]) == p for p in prefixes))


def _pooled(path, x):
    """Each tile's map averaged: (N, C) on the compute device."""
    ex = getattr(path, "execution", None)
    return jnp.mean(x, axis=(1, 2)) if ex is None else ex.to_compute(
        host.global_avg_pool(x, execution=ex))


def module_loss(model: steps.MILClassifier, path, x_prev, labels, positions, i: int, patch: int):
    """(L_i, x_i behind a stop_gradient) of module i on the batch's tile maps x_{i−1} (B·K, h, w, C)."""
    enc = model.encoder
    x = x_prev
    for block in enc.blocks(i):
        x = block(path, x, enc.bn_train)
    bags = _pooled(path, x).reshape(labels.shape[0], -1, x.shape[-1])
    if i == enc.n_modules - 1:
        return steps.batch_loss(model, bags, labels), x
    aux = enc.aux[i]
    ce = jnp.mean(jnp.stack([mil.bag_loss(aux.classifier(bag, train=True), y)
                             for bag, y in zip(bags, labels)]))
    rfr = aux.decoder.loss(*rfr_patches(path, x, x_prev, positions, patch, enc.scales[i]),
                           train=True)
    return ce + enc.alpha * rfr, jax.lax.stop_gradient(x)


def _module_grad(model, path, x_prev, labels, positions, i, patch):
    """Module i's loss, output and gradient (``held_grad``): with an ``Execution``, its input read
    back for the forward only and its output held by the store through the backward."""

    def loss_fn(m, x_in):
        return module_loss(m, path, x_in, labels, positions, i, patch)

    return held_grad(model, module_params(model.encoder, i), loss_fn, x_prev,
                     getattr(path, "execution", None))


@nnx.jit(static_argnames=("i", "patch"))
def _jitted_module_grad(model, x_prev, labels, positions, *, i, patch):
    return _module_grad(model, InMemory, x_prev, labels, positions, i, patch)


@nnx.jit
def _stem(encoder, tiles):
    return jax.lax.stop_gradient(encoder.stem(InMemory, tiles, False))


@nnx.jit
def _update(model, optimizer, grads):
    optimizer.update(model, grads)


def local_step(model: steps.MILClassifier, optimizer: nnx.Optimizer, tiles, labels,
               rng: np.random.Generator, *, execution: Execution | None = None) -> list:
    """One step of local training on a batch of bags; returns [L_1, …, L_K].

    Args:
      model: a ``MILClassifier`` whose encoder is a ``LocalResNet``.
      optimizer: over ``TRAINABLE`` of the model (the run's optimiser).
      tiles: normalised (B, K, T, T, 3) tiles (on the device; host memory with ``execution``).
      labels: (B,) int32.
      rng: draws the RFR patches.
      execution: stream each module's blocks through Big-Layers (None: in memory, jitted).
    """
    enc, labels = model.encoder, jnp.asarray(labels, jnp.int32)
    x = tiles.reshape(-1, *tiles.shape[2:])
    path = InMemory if execution is None else Fused(execution)
    if execution is not None and enc.norm == "group":
        require_one_map(x.shape)
    x = _stem(enc, x) if execution is None else execution.hold(jax.lax.stop_gradient(
        enc.stem(path, execution.to_host(x), False)))
    losses, grads = [], []
    for i in range(enc.n_modules):
        positions, patch = np.zeros((0, 3), np.int32), 0
        if i < enc.n_modules - 1:
            positions, patch = sample_tile_patches(rng, x.shape[0], x.shape[1:3], enc.scales[i],
                                                   enc.patches[i], enc.n_patches)
            check_patches(x.shape, positions, patch, enc.scales[i])
        if execution is None:
            loss, x, g = _jitted_module_grad(model, x, labels, positions, i=i, patch=patch)
        else:
            loss, x, g = _module_grad(model, path, x, labels, positions, i, patch)
        losses.append(loss)
        grads.append(g)
    _update(model, optimizer, nnx.merge_state(*grads))
    return losses
