"""Training: optimisers and schedules (optim)."""

from bigjax.train.optim import (OptimizerConfig, demon_adam, demon_momentum, make_optimizer,
                                make_schedule, scale_by_demon_adam)

__all__ = ["OptimizerConfig", "demon_adam", "demon_momentum", "make_optimizer", "make_schedule",
           "scale_by_demon_adam"]
