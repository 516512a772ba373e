"""MIL aggregators: each maps one bag of tile features (N, D) to bag logits.

Every aggregator is built as `Cls(in_dim, n_classes, *, rngs, **paper_defaults)` and called as
`model(features, *, train)`, returning a dict with "logits" (n_classes,), "attention" (N,) summing
to 1, and for DTFD-MIL "aux_logits" (M, n_classes); `bag_loss` is the matching training loss.
"abmil_bernoulli" / "gated_abmil_bernoulli" are the official one-class (sigmoid) ABMILs, for
binary tasks, trained with the official Bernoulli likelihood (`abmil.ABMIL`).
"""

from flax import nnx

from bigjax.models.mil.abmil import ABMIL, BernoulliABMIL, BernoulliGatedABMIL, GatedABMIL
from bigjax.models.mil.dtfd import DTFD
from bigjax.models.mil.gma import GMA
from bigjax.models.mil.loss import bag_loss
from bigjax.models.mil.pooling import MaxPool, MeanPool
from bigjax.models.mil.transmil import TransMIL

AGGREGATORS = {
    "abmil": ABMIL,
    "gated_abmil": GatedABMIL,
    "abmil_bernoulli": BernoulliABMIL,
    "gated_abmil_bernoulli": BernoulliGatedABMIL,
    "dtfd": DTFD,
    "transmil": TransMIL,
    "gma": GMA,
    "mean": MeanPool,
    "max": MaxPool,
}

BINARY_ONLY = ("abmil_bernoulli", "gated_abmil_bernoulli")  # one sigmoid output: two classes


def build(name: str, in_dim: int, n_classes: int, *, rngs: nnx.Rngs, **kwargs) -> nnx.Module:
    """Construct the aggregator registered under name.

    Args:
        name: one of AGGREGATORS ("abmil", "gated_abmil", "abmil_bernoulli",
            "gated_abmil_bernoulli", "dtfd", "transmil", "gma", "mean", "max").
        in_dim: size of each tile feature.
        n_classes: number of logits.
        rngs: parameter and dropout randomness.
        **kwargs: overrides of the aggregator's paper defaults (e.g. dropout=0.25).

    Returns:
        the aggregator module.
    """
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; choose one of {', '.join(AGGREGATORS)}")
    return AGGREGATORS[name](in_dim, n_classes, rngs=rngs, **kwargs)


__all__ = ["AGGREGATORS", "BINARY_ONLY", "build", "bag_loss", "ABMIL", "GatedABMIL", "BernoulliABMIL",
           "BernoulliGatedABMIL", "DTFD", "TransMIL", "GMA",
           "MeanPool", "MaxPool"]
