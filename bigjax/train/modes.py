"""Encoder modes: how a run trains (or leaves frozen) its tile encoder — one object per mode.

A mode owns everything that differs between them: building the encoder, what the optimiser updates, a
batch of bags -> the step's inputs, the step, and eval-mode embeddings. The training loop only asks its
mode; no other code compares mode names. Modes are looked up by name (``TrainConfig.encoder``) in a
registry that code outside the package extends with ``@register("name")``.

- ``big``: ``BigResNet`` trained end to end; its forward/backward run eagerly (Big-Layers) with the
  run's ``Execution`` (devices, partition budget), the aggregator and loss on the compute device.
- ``inmemory``: the plain ``ResNet`` trained end to end, the whole step jitted (for what fits).
- ``frozen``: the encoder's eval-mode forward on the fly (augmented tiles), only the aggregator trained.
- ``precomputed``: eval-mode embeddings of every tile computed once into a ``FeatureCache``; only the
  aggregator trained, on cached rows.
- ``local`` (``bigjax.local.mode``): K gradient-isolated modules with their own losses (Zhang et al.).

With ``config.devices > 1`` a mode that trains the encoder runs each step over an encoder mesh of that
many devices (Campanella et al.): the lookup returns the class registered for it with
``@register_mesh(name)`` (``bigjax.parallel.mode``: ``big``, ``inmemory``). The modes defined in other
packages are imported (so registered) on the first lookup.
"""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import ClassVar

import jax
import numpy as np
from flax import nnx

from bigjax.data.augment import augment_bag
from bigjax.data.bags import Bag
from bigjax.host_memory import spill_options
from bigjax.layers.execution import Execution
from bigjax.data.tiling import stored_tiling
from bigjax.models import arch, resnet_fit
from bigjax.train import features, steps

log = logging.getLogger(__name__)

__all__ = ["EncoderMode", "register", "register_mesh", "names", "get", "get_class",
           "STREAMING_SETTINGS", "LOCAL_SETTINGS"]

_MODES: dict[str, type["EncoderMode"]] = {}
_MESH_MODES: dict[str, type["EncoderMode"]] = {}  # name -> the mode run over an encoder mesh
_ELSEWHERE = ("bigjax.parallel.mode", "bigjax.local.mode")  # modules that register more modes
# config fields only the modes that stream through Big-Layers read
STREAMING_SETTINGS = ("big_stages", "max_partition_bytes", "host_dtype", "big_engine",
                      "device_memory", "host_memory", "spill_dir")
# config fields only the locally supervised mode reads (``bigjax.local.mode``)
LOCAL_SETTINGS = ("modules", "local_alpha", "local_norm")


def register(name: str):
    """Class decorator: make an ``EncoderMode`` subclass available as ``--encoder=name``."""
    return _registrar(_MODES, name)


def register_mesh(name: str):
    """Class decorator: the class that runs mode ``name`` over an encoder mesh (``--devices`` > 1)."""
    return _registrar(_MESH_MODES, name)


def _registrar(table: dict, name: str):
    def add(cls):
        cls.name = name
        table[name] = cls
        return cls
    return add


def _register_elsewhere() -> None:
    for module in _ELSEWHERE:
        importlib.import_module(module)


def names() -> tuple[str, ...]:
    """The registered mode names (the package's own first)."""
    _register_elsewhere()
    return tuple(_MODES)


def get_class(name: str, devices: int = 1) -> type["EncoderMode"]:
    """The mode registered as ``name``; over an encoder mesh when ``devices`` > 1."""
    if name not in names():
        raise ValueError(f"encoder mode {name!r}: choose one of {', '.join(_MODES)}")
    if devices == 1:
        return _MODES[name]
    if name not in _MESH_MODES:
        raise ValueError(f"--devices={devices} with --encoder={name}: only the modes that train the "
                         f"encoder run over an encoder mesh ({', '.join(_MESH_MODES)}); {name} runs on "
                         f"one device (--devices=1)")
    return _MESH_MODES[name]


def get(config, workdir: Path) -> "EncoderMode":
    """The mode object of a run (``config.encoder``, ``config.devices``), for its working folder."""
    return get_class(config.encoder, config.devices)(config, workdir)


class EncoderMode:
    """What one way of training the encoder does; subclasses override what differs.

    Attributes:
      name: the registered name (set by ``register``).
      trains_encoder: whether the encoder's parameters are updated.
      augments: whether training tiles are augmented (a mode that caches embeddings cannot).
      settings: which of ``STREAMING_SETTINGS`` and ``LOCAL_SETTINGS`` the mode reads (a flag given
        for another is an error).
    The encoder architecture (``config.arch``: a ResNet or a ViT) gives the model, its weights loader,
    the input normalisation and the eval-mode forward (``bigjax.models.arch``).
    """

    name: ClassVar[str] = ""
    trains_encoder: ClassVar[bool] = True
    augments: ClassVar[bool] = True
    settings: ClassVar[tuple[str, ...]] = ()
    streams: ClassVar[bool] = False  # the encoder is built to stream through Big-Layers

    def __init__(self, config, workdir: Path):
        self.config, self.workdir = config, Path(workdir)
        self.mean, self.std = arch.normalization(config.arch)
        self.big_stages = config.big_stages

    @property
    def eval_forward(self):
        """(encoder, normalised tiles) -> eval-mode embeddings: a module-level jittable function."""
        return arch.eval_forward(self.config.arch)

    def build_encoder(self, rngs: nnx.Rngs) -> nnx.Module:
        """The encoder (an NNX module with ``embed_dim``), from ``config.init`` or a random init."""
        c = self.config
        encoder = arch.build(c.arch, big=self.streams, big_stages=self.big_stages, rngs=rngs,
                             dtype=c.compute_dtype)
        if c.init:
            arch.load(encoder, c.arch, c.init)
            log.info("encoder %s initialised from %s", c.arch, c.init)
        else:
            log.warning("encoder %s has random initial weights (no --init); the paper starts "
                        "from pretrained weights", c.arch)
        return encoder

    def trainable(self):
        """The NNX filter of what the optimiser updates."""
        return nnx.Param if self.trains_encoder else steps.HEAD_ONLY

    def prepare(self, model: steps.MILClassifier, store, slides) -> None:
        """Work before the first step or evaluation (e.g. fill a cache); nothing by default."""

    def inputs(self, model: steps.MILClassifier, batch: list[Bag]):
        """A batch of bags -> the step's inputs: normalised tiles (B, K, T, T, 3) on the device."""
        return features.normalize(augmented_tiles(batch), self.mean, self.std)

    def step(self, model, optimizer, inputs, labels) -> jax.Array:
        """One gradient and optimiser update; returns the batch loss."""
        return steps.jitted_step(model, optimizer, inputs, labels, encode=self.trains_encoder)

    def embed(self, model: steps.MILClassifier, store, row, indices: np.ndarray) -> jax.Array:
        """Eval-mode embeddings (len(indices), D) of tiles of one slide (manifest row)."""
        parts = [self.embed_tiles(model, store.read(row.slide_id, indices[i:i + 1024]))
                 for i in range(0, len(indices), 1024)]
        return jax.numpy.concatenate(parts) if len(parts) > 1 else parts[0]

    def embed_tiles(self, model: steps.MILClassifier, tiles: np.ndarray) -> jax.Array:
        """Eval-mode embeddings of uint8 tiles, in jitted chunks of ``config.embed_chunk``."""
        return features.embed_tiles(self.eval_forward, model.encoder, tiles,
                                    (self.mean, self.std),
                                    min(self.config.embed_chunk, max(len(tiles), 1)))


def augmented_tiles(batch: list[Bag]) -> np.ndarray:
    """uint8 (B, K, T, T, 3): each bag with its slide's augmentation draw, computed on the host CPU."""
    cpu = jax.local_devices(backend="cpu")[0]  # this process's (a multi-process run)
    return np.stack([bag.tiles if bag.aug is None else
                     np.asarray(augment_bag(jax.device_put(bag.tiles, cpu), bag.aug)) for bag in batch])


@register("big")
class Big(EncoderMode):
    """The Big ResNet trained end to end: eager gradients through Big-Layers, jitted update.

    With ``big_stages``/``max_partition_bytes`` "auto" the mode first predicts what fits the device
    (``resnet_fit.choose_big_stages``, logged); when the whole step fits it trains in memory, jitted.
    """

    settings = STREAMING_SETTINGS
    streams = True

    def __init__(self, config, workdir: Path):
        super().__init__(config, workdir)
        budget = config.max_partition_bytes
        if config.auto_fit:
            fit = _fit_device(config)
            self.big_stages, budget, self.streams = fit.big_stages, fit.budget, fit.big_stages is not None
        narrow = None if config.host_dtype == "float32" else config.host_dtype
        spill = spill_options(config.host_memory, config.spill_dir, workdir)
        self.execution = (Execution(budget, host_dtype=narrow, engine=config.big_engine, **spill)
                          if self.streams else None)

    def inputs(self, model, batch: list[Bag]):
        """Normalised tiles in host memory (numpy): the Big-Layers stream them to the device."""
        if not self.streams:
            return super().inputs(model, batch)
        return features.normalize_host(augmented_tiles(batch), self.mean, self.std)

    def step(self, model, optimizer, inputs, labels) -> jax.Array:
        if not self.streams:
            return super().step(model, optimizer, inputs, labels)
        return steps.eager_step(model, optimizer, self._loss, inputs, labels)

    def _loss(self, model, inputs, labels):
        encode = lambda x: model.encoder(x, train=True, execution=self.execution)  # noqa: E731
        return steps.batch_loss(model, steps.bag_features(encode, inputs), labels)


def _fit_device(config) -> "resnet_fit.Fit":
    """Big stages and budget for a step of ``batch_size`` x ``tiles_per_bag`` tiles of the store."""
    tiling = stored_tiling(config.store)
    if tiling is None:
        raise ValueError(f"--big_stages/--max_partition_bytes=auto: store {config.store} has no "
                         "tiles yet, so the step's input size is unknown")
    t = tiling["tile_size"]
    shape = (config.batch_size * config.tiles_per_bag, t, t, 3)
    device = jax.devices()[0]
    limit = config.device_memory or resnet_fit.device_limit(device)
    if limit is None:
        raise ValueError(f"--big_stages/--max_partition_bytes=auto: the {device.platform} device "
                         "reports no memory limit; give --device_memory (e.g. --device_memory=8GiB)")
    fixed = {}  # what was given as a number is kept
    if config.big_stages != "auto":
        fixed["big_stages"] = config.big_stages
    if config.max_partition_bytes != "auto":
        fixed["budget"] = config.max_partition_bytes
    fit = resnet_fit.choose_big_stages(arch.build(config.arch, big=False, rngs=nnx.Rngs(0)),
                                       shape, limit, **fixed)
    log.info("auto fit for %s steps of %s tiles: %s", config.arch, "x".join(map(str, shape)),
             fit.reason)
    return fit


@register("inmemory")
class InMemory(EncoderMode):
    """The plain ResNet trained end to end; the whole step is one jitted function."""


@register("frozen")
class Frozen(EncoderMode):
    """The encoder's eval-mode forward on augmented tiles each step; only the aggregator trains."""

    trains_encoder = False

    def inputs(self, model, batch: list[Bag]):
        return steps.bag_features(lambda tiles: self.embed_tiles(model, tiles), augmented_tiles(batch))


@register("precomputed")
class Precomputed(EncoderMode):
    """Eval-mode embeddings of every tile computed once (``<workdir>/features``); aggregator only."""

    trains_encoder = False
    augments = False

    def __init__(self, config, workdir: Path):
        super().__init__(config, workdir)
        self.cache = features.FeatureCache(self.workdir / "features")

    def prepare(self, model, store, slides) -> None:
        self.cache.fill(lambda tiles: self.embed_tiles(model, tiles), store, slides,
                        progress=self.config.progress)

    def inputs(self, model, batch: list[Bag]):
        return np.stack([self.cache.features(b.slide_id, b.indices) for b in batch])

    def embed(self, model, store, row, indices: np.ndarray):
        return self.cache.features(row.slide_id, indices)
