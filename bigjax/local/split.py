"""The split of ResNet-34 into 8 pieces and K gradient-isolated modules (Zhang et al. 2022).

After the frozen stem (conv1 with stride 3 instead of 2, BatchNorm, ReLU, max-pool), the residual
blocks are cut into 8 pieces of about equal activation memory: layer1 blocks 1, 2, 3; layer2 blocks
1–2, 3–4; layer3 blocks 1–3, 4–6; layer4. K ∈ {1, 2, 4, 8} modules take 8/K consecutive pieces each
(K = 1 is end-to-end training with the same frozen stem). ResNet-18's eight blocks are its eight
pieces (one block each), for local training of the runs' default tile encoder on tile bags.

References:
    Zhang et al., "Gigapixel Whole-Slide Images Classification using Locally Supervised Learning",
    MICCAI 2022; official code cvlab-stonybrook/local_learning_wsi (network/resnet.py,
    ``Resnet34LocalBatchNorm``).
"""

from __future__ import annotations

from bigjax.layers.plan import ConvGeometry
from bigjax.models.resnet import ResNet

__all__ = ["PIECES", "PIECE_CHANNELS", "PIECE_STRIDES", "SPLITS", "module_pieces",
           "cut_pieces", "restride_stem"]

# (layer, first block, last block + 1) of each piece
PIECES = ((1, 0, 1), (1, 1, 2), (1, 2, 3), (2, 0, 2), (2, 2, 4), (3, 0, 3), (3, 3, 6), (4, 0, 3))
PIECE_CHANNELS = (64, 64, 64, 128, 128, 256, 256, 512)
# output stride of each piece relative to the stem's output
PIECE_STRIDES = (1, 1, 1, 2, 2, 4, 4, 8)
# depth -> (pieces, their output channels, their output strides); ResNet-18: one block a piece
SPLITS = {34: (PIECES, PIECE_CHANNELS, PIECE_STRIDES),
          18: (tuple((layer, b, b + 1) for layer in (1, 2, 3, 4) for b in (0, 1)),
               (64, 64, 128, 128, 256, 256, 512, 512), (1, 1, 2, 2, 4, 4, 8, 8))}


def module_pieces(n_modules: int, n_pieces: int = len(PIECES)) -> tuple[tuple[int, ...], ...]:
    """Indices of the pieces in each of ``n_modules`` modules (consecutive, n_pieces/K each)."""
    if n_modules < 1 or n_pieces % n_modules:
        counts = [k for k in range(1, n_pieces + 1) if n_pieces % k == 0]
        raise ValueError(f"the number of modules K must divide the {n_pieces} pieces evenly "
                         f"(one of {counts}), got {n_modules}")
    per = n_pieces // n_modules
    return tuple(tuple(range(i * per, (i + 1) * per)) for i in range(n_modules))


def cut_pieces(resnet: ResNet) -> list[list]:
    """The residual blocks of a ResNet-34 (or -18), grouped into the 8 pieces (the same objects)."""
    if resnet.depth not in SPLITS:
        raise ValueError(f"the local split is defined for ResNet-34 and ResNet-18, got "
                         f"ResNet-{resnet.depth}")
    layers = (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)
    return [list(layers[layer - 1])[start:stop] for layer, start, stop in SPLITS[resnet.depth][0]]


def restride_stem(resnet: ResNet, stride: int) -> None:
    """Give the stem's 7x7 conv another stride (Zhang et al. use 3); the kernel is unchanged."""
    if stride < 1:
        raise ValueError(f"stem stride must be a positive integer, got {stride}")
    resnet.conv1.geom = ConvGeometry.make(7, stride, 3)
