"""Encoder architectures by name: ``resnet18|34|50`` and the ViT configurations (``vit.config_for``).

One place answers what a run's ``--arch`` is: its in-memory and Big (streamed) model, its weights
loader, the mean/std its input tiles are normalised with, and its jittable eval-mode forward.
"""

from __future__ import annotations

from pathlib import Path

from flax import nnx

from bigjax.models import vit, vit_big, vit_configs
from bigjax.models.resnet import BigResNet, ResNet, load_torchvision

__all__ = ["names", "build", "load", "normalization", "eval_forward", "is_resnet", "IMAGENET", "DTYPES"]

RESNETS = {"resnet18": 18, "resnet34": 34, "resnet50": 50}
IMAGENET = vit_configs.IMAGENET
DTYPES = ("float32", "bfloat16")  # a ViT's matmul dtype (ResNets: float32 here)


def names() -> tuple[str, ...]:
    """Every architecture name: the ResNets, then the ViTs (timm names and aliases)."""
    return (*RESNETS, *vit_configs.CONFIGS, *vit_configs.ALIASES)


def is_resnet(arch: str) -> bool:
    return arch in RESNETS


def _check(arch: str) -> None:
    if arch not in names():
        raise ValueError(f"--arch={arch}: choose one of {', '.join(names())}")


def build(arch: str, *, big: bool, big_stages: int = 4, rngs: nnx.Rngs,
          dtype: str = "float32") -> nnx.Module:
    """The encoder: in memory, or streamed through Big-Layers (``big``; ResNets: ``big_stages``);
    ``dtype``: a ViT's matmul dtype ("bfloat16": mixed precision, parameters float32)."""
    _check(arch)
    if is_resnet(arch):
        if dtype != "float32":
            raise ValueError(f"dtype {dtype!r}: the ResNet encoders here compute in float32")
        depth = RESNETS[arch]
        return BigResNet(depth, big_stages=big_stages, rngs=rngs) if big else ResNet(depth, rngs=rngs)
    build_vit = vit_big.build_big if big else vit.build
    return build_vit(arch, rngs=rngs, dtype=dtype)


def load(encoder: nnx.Module, arch: str, path: str) -> None:
    """Pretrained weights from a local ``.safetensors`` (torchvision/timm names)."""
    if not Path(path).is_file():  # safetensors' own error would come with a traceback
        raise FileNotFoundError(f"--init {path}: no such file (a torchvision/timm .safetensors)")
    (load_torchvision if is_resnet(arch) else vit.load_timm)(encoder, path)


def normalization(arch: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per RGB channel on [0, 1] pixels: ImageNet's for ResNets, the model card's for ViTs."""
    _check(arch)
    return IMAGENET if is_resnet(arch) else vit.config_for(arch).normalization


def _resnet_forward(encoder, x):
    return ResNet.__call__(encoder, x, train=False)


def _vit_forward(encoder, x):
    return vit.ViT.__call__(encoder, x, train=False)


def eval_forward(arch: str):
    """(encoder, normalised tiles) -> eval-mode embeddings through the in-memory path (jittable)."""
    return _resnet_forward if is_resnet(arch) else _vit_forward
