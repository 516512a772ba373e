"""Optimisers of the paper's experiments: Adam (torch-style L2), AdamW, DEMON Adam; LR schedules.

References:
    Kingma, Ba. Adam: A method for stochastic optimization. ICLR 2015.
    Loshchilov, Hutter. Decoupled weight decay regularization (AdamW). ICLR 2019.
    Chen, Wolfe, Li, Kyrillidis. Demon: Improved neural network training with momentum decay.
    ICASSP 2022 (arXiv 1910.04952).
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adam", "adamw", "demon_adam")
SCHEDULES = ("constant", "cosine", "exponential")
# Exponential schedule of the paper: the learning rate times 0.955 after every epoch.
EXPONENTIAL_DECAY_PER_EPOCH = 0.955


def demon_momentum(beta_init: float, total_steps: int) -> Callable[[jax.Array], jax.Array]:
    """The DEMON momentum schedule, step t -> beta_t.

    beta_t = beta_init * (1 - t/T) / ((1 - beta_init) + beta_init * (1 - t/T)), i.e. the total
    future contribution of a gradient, beta / (1 - beta), decays linearly from its initial value to
    0 at t = T. Steps past T are held at T (beta = 0) rather than going negative.

    Args:
        beta_init: momentum at step 0.
        total_steps: T, the step at which the momentum reaches 0.

    Returns:
        a function of the (integer or float) step returning beta_t as float32.

    References:
        Chen et al. 2022, the decay routine of Section 3 and Algorithm 2 (arXiv 1910.04952).
    """
    if total_steps <= 0:
        raise ValueError(f"DEMON needs total_steps > 0 (got {total_steps})")

    def schedule(step):
        remaining = 1.0 - jnp.clip(jnp.asarray(step, jnp.float32), 0.0, total_steps) / total_steps
        return beta_init * remaining / ((1.0 - beta_init) + beta_init * remaining)

    return schedule


class ScaleByDemonAdamState(NamedTuple):
    """State of `scale_by_demon_adam`."""

    count: jax.Array  # number of updates done so far (int32)
    beta1_product: jax.Array  # prod of beta_s over the updates done, for the bias correction
    mu: optax.Updates  # first moment
    nu: optax.Updates  # second moment


def scale_by_demon_adam(beta_init: float, total_steps: int, b2: float = 0.999,
                        eps: float = 1e-8) -> optax.GradientTransformation:
    """Adam's scaling with the first-moment coefficient following the DEMON schedule.

    At update t = 0, 1, ...: beta_t = demon_momentum(beta_init, T)(t),
    m_t = beta_t m_{t-1} + (1 - beta_t) g_t, v_t = b2 v_{t-1} + (1 - b2) g_t^2,
    update = m_hat / (sqrt(v_hat) + eps) with v_hat = v_t / (1 - b2^(t+1)) and
    m_hat = m_t / (1 - prod_{s<=t} beta_s).

    Bias correction: with a time-varying coefficient, the weights of the exponential average sum to
    1 - prod_s beta_s, so that is the exact correction (it equals Adam's 1 - beta^t when beta is
    constant); the Keras DemonAdam uses the approximation 1 - beta_t^t instead.

    Args:
        beta_init: initial first-moment coefficient (Adam's b1).
        total_steps: T of the DEMON schedule.
        b2: second-moment coefficient.
        eps: added to the square root of the second moment.

    Returns:
        an optax.GradientTransformation (no learning rate applied).
    """
    beta_at = demon_momentum(beta_init, total_steps)

    def init_fn(params):
        return ScaleByDemonAdamState(count=jnp.zeros([], jnp.int32),
                                     beta1_product=jnp.ones([], jnp.float32),
                                     mu=jax.tree.map(jnp.zeros_like, params),
                                     nu=jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None):
        del params
        beta = beta_at(state.count)
        mu = jax.tree.map(lambda m, g: beta * m + (1.0 - beta) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1.0 - b2) * g * g, state.nu, updates)
        beta1_product = state.beta1_product * beta
        count = state.count + 1
        mu_correction = 1.0 - beta1_product
        nu_correction = 1.0 - b2 ** count.astype(jnp.float32)
        updates = jax.tree.map(
            lambda m, v: (m / mu_correction) / (jnp.sqrt(v / nu_correction) + eps), mu, nu)
        return updates, ScaleByDemonAdamState(count, beta1_product, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def demon_adam(learning_rate: float | optax.Schedule, total_steps: int, b1: float = 0.9,
               b2: float = 0.999, eps: float = 1e-8,
               weight_decay: float = 0.0) -> optax.GradientTransformation:
    """Adam whose first-moment coefficient decays by DEMON from b1 to 0 over total_steps.

    Weight decay, when nonzero, is an L2 term added to the gradient before the moments, as
    torch.optim.Adam's `weight_decay` (the form the paper's PyTorch experiments use).

    Args:
        learning_rate: a float or an optax schedule of the update count.
        total_steps: T, the number of updates over which the momentum decays to 0.
        b1: initial first-moment coefficient beta_init.
        b2: second-moment coefficient.
        eps: added to the square root of the second moment.
        weight_decay: L2 coefficient added to the gradient.

    Returns:
        an optax.GradientTransformation.

    References:
        Chen et al. 2022, Algorithm 2 (DEMON Adam).
    """
    return optax.chain(
        optax.add_decayed_weights(weight_decay) if weight_decay else optax.identity(),
        scale_by_demon_adam(b1, total_steps, b2=b2, eps=eps),
        optax.scale_by_learning_rate(learning_rate),
    )


def make_schedule(schedule: str, lr: float, steps_per_epoch: int, epochs: int) -> optax.Schedule:
    """Learning rate as a function of the optimiser update count.

    Args:
        schedule: "constant"; "cosine" (annealing from lr to 0 over steps_per_epoch * epochs
            updates, per update); or "exponential" (lr * 0.955 ** epoch, staircase per epoch).
        lr: initial learning rate.
        steps_per_epoch: optimiser updates per epoch (after gradient accumulation).
        epochs: number of epochs.

    Returns:
        an optax schedule.
    """
    if schedule == "constant":
        return optax.constant_schedule(lr)
    if schedule == "cosine":
        return optax.cosine_decay_schedule(lr, decay_steps=max(1, steps_per_epoch * epochs))
    if schedule == "exponential":
        return optax.exponential_decay(lr, transition_steps=max(1, steps_per_epoch),
                                       decay_rate=EXPONENTIAL_DECAY_PER_EPOCH, staircase=True)
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Settings `make_optimizer` reads (from a config object, a mapping, or keywords).

    Attributes:
        name: "adam" (L2 added to the gradient, as torch Adam), "adamw" (decoupled decay, as torch
            AdamW: p -= lr * weight_decay * p) or "demon_adam".
        lr: initial learning rate.
        weight_decay: L2 (adam, demon_adam) or decoupled (adamw) coefficient.
        schedule: "constant", "cosine" or "exponential" (see make_schedule).
        accum: micro-batches whose gradients are averaged into one update (optax.MultiSteps).
        b1, b2, eps: Adam moments and epsilon (b1 is DEMON's beta_init).
        clip_norm: if set, clip the global gradient norm to it before the optimiser.
    """

    name: str = "adam"
    lr: float = 1e-4
    weight_decay: float = 0.0
    schedule: str = "constant"
    accum: int = 1
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float | None = None

    def __post_init__(self):
        """Refuse settings that cannot train (``--lr=0`` trained on silently before)."""
        if self.name not in OPTIMIZERS:
            raise ValueError(f"--optimizer={self.name}: choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule={self.schedule}: choose one of {', '.join(SCHEDULES)}")
        if not self.lr > 0:
            raise ValueError(f"--lr={self.lr}: the learning rate must be positive")
        if not self.weight_decay >= 0:
            raise ValueError(f"--weight_decay={self.weight_decay}: must be >= 0")
        if isinstance(self.accum, bool) or not isinstance(self.accum, int) or self.accum < 1:
            raise ValueError(f"--accum={self.accum}: must be an integer >= 1")
        if not (0 <= self.b1 < 1 and 0 <= self.b2 < 1):
            raise ValueError(f"b1={self.b1}, b2={self.b2}: Adam's moments must be in [0, 1)")


def make_optimizer(cfg: Any = None, /, *, steps_per_epoch: int = 1, epochs: int = 1,
                   **overrides) -> optax.GradientTransformation:
    """Build the optimiser a run asks for.

    Args:
        cfg: None, a mapping, or any object (e.g. an ``OptimizerConfig``); the fields of
            OptimizerConfig it has are read, others ignored.
        steps_per_epoch: optimiser updates per epoch, i.e. batches per epoch // accum.
        epochs: number of epochs; with steps_per_epoch it sets cosine length and DEMON's T.
        **overrides: OptimizerConfig fields, taking precedence over cfg.

    Returns:
        an optax.GradientTransformation; with accum > 1 it is wrapped in optax.MultiSteps, so
        its schedule and DEMON count optimiser updates, not micro-batches.
    """
    c = _optimizer_config(cfg, overrides)
    schedule = make_schedule(c.schedule, c.lr, steps_per_epoch, epochs)
    if c.name == "adam":
        opt = optax.chain(
            optax.add_decayed_weights(c.weight_decay) if c.weight_decay else optax.identity(),
            optax.adam(schedule, b1=c.b1, b2=c.b2, eps=c.eps))
    elif c.name == "adamw":
        opt = optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay)
    else:  # "demon_adam": OptimizerConfig refuses other names
        opt = demon_adam(schedule, total_steps=max(1, steps_per_epoch * epochs), b1=c.b1,
                         b2=c.b2, eps=c.eps, weight_decay=c.weight_decay)
    if c.clip_norm is not None:
        opt = optax.chain(optax.clip_by_global_norm(c.clip_norm), opt)
    return accumulated(opt, c.accum)


def accumulated(opt: optax.GradientTransformation, accum: int) -> optax.GradientTransformation:
    """``opt`` applied to the mean of every ``accum`` gradients (``optax.MultiSteps``; its schedule
    counts updates, not micro-batches); ``opt`` itself for ``accum`` 1."""
    if accum > 1:
        return optax.MultiSteps(opt, every_k_schedule=accum).gradient_transformation()
    return opt


def _optimizer_config(cfg: Any, overrides: dict) -> OptimizerConfig:
    """Merge cfg's OptimizerConfig fields with keyword overrides; reject unknown keywords."""
    names = {f.name for f in dataclasses.fields(OptimizerConfig)}
    unknown = set(overrides) - names
    if unknown:
        raise TypeError(f"make_optimizer got unknown settings {sorted(unknown)}; "
                        f"known: {sorted(names)}")
    if cfg is None:
        found = {}
    elif isinstance(cfg, Mapping):
        found = {k: v for k, v in cfg.items() if k in names}
    else:
        found = {k: getattr(cfg, k) for k in names if hasattr(cfg, k)}
    return OptimizerConfig(**{**found, **overrides})
