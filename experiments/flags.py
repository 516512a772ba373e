"""The flags every experiment CLI shares, and how given flags override a preset.

Every flag defaults to None (not given): the one default of each setting lives in ``TrainConfig`` /
``OptimizerConfig``, and a preset states where a task departs from it. A flag that the chosen encoder
mode does not read (``--max_partition_bytes`` with ``--encoder=frozen``) is refused, not dropped.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from bigjax.errors import ArgumentParser, flag_value
from bigjax.train import modes
from bigjax.units import parse_bytes
from experiments.presets import Preset

__all__ = ["training_flags", "apply_flags"]

# flag -> TrainConfig field, OptimizerConfig field, Preset field
TRAIN_FIELDS = ("encoder", "aggregator", "arch", "compute_dtype", "big_stages", "max_partition_bytes",
                "host_dtype", "big_engine", "device_memory", "host_memory", "spill_dir", "init",
                "epochs", "batch_size", "tiles_per_bag", "augment", "seed", "eval_draws", "eval_tiles",
                "checkpoint_every", "modules", "local_alpha", "local_norm", "log_every", "devices",
                "sync_bn", "remat")
OPTIM_FIELDS = {"optimizer": "name", "lr": "lr", "weight_decay": "weight_decay",
                "schedule": "schedule", "accum": "accum"}
PRESET_FIELDS = ("tile_size",)


def training_flags(doc: str) -> argparse.ArgumentParser:
    """The flags of every experiment (model, optimiser, schedule, run control); all default None."""
    p = ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", help="tile store to use/create (default <workdir>/store)")
    p.add_argument("--workdir", help="run folder (default: the preset's, runs/<task>...)")
    p.add_argument("--encoder", choices=modes.names(), help="encoder mode (default big)")
    p.add_argument("--aggregator", help="MIL aggregator (default abmil)")
    p.add_argument("--arch", help="encoder architecture: resnet18 (default), resnet34, resnet50, "
                                  "a ViT by timm name (vit_base_patch16_224, uni, virchow2, ...)")
    p.add_argument("--compute_dtype", choices=["float32", "bfloat16"],
                   help="ViT matmul dtype: bfloat16 = mixed precision, float32 parameters")
    p.add_argument("--big_stages", type=_int_or_auto,
                   help="ResNet stages run as Big-Layers (big mode; 0-4, or auto: the fewest that fit "
                        "the device)")
    p.add_argument("--max_partition_bytes", type=_bytes_or_auto,
                   help="Big-Layers partition budget (big mode; bytes such as 256MiB, or auto)")
    p.add_argument("--host_dtype", choices=["float32", "bfloat16"],
                   help="big mode: dtype of the activations kept in host memory (bfloat16 halves "
                        "the bytes; kernels compute in float32)")
    p.add_argument("--big_engine", choices=["eager", "compiled"],
                   help="big mode: stream each partition from Python (eager, default) or run each "
                        "conv pass as one XLA program over the partitions (compiled)")
    p.add_argument("--device_memory", type=byte_size,
                   help="device memory auto may plan for (default: the device's limit; needed on a CPU)")
    host_memory_flags(p)
    p.add_argument("--modules", type=int, help="local mode: K gradient-isolated modules (1, 2, 4, 8)")
    p.add_argument("--local_alpha", type=float, help="local mode: weight of the RFR loss (default 1)")
    p.add_argument("--local_norm", choices=["batch", "group"],
                   help="local mode: the ResNet's BatchNorm, or GroupNorm(C, C) (Zhang's second variant)")
    p.add_argument("--init", help="torchvision/timm ResNet .safetensors (default: random init)")
    p.add_argument("--optimizer", choices=["adam", "adamw", "demon_adam"])
    p.add_argument("--lr", type=float)
    p.add_argument("--weight_decay", type=float)
    p.add_argument("--schedule", choices=["constant", "cosine", "exponential"])
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch_size", type=int)
    p.add_argument("--accum", type=int)
    p.add_argument("--tiles_per_bag", type=int)
    p.add_argument("--tile_size", type=int)
    p.add_argument("--augment", action=argparse.BooleanOptionalAction)
    p.add_argument("--seed", type=int, help="training seed: init, bag order, draws (default 0)")
    p.add_argument("--data_seed", type=int, default=0,
                   help="seed of the generated data set and of the default split (kept apart from "
                        "--seed so that seeds compare models on the same data)")
    p.add_argument("--eval_draws", type=int)
    p.add_argument("--eval_tiles", type=int)
    p.add_argument("--checkpoint_every", type=int, help="also checkpoint every N steps")
    p.add_argument("--resume", action="store_true", help="continue the run in --workdir")
    p.add_argument("--eval_only", action="store_true", help="restore the best checkpoint and evaluate")
    p.add_argument("--eval_manifest", help="with --eval_only: the test slides of another store's manifest")
    p.add_argument("--log_every", type=int, help="steps between training-loss rows of metrics.jsonl")
    p.add_argument("--devices", type=int, help="encoder mesh: each step's tiles over N devices "
                                                "(big, inmemory; CPU runs get N virtual devices)")
    p.add_argument("--sync_bn", action=argparse.BooleanOptionalAction,
                   help="with --devices: BatchNorm over all tiles (default) or per device")
    p.add_argument("--remat", choices=["none", "conv", "block"],
                   help="with --encoder=inmemory --devices=N: jax.checkpoint each conv + BatchNorm, "
                        "or the stem and each residual block (default none)")
    p.add_argument("--processes", type=int, default=1,
                   help="run as P processes on this machine (loopback), --devices (default P) split "
                        "among them")
    p.add_argument("--workers", type=int, default=2, help="processes generating/tiling slides")
    p.add_argument("--no_progress", action="store_true")
    return p


# ``268435456``, ``256MiB``, ``8GiB``, ``1.5GB`` -> bytes (``bigjax.units.parse_bytes``)
byte_size = flag_value(parse_bytes)


def _int_or_auto(text: str):
    if text == "auto" or text.isdigit():
        return text if text == "auto" else int(text)
    raise argparse.ArgumentTypeError(f"{text!r}: give a number of stages (0-4) or auto")


def _bytes_or_auto(text: str):
    return text if text == "auto" else byte_size(text)


def apply_flags(preset: Preset, args: argparse.Namespace) -> Preset:
    """The preset with every given flag applied (``--workdir`` alone also moves the store into it).

    ``--devices`` (with ``--processes``) takes effect here, before anything starts JAX's backend: a
    CPU run gets devices / processes virtual CPU devices per process, and a process started by
    ``--processes`` joins its run (``bigjax.parallel.distributed.initialize``).

    Raises:
      ValueError: a flag the chosen encoder mode does not read.
    """
    given = {k: v for k, v in vars(args).items() if v is not None}
    if "devices" in given or args.processes != 1:
        given["devices"] = _mesh_size(given.get("devices", args.processes), args.processes)
    train = preset.train
    optim = dataclasses.replace(train.optim, **{OPTIM_FIELDS[k]: given[k]
                                                for k in OPTIM_FIELDS if k in given})
    fields = {k: given[k] for k in TRAIN_FIELDS if k in given}
    if "workdir" in given:
        fields.update(workdir=given["workdir"], store=str(Path(given["workdir"]) / "store"))
    if "store" in given:
        fields["store"] = given["store"]
    train = dataclasses.replace(train, optim=optim, progress=not args.no_progress, **fields)
    _check_mode_settings(train.encoder, given)
    if "devices" in given:
        _use_devices(given["devices"] // args.processes)
    preset = dataclasses.replace(preset, train=train,
                                 **{k: given[k] for k in PRESET_FIELDS if k in given})
    check_before_data(preset)
    return preset


def check_before_data(preset: Preset) -> None:
    """What can be refused before any data is generated or tiled: a missing ``--init`` file, a
    ``--max_partition_bytes`` below one partition of the ResNet stem's conv at the preset's tiles."""
    from bigjax.layers.conv import check_budget
    from bigjax.layers.plan import ConvGeometry
    from bigjax.models import arch

    train = preset.train
    if train.init and not Path(train.init).is_file():
        raise ValueError(f"--init {train.init}: no such file (a torchvision/timm .safetensors)")
    budget = train.max_partition_bytes
    if train.encoder == "big" and isinstance(budget, int) and arch.is_resnet(train.arch):
        t = preset.tile_size
        check_budget((1, t, t, 3), (7, 7, 3, 64), ConvGeometry.make(7, 2, 3), budget)


def _mesh_size(n: int, processes: int) -> int:
    if n < 1 or processes < 1 or n % processes:
        raise ValueError(f"--devices={n} over --processes={processes}: both at least 1, and the "
                         f"devices an equal number per process")
    return n


def _use_devices(per_process: int) -> None:
    """This process's virtual CPU devices; a process started by ``--processes`` joins its run."""
    import jax

    from bigjax.parallel import distributed

    jax.config.update("jax_num_cpu_devices", per_process)
    distributed.initialize()  # the launcher's environment (bigjax.parallel.launch)


def _check_mode_settings(encoder: str, given: dict) -> None:
    if encoder not in modes.names():
        raise ValueError(f"--encoder={encoder}: choose one of {', '.join(modes.names())}")
    reads = modes.get_class(encoder, given.get("devices", 1)).settings
    unread = [k for k in modes.STREAMING_SETTINGS if k in given and k not in reads]
    if unread:
        raise ValueError(f"--{unread[0]} has no effect with --encoder={encoder}; it applies to "
                         f"the modes that stream through Big-Layers (--encoder=big)")
    if "remat" in given and "remat" not in reads:
        raise ValueError(f"--remat has no effect with --encoder={encoder} on "
                         f"{given.get('devices', 1)} device(s); it applies to --encoder=inmemory "
                         "with --devices above 1")
    unread = [k for k in modes.LOCAL_SETTINGS if k in given and k not in reads]
    if unread:
        raise ValueError(f"--{unread[0]} has no effect with --encoder={encoder}; it applies to "
                         f"locally supervised training (--encoder=local)")


# the streaming engine's host-RAM budget (issue 21): the values are checked by TrainConfig
# (bigjax.host_memory.parse_host_memory), so a bad one is one `error: --host_memory=...` line
def host_memory_flags(p: argparse.ArgumentParser) -> None:
    """``--host_memory`` and ``--spill_dir`` (every CLI that builds a Big-Layers execution)."""
    p.add_argument("--host_memory", help="big mode: host RAM the activations may use, e.g. 8GiB, "
                                         "20GB, or auto (a share of MemAvailable); beyond it they "
                                         "spill to --spill_dir (default: all in RAM)")
    p.add_argument("--spill_dir", help="with --host_memory: folder of the spill store (default "
                                       "<workdir>/spill)")
