"""A ResNet-34 trained as K gradient-isolated modules, each with its own loss (Zhang et al. 2022).

Module i (of K) maps x_{i−1} to x_i through its pieces of the backbone. Modules 1..K−1 minimise
L_i = CE(A_i(x_i), y) + α·L1(R_i(S(x_i)), S(x_{i−1})) (auxiliary gated-attention classifier and
Random Feature Reconstruction, α = 1); module K minimises L_K = CE(H(x_K), y) with the real
classifier H. Every boundary is a ``jax.lax.stop_gradient``: no gradient reaches an earlier module.
The stem is frozen and run without gradient; the backbone's BatchNorm is frozen (running statistics)
unless ``bn_train``, as the official ``Resnet34LocalBatchNorm``.

Every piece runs through a ``path`` (``resnet_paths.InMemory``, or ``Fused``/``Separate`` built with
an ``Execution``) so a whole slide streams through Big-Layers with its activations in host memory.

References:
    Zhang et al., "Gigapixel Whole-Slide Images Classification using Locally Supervised Learning",
    MICCAI 2022; official code cvlab-stonybrook/local_learning_wsi (network/resnet.py, main.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorstore as ts
from flax import nnx

from bigjax.local.heads import GatedAttentionHead, aux_head, final_head
from bigjax.local.rfr import RFRDecoder, rfr_patches, sample_patches
from bigjax.local.split import (PIECE_CHANNELS, PIECE_STRIDES, cut_pieces, module_pieces,
                                restride_stem)
from bigjax.models.resnet import ResNet
from bigjax.models.resnet_paths import stem

__all__ = ["LocalModule", "LocalNetwork", "local_resnet34"]


class LocalModule(nnx.Module):
    """Consecutive residual blocks with their classifier and (before the last module) RFR decoder.

    Args:
      blocks: the residual blocks, in order.
      head: A_i, or H for the last module.
      decoder: R_i, or None for the last module.
      scale: stride from the module's input to its output (1 or 2).
      patch: RFR patch side in this module's output pixels.
    """

    def __init__(self, blocks, head: GatedAttentionHead, decoder: RFRDecoder | None, *,
                 scale: int, patch: int):
        self.blocks = nnx.List(blocks)
        self.head, self.decoder = head, decoder
        self.scale, self.patch = scale, patch

    def features(self, path, x, *, bn_train: bool):
        """x_i from x_{i−1}: the module's blocks through ``path``."""
        for block in self.blocks:
            x = block(path, x, bn_train)
        return x

    def loss(self, path, x_prev, label, positions, *, patch: int, alpha: float = 1.0,
             bn_train: bool = False):
        """(L_i, x_i) with x_i behind a stop_gradient; ``positions``/``patch`` from ``sample``."""
        x = self.features(path, x_prev, bn_train=bn_train)
        logits = self.head(path, x, train=True)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(label, jnp.int32))
        if self.decoder is not None:
            loss = loss + alpha * self.decoder.loss(*rfr_patches(path, x, x_prev, positions, patch,
                                                                 self.scale), train=True)
        return loss, jax.lax.stop_gradient(x)

    def sample(self, rng: np.random.Generator, x_prev_shape, n: int):
        """S's positions for this module given its input's shape: ``(positions, patch)``."""
        if self.decoder is None:
            return np.zeros((0, 2), np.int32), 0
        return sample_patches(rng, tuple(x_prev_shape[1:3]), self.scale, self.patch, n)


class LocalNetwork(nnx.Module):
    """A frozen stem and K local modules over consecutive pieces of a backbone.

    Args:
      stem: the stem's (conv, BatchNorm), followed by ReLU and max-pool 3x3/2.
      pieces: the backbone's blocks in pieces (lists of residual blocks), in order.
      channels, strides: each piece's output channels and stride relative to the stem's output.
      n_modules: K; it must divide the number of pieces (K = 1 is end-to-end training).
      n_classes: number of slide classes.
      aux_kernel: the auxiliary heads' reducing-conv side (default: the official 9/9/7 by width).
      final_kernel: H's reducing-conv side (5).
      patch: RFR patch side in the stem output's pixels (128), divided by each module's stride.
      n_patches: RFR patches per module and step (10).
      alpha: weight of the RFR loss (1).
      bn_train: train the backbone's BatchNorm (batch statistics) instead of freezing it.
    ``local_resnet34`` builds the paper's network.
    """

    def __init__(self, stem, pieces, channels, strides, n_modules: int, n_classes: int, *,
                 stem_channels: int = 64, aux_kernel: int | None = None, final_kernel: int = 5,
                 patch: int = 128, n_patches: int = 10, alpha: float = 1.0, bn_train: bool = False,
                 rngs: nnx.Rngs):
        self.conv1, self.bn1 = stem
        modules, groups = [], module_pieces(n_modules, len(pieces))
        in_channels, in_stride = stem_channels, 1
        for i, group in enumerate(groups):
            c, stride = channels[group[-1]], strides[group[-1]]
            scale, last = stride // in_stride, i == len(groups) - 1
            head = (final_head(n_classes, channels=c, kernel=final_kernel, rngs=rngs) if last
                    else aux_head(c, n_classes, kernel=aux_kernel, rngs=rngs))
            decoder = None if last else RFRDecoder(c, in_channels, scale, rngs=rngs)
            modules.append(LocalModule([b for p in group for b in pieces[p]], head, decoder,
                                       scale=scale, patch=max(1, patch // stride)))
            in_channels, in_stride = c, stride
        self.local_modules = nnx.List(modules)
        self.n_patches, self.alpha, self.bn_train = n_patches, alpha, bn_train

    def stem(self, path, x):
        """x_0: the frozen stem (running BatchNorm statistics), behind a stop_gradient. On a Big path
        ``x`` may be a tensorstore array (``data.slide_array``), whose bands the stem's conv reads."""
        ex = getattr(path, "execution", None)
        if ex is not None:
            x = ex.input(x, self.conv1.kernel.get_value().dtype)
        elif isinstance(x, ts.TensorStore):
            raise ValueError("a tensorstore input needs a Big path (an Execution); in memory, "
                             "read the slide whole")
        return jax.lax.stop_gradient(stem(path, x, self.conv1, self.bn1, False))

    def sample(self, rng: np.random.Generator, x_shape) -> list:
        """RFR positions and patch side of every module for an input of ``x_shape`` (1, H, W, 3)."""
        h, w = ((n + 2 - 3) // 2 + 1 for n in self.conv1.geom.out_size(*x_shape[1:3]))
        plan, stride = [], 1
        for m in self.local_modules:
            plan.append(m.sample(rng, (1, -(-h // stride), -(-w // stride)), self.n_patches))
            stride *= m.scale
        return plan

    def losses(self, paths, x, label, plan) -> list:
        """[L_1, …, L_K] of one forward pass, with a stop_gradient at every module boundary.

        ``paths`` holds one path per module (the stem takes the first); ``plan`` is ``sample``'s.
        ``jax.grad`` of their sum gives every module's own gradient (the step computes them one
        module at a time instead, so only one module's activations are alive).
        """
        x = self.stem(paths[0], x)
        losses = []
        for m, path, (positions, patch) in zip(self.local_modules, paths, plan):
            loss, x = m.loss(path, x, label, positions, patch=patch, alpha=self.alpha,
                             bn_train=self.bn_train)
            losses.append(loss)
        return losses

    def predict(self, paths, x) -> jax.Array:
        """H's class logits (n_classes,) of slide ``x`` in eval mode: every module's blocks, then H."""
        x = self.stem(paths[0], x)
        for m, path in zip(self.local_modules, paths):
            x = m.features(path, x, bn_train=False)
        return self.local_modules[-1].head(paths[-1], x, train=False)

    def head_logits(self, paths, x) -> list:
        """Every head's class logits of slide ``x`` in eval mode: [A_1, …, A_{K−1}, H] (the last
        is ``predict``'s): which module's features already tell the classes."""
        x = self.stem(paths[0], x)
        logits = []
        for m, path in zip(self.local_modules, paths):
            x = m.features(path, x, bn_train=False)
            logits.append(m.head(path, x, train=False))
        return logits


def local_resnet34(n_modules: int = 4, n_classes: int = 2, *, stem_stride: int = 3,
                   resnet: ResNet | None = None, rngs: nnx.Rngs | None = None,
                   **options) -> LocalNetwork:
    """Zhang et al.'s network: ResNet-34 (stem stride 3), its 8 pieces in K ∈ {1, 2, 4, 8} modules.

    Args:
      resnet: a ResNet-34 to take the stem and blocks from (e.g. after ``load_torchvision``).
      **options: ``LocalNetwork``'s keyword options (aux_kernel, patch, bn_train, …).
    """
    rngs = rngs or nnx.Rngs(0)
    resnet = resnet or ResNet(34, rngs=rngs)
    restride_stem(resnet, stem_stride)
    return LocalNetwork((resnet.conv1, resnet.bn1), cut_pieces(resnet), PIECE_CHANNELS,
                        PIECE_STRIDES, n_modules, n_classes, rngs=rngs, **options)
