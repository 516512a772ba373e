"""The configuration of one training run (what the experiment CLIs fill from their presets and flags).

Each setting has its one default here (the paper's PANDA setting; the optimiser's in
``bigjax.train.optim.OptimizerConfig``); presets state only where they depart from it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from bigjax.host_memory import parse_host_memory, spill_options
from bigjax.layers.execution import DEFAULT_PARTITION_BYTES, ENGINES
from bigjax.train.optim import OptimizerConfig

TASKS = {"panda": 6, "camelyon": 2}  # task -> number of classes
AUTO = "auto"  # big_stages / max_partition_bytes chosen to fit the device
SELECT_METRIC = {"panda": "qwk", "camelyon": "auc"}  # validation metric that picks the best checkpoint

# the paper's PANDA optimiser: Adam, lr 1e-4 with L2 1e-4, cosine, batch 2 x accumulation 16
PAPER_OPTIMIZER = OptimizerConfig(weight_decay=1e-4, schedule="cosine", accum=16)


# what ``--resume`` may change (``bigjax.train.recovery``): a lower learning rate, more epochs, and
# settings that change neither the bags nor the steps (where the run lives, logging, the final test
# protocol); every other setting defines the run's data and steps
RECOVERIES = {"optim.lr": "lower", "epochs": "more"}
FREE_ON_RESUME = ("workdir", "progress", "log_every", "checkpoint_every", "embed_chunk", "eval_draws",
                  "eval_tiles", "host_memory", "spill_dir")  # the last two: where, not what


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs; defaults are the paper's PANDA setting.

    Attributes:
      workdir: checkpoints, metrics.jsonl, curves.png, results.md, features/ (precomputed) go here.
      store: tile store folder (``bigjax.data.tiling.tile_dataset`` output).
      manifest: the store's manifest CSV (default ``<store>/manifest.csv``); its split column picks
        train / val / test slides.
      task: "panda" (6 ISUP grades; QWK, accuracy) or "camelyon" (binary; accuracy, AUC).
      encoder: an encoder mode name (``bigjax.train.modes.names()``: big, inmemory, frozen, ...).
      aggregator: a name of ``bigjax.models.mil.AGGREGATORS`` (the ``BINARY_ONLY`` ones for camelyon only).
      arch: the encoder architecture (``bigjax.models.arch.names()``: resnet18|34|50, ViTs by timm
        name such as vit_base_patch16_224, pathology foundation models such as uni).
      compute_dtype: the ViT encoder's matmul dtype: "bfloat16" is mixed precision as torch AMP
        (parameters, optimiser state, residual stream, LayerNorms and softmax stay float32).
      big_stages, max_partition_bytes: what runs as Big-Layers and their partition budget (modes that
        stream only); "auto": the fewest big stages and the largest budget predicted to fit the
        device (``bigjax.models.resnet_fit``; ResNets).
      host_dtype: the dtype Big-Layers keep big activations and their gradients in between ops
        (big mode, ResNets): "bfloat16" halves their host RAM and the bytes across the bus; kernels,
        parameters and optimiser state stay float32 (``Execution.host_dtype``).
      big_engine: how Big-Layers convolutions run (big mode, ResNets): "eager" streams each partition
        from Python, "compiled" runs each conv pass as one XLA program looping over the same
        partitions (``Execution.engine``); the same results to float round-off.
      device_memory: bytes of device memory ``auto`` may plan for (default: the device's own limit;
        a CPU has none, so there it must be given).
      host_memory: bytes of host RAM the streaming engine may keep activations in, beyond which they
        spill to disk (``Execution.host_memory``), or "auto" (``bigjax.host_memory.AUTO_SHARE`` of
        MemAvailable when the run starts); None = every activation in RAM.
      spill_dir: where activations beyond ``host_memory`` are stored (default ``<workdir>/spill``).
      modules, local_alpha: the local mode's K gradient-isolated modules (dividing 8) and the weight
        of its Random Feature Reconstruction loss (Zhang et al.; ``--encoder=local`` only).
      local_norm: the local mode's ResNet norm: "batch" (BatchNorm) or "group" (GroupNorm(C, C),
        Zhang et al.'s second variant; ``bigjax.local.group_norm``).
      init: torchvision/timm ResNet safetensors file; None = random init (a warning says so).
      optim: the optimiser, its schedule and gradient accumulation (``OptimizerConfig``).
      epochs: passes over the training slides (one bag per slide per epoch).
      batch_size: bags whose mean loss makes one gradient (the encoder sees their tiles together).
      tiles_per_bag: K tiles drawn per training bag.
      augment: one random augmentation draw per slide and epoch, applied to all its tiles.
      seed: parameters, data order, tile draws and augmentation are functions of it.
      val_draws, val_tiles: validation each epoch = mean over val_draws random bags of val_tiles
        tiles per slide (0 tiles = all tiles).
      eval_draws, eval_tiles: the final test protocol's R repeated random K-tile draws (besides
        all tiles).
      embed_chunk: tiles per jitted eval-mode encoder call.
      checkpoint_every: also save the latest checkpoint every this many steps (0 = epoch ends only).
      log_every: steps between metrics.jsonl rows of the training loss.
      progress: tqdm progress bars.
      devices: encoder-mesh size: each step's tiles over this many devices (all processes' devices
        together; ``bigjax.parallel.mode``), for the modes that train the encoder; 1 = one device.
      sync_bn: with devices > 1, BatchNorm statistics over all the step's tiles (equal to one
        device) or per device (Campanella et al.'s practice).
      remat: with devices > 1 and the in-memory encoder, ``jax.checkpoint`` in each shard's ResNet:
        "none", "conv" (each conv + BatchNorm) or "block" (the stem and each residual block).
    """

    workdir: str
    store: str
    manifest: str | None = None
    task: str = "panda"
    encoder: str = "big"
    aggregator: str = "abmil"
    arch: str = "resnet18"
    compute_dtype: str = "float32"
    big_stages: int | str = 4
    max_partition_bytes: int | str = DEFAULT_PARTITION_BYTES
    host_dtype: str = "float32"
    big_engine: str = "eager"
    device_memory: int | None = None
    host_memory: int | str | None = None
    spill_dir: str | None = None
    modules: int = 4
    local_alpha: float = 1.0
    local_norm: str = "batch"
    init: str | None = None
    optim: OptimizerConfig = PAPER_OPTIMIZER
    epochs: int = 20
    batch_size: int = 2
    tiles_per_bag: int = 256
    augment: bool = True
    seed: int = 0
    val_draws: int = 1
    val_tiles: int = 0
    eval_draws: int = 100
    eval_tiles: int = 256
    embed_chunk: int = 64
    checkpoint_every: int = 0
    log_every: int = 10
    progress: bool = True
    devices: int = 1
    sync_bn: bool = True
    remat: str = "none"

    @property
    def auto_fit(self) -> bool:
        """Whether big stages or budget are chosen to fit the device (``auto``)."""
        return AUTO in (self.big_stages, self.max_partition_bytes)

    def __post_init__(self):
        """Refuse a bad setting before any work, naming it (the CLIs' flags have the same names)."""
        from bigjax.models import arch
        from bigjax.models.mil import AGGREGATORS, BINARY_ONLY
        from bigjax.parallel.encoder import REMAT

        _choose("remat", self.remat, REMAT)
        _choose("task", self.task, TASKS)
        _choose("aggregator", self.aggregator, AGGREGATORS)
        if self.aggregator in BINARY_ONLY and self.n_classes != 2:
            raise ValueError(f"--aggregator={self.aggregator}: a one-class (sigmoid) head for binary "
                             f"tasks, not --task={self.task} ({self.n_classes} classes)")
        _choose("arch", self.arch, arch.names())
        _choose("compute_dtype", self.compute_dtype, arch.DTYPES)
        if self.compute_dtype != "float32" and arch.is_resnet(self.arch):
            raise ValueError(f"--compute_dtype={self.compute_dtype}: only ViT encoders have a "
                             f"bfloat16 path, not --arch={self.arch}")
        _choose("host_dtype", self.host_dtype, ("float32", "bfloat16"))
        if self.host_dtype != "float32" and not arch.is_resnet(self.arch):
            raise ValueError(f"--host_dtype={self.host_dtype}: narrow host activations are for the "
                             f"Big ResNets, not --arch={self.arch}")
        _choose("big_engine", self.big_engine, ENGINES)
        if self.big_engine != "eager" and not arch.is_resnet(self.arch):
            raise ValueError(f"--big_engine={self.big_engine}: the compiled engine runs the Big "
                             f"ResNets' convolutions, not --arch={self.arch}")
        for name in ("epochs", "batch_size", "tiles_per_bag", "val_draws", "embed_chunk",
                     "log_every", "devices"):
            _at_least(name, getattr(self, name), 1)
        for name in ("seed", "val_tiles", "eval_draws", "eval_tiles", "checkpoint_every"):
            _at_least(name, getattr(self, name), 0)
        if self.max_partition_bytes != AUTO:
            _at_least("max_partition_bytes", self.max_partition_bytes, 1)
        if self.device_memory is not None:
            _at_least("device_memory", self.device_memory, 1)
        object.__setattr__(self, "host_memory", parse_host_memory(self.host_memory))
        spill_options(self.host_memory, self.spill_dir, self.workdir)  # spill_dir alone is refused
        if self.big_engine != "eager" and self.host_memory is not None:
            raise ValueError(f"--big_engine={self.big_engine} with --host_memory: a compiled pass "
                             "reads its activations whole, which a host budget cannot hold; "
                             "--big_engine=eager reads spilled ones band by band")
        if self.big_stages != AUTO and (not isinstance(self.big_stages, int)
                                        or not 0 <= self.big_stages <= 4):
            raise ValueError(f"--big_stages={self.big_stages}: must be in 0..4 or auto")
        if self.auto_fit and not arch.is_resnet(self.arch):
            raise ValueError(f"--big_stages/--max_partition_bytes=auto: planned for ResNets only, "
                             f"not --arch={self.arch}")
        if self.modules not in (1, 2, 4, 8):
            raise ValueError(f"--modules={self.modules}: must divide the 8 pieces (1, 2, 4 or 8)")
        if not self.local_alpha >= 0:
            raise ValueError(f"--local_alpha={self.local_alpha}: must be >= 0")
        if self.local_norm not in ("batch", "group"):
            raise ValueError(f"--local_norm={self.local_norm}: choose batch or group")

    @property
    def n_classes(self) -> int:
        return TASKS[self.task]

    @property
    def select_metric(self) -> str:
        return SELECT_METRIC[self.task]

    @property
    def manifest_path(self) -> Path:
        return Path(self.manifest) if self.manifest else Path(self.store) / "manifest.csv"

    def to_json(self, resumes: list | None = None) -> str:
        """The settings as JSON; with ``resumes``, also the recoveries of the run's resumes."""
        fields = dataclasses.asdict(self)
        return json.dumps({**fields, "resumes": resumes} if resumes else fields, indent=1)

    @classmethod
    def from_json(cls, text: str, **overrides) -> "TrainConfig":
        fields = json.loads(text)
        fields.pop("resumes", None)  # the history of the run's resumes, not a setting
        fields["optim"] = OptimizerConfig(**fields.get("optim", {}))
        return cls(**{**fields, **overrides})


def _choose(name, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"--{name}={value}: choose one of {', '.join(map(str, choices))}")


def _at_least(name, value, low) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"--{name}={value}: must be an integer >= {low}")


def flat_settings(fields: dict) -> dict:
    """Nested config dicts as one level: optim.lr, optim.accum, ..."""
    out = {}
    for k, v in fields.items():
        out.update({f"{k}.{kk}": vv for kk, vv in v.items()} if isinstance(v, dict) else {k: v})
    return out
