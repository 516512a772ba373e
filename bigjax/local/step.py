"""One training step of local learning on one slide: every module forward, backward and updated.

As the official trainer (``LocalModule.training_step``), a step is one pass: the frozen stem runs
without gradient, then for each module in order its loss is computed on the (detached) output of the
module before, its gradient taken with respect to its own parameters only, and its output passed on.
Only one module's activations are alive at a time — the memory saving of the method. Each module
has its own optimiser: AdamW with weight decay 1e-2 (the official code's default and README command;
the issue quoted 1e-6, which the code does not use), lr 1e-5 for its backbone blocks and 2e-5 for its
heads (A_i/H and R_i), with optional gradient accumulation (8 slides in the paper). The official
trainer holds one AdamW with these two parameter groups; AdamW acts per parameter, so one optimiser
per module takes the same steps.

The in-memory path (``execution=None``) jits each module's gradient; a Big path (an ``Execution``,
or one per module) runs eagerly through partitioned Big-Layers with activations in host memory.

References:
    Zhang et al., MICCAI 2022; official code cvlab-stonybrook/local_learning_wsi (trainer.py,
    options.py: AdamW, lr 2e-5 with a 0.5 factor for the pretrained backbone, accumulation 8).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import jax
import numpy as np
from flax import nnx

from bigjax.layers.execution import Execution
from bigjax.local.model import LocalModule, LocalNetwork
from bigjax.local.rfr import check_patches
from bigjax.models.resnet_paths import Fused, InMemory
from bigjax.train.optim import make_optimizer

__all__ = ["BACKBONE", "HEADS", "LocalOptimizer", "make_optimizers", "module_grad", "paths_for",
           "train_step"]

BACKBONE = nnx.All(nnx.Param, nnx.PathContains("blocks"))
HEADS = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("blocks")))


@dataclass
class LocalOptimizer:
    """The two optimisers of one module: its backbone blocks and its heads."""

    backbone: nnx.Optimizer
    heads: nnx.Optimizer

    def update(self, module: LocalModule, grads: nnx.State) -> None:
        backbone, heads = nnx.filter_state(grads, BACKBONE, HEADS)
        self.backbone.update(module, backbone)
        self.heads.update(module, heads)


def make_optimizers(net: LocalNetwork, *, lr_backbone: float = 1e-5, lr_heads: float = 2e-5,
                    weight_decay: float = 1e-2, accum: int = 1) -> list[LocalOptimizer]:
    """One ``LocalOptimizer`` per module (AdamW; ``accum`` slides averaged per update)."""
    def adamw(lr):
        return make_optimizer(name="adamw", lr=lr, weight_decay=weight_decay, accum=accum)
    return [LocalOptimizer(nnx.Optimizer(m, adamw(lr_backbone), wrt=BACKBONE),
                           nnx.Optimizer(m, adamw(lr_heads), wrt=HEADS))
            for m in net.local_modules]


def paths_for(execution: Execution | Sequence[Execution] | None, n_modules: int) -> list:
    """One path per module: in memory (None), or Fused Big-Layers with that module's Execution."""
    if execution is None:
        return [InMemory] * n_modules
    executions = [execution] * n_modules if isinstance(execution, Execution) else list(execution)
    if len(executions) != n_modules:
        raise ValueError(f"give one Execution or one per module ({n_modules}), got "
                         f"{len(executions)}")
    return [Fused(ex) for ex in executions]


def module_grad(module: LocalModule, path, x_prev, label, positions, *, patch: int,
                alpha: float = 1.0, bn_train: bool = False):
    """``(L_i, x_i, ∂L_i/∂θ_i)`` of one module; jitted on the in-memory path."""
    if module.decoder is not None:
        check_patches(x_prev.shape, positions, patch, module.scale)
    if path is InMemory:
        graphdef, state = nnx.split(module)
        loss, x, grads, state = _in_memory_grad(graphdef, state, x_prev, label, positions,
                                                patch=patch, alpha=alpha, bn_train=bn_train)
        nnx.update(module, state)
        return loss, x, grads
    return _module_grad(module, path, x_prev, label, positions, patch, alpha, bn_train)


def _module_grad(module, path, x_prev, label, positions, patch, alpha, bn_train):
    def loss_fn(m):
        return m.loss(path, x_prev, label, positions, patch=patch, alpha=alpha, bn_train=bn_train)
    (loss, x), grads = nnx.value_and_grad(loss_fn, has_aux=True)(module)
    return loss, x, grads


@functools.partial(jax.jit, static_argnames=("graphdef", "patch", "alpha", "bn_train"))
def _in_memory_grad(graphdef, state, x_prev, label, positions, *, patch, alpha, bn_train):
    """A module's loss, output and gradient as one jitted function (also what memory is read from)."""
    module = nnx.merge(graphdef, state)
    loss, x, grads = _module_grad(module, InMemory, x_prev, label, positions, patch, alpha,
                                  bn_train)
    return loss, x, grads, nnx.state(module)


def train_step(net: LocalNetwork, optimizers: Sequence[LocalOptimizer], x, label,
               rng: np.random.Generator, *, execution=None) -> list:
    """Train every module once on slide ``x`` (1, H, W, 3) with class ``label``; returns [L_1..L_K].

    ``execution``: None (in memory), an ``Execution`` or one per module (the stem uses the first).
    """
    paths = paths_for(execution, len(net.local_modules))
    plan = net.sample(rng, x.shape)
    h = net.stem(paths[0], x)
    losses = []
    for m, opt, path, (positions, patch) in zip(net.local_modules, optimizers, paths, plan):
        loss, h, grads = module_grad(m, path, h, label, positions, patch=patch, alpha=net.alpha,
                                     bn_train=net.bn_train)
        opt.update(m, grads)
        losses.append(loss)
    return losses
