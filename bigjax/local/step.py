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
    options.py: AdamW, lr 2e-5 with a 0.5 factor for the pretrained backbone, accumulation 8;
    ``MultiStepLR``: lr × 0.1 at epochs 25, 35, 45 in its README command).
"""

from __future__ import annotations

import collections
import functools
from typing import Sequence

import jax
import numpy as np
import optax
from flax import nnx

from bigjax.layers.execution import Execution
from bigjax.local.held_grad import held_grad
from bigjax.local.model import LocalModule, LocalNetwork
from bigjax.local.rfr import check_patches
from bigjax.models.resnet_paths import Fused, InMemory
from bigjax.train.optim import accumulated

__all__ = ["BACKBONE", "HEADS", "LocalOptimizer", "make_optimizers", "step_decay", "decay_updates",
           "module_grad", "paths_for", "train_step"]

BACKBONE = nnx.All(nnx.Param, nnx.PathContains("blocks"))
HEADS = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("blocks")))


class LocalOptimizer(nnx.Module):
    """The two optimisers of one module: its backbone blocks and its heads (an NNX object, so a
    list of them checkpoints as one state)."""

    def __init__(self, backbone: nnx.Optimizer, heads: nnx.Optimizer):
        self.backbone, self.heads = backbone, heads

    def update(self, module: LocalModule, grads: nnx.State) -> None:
        backbone, heads = nnx.filter_state(grads, BACKBONE, HEADS)
        _apply(self.backbone, module, backbone)
        _apply(self.heads, module, heads)


@nnx.jit
def _apply(optimizer: nnx.Optimizer, module: LocalModule, grads: nnx.State) -> None:
    # jitted: run eagerly, optax.MultiSteps' lax.cond compiles anew at every call (~5 s here)
    optimizer.update(module, grads)


def make_optimizers(net: LocalNetwork, *, lr_backbone: float = 1e-5, lr_heads: float = 2e-5,
                    weight_decay: float = 1e-2, accum: int = 1,
                    decay_at: Sequence[int] = ()) -> list[LocalOptimizer]:
    """One ``LocalOptimizer`` per module (AdamW; ``accum`` slides averaged per update).

    ``decay_at``: update counts from which the learning rates are 10 times smaller, once more at
    each (``step_decay``; ``decay_updates`` turns the official epochs into update counts).
    """
    def adamw(lr):
        return accumulated(optax.adamw(step_decay(lr, decay_at), weight_decay=weight_decay), accum)
    return [LocalOptimizer(nnx.Optimizer(m, adamw(lr_backbone), wrt=BACKBONE),
                           nnx.Optimizer(m, adamw(lr_heads), wrt=HEADS))
            for m in net.local_modules]


def step_decay(lr: float, decay_at: Sequence[int], factor: float = 0.1) -> optax.Schedule:
    """``lr`` times ``factor`` for every boundary in ``decay_at`` that the update count has reached:
    torch's ``MultiStepLR`` (gamma 0.1), the official schedule, counted in optimiser updates."""
    scales = collections.Counter(int(u) for u in decay_at)
    if any(u < 0 for u in scales):
        raise ValueError(f"learning-rate decay at updates {sorted(scales)}: must be >= 0")
    return optax.piecewise_constant_schedule(lr, {u: factor ** k for u, k in scales.items()})


def decay_updates(decay_epochs: Sequence[int], slides_per_epoch: int, accum: int) -> list[int]:
    """The update counts at which ``decay_epochs`` (0-based epochs, as the official
    ``--decay-multi-epochs``) begin: the first update that completes on a slide of that epoch.

    Update u completes on slide (u + 1)·accum − 1 of the run, in epoch ⌊that / slides_per_epoch⌋,
    so epoch m's first update is ⌊m·slides_per_epoch / accum⌋. (The official trainer counts its
    accumulation within each epoch; this counts it over the run, as ``optax.MultiSteps``.)
    """
    if slides_per_epoch < 1 or accum < 1:
        raise ValueError(f"slides_per_epoch={slides_per_epoch}, accum={accum}: must be >= 1")
    return [m * slides_per_epoch // accum for m in decay_epochs]


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
    """The module's loss, output and gradient (``held_grad``): its input read back for the forward
    only (``Execution.take``), its output held by the path's store through the backward."""

    def loss_fn(m, x_in):
        return m.loss(path, x_in, label, positions, patch=patch, alpha=alpha, bn_train=bn_train)

    return held_grad(module, nnx.Param, loss_fn, x_prev, getattr(path, "execution", None))


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
    if paths[0] is not InMemory:
        h = paths[0].execution.hold(h)
    losses = []
    for m, opt, path, (positions, patch) in zip(net.local_modules, optimizers, paths, plan):
        loss, h, grads = module_grad(m, path, h, label, positions, patch=patch, alpha=net.alpha,
                                     bn_train=net.bn_train)
        opt.update(m, grads)
        losses.append(loss)
    return losses
