"""Runtime benchmark: one training step of Big ResNet-18 vs its jitted in-memory twin, or a sweep.

    python -m experiments.benchmark --quick        # small inputs, about a minute on 2 CPU cores
    python -m experiments.benchmark                # the targets: 1x1024x1024 and 32x256x256
    python -m experiments.benchmark --shapes=1x4096x4096x3,1x8192x8192x3 --profile   # a GPU's floor
    python -m experiments.benchmark --quick --host_dtype=bfloat16   # half the bytes, its error
    python -m experiments.benchmark --engine=eager,compiled --profile   # both engines, one run
    python -m experiments.benchmark --shapes=1x2048x2048x3 --host_memory=1GiB --spill_dir=DIR

Per input: the Big step and its jitted twin (median seconds, ratio), the bytes each way, the achieved
GB/s, the floor (bytes / measured copy bandwidth), the orchestration share of a profiled step
(everything but kernels), and the device peak (GPU). ``--profile`` prints the breakdown. With
``--host_memory``: the spilled step's time, peak-RSS rise, disk bytes, achieved disk GB/s, the spill
store's probed write / read GB/s (best of three, through the page cache), the disk floor at those
speeds, the kernels' seconds and the step's ratio to max(kernels, floor).
    python -m experiments.benchmark --sweep --out=runs/sweep   # step time vs side, fits, plot
    python -m experiments.benchmark --sweep --gpu-scale        # sides 4,096 ... 32,768 (a GPU)
    python -m experiments.benchmark --sweep --quick            # sides 128 ... 256, 3 configs, 1 rep
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

import jax

from bigjax.bench.host_memory import benchmark_spilled
from bigjax.bench.report import write_sweep
from bigjax.bench.step import benchmark_step
from bigjax.bench.sweep import CONFIGS, SweepConfig, run_sweep
from bigjax.errors import ArgumentParser, run_cli
from bigjax.layers.execution import ENGINES
from experiments.flags import byte_size

FULL = [(1, 1024, 1024, 3), (32, 256, 256, 3)]
QUICK = [(1, 512, 512, 3), (8, 128, 128, 3)]


@dataclass
class Config:
    depth: int = 18
    shapes: tuple = tuple(FULL)
    budget: int = 32 * 2**20
    fused: bool = True
    reps: int = 3
    out: str | None = None
    profile: bool = False
    prefetch: int | None = 1
    host_dtype: str | None = None
    engines: tuple = ("eager",)
    host_memory: int | None = None  # spill beyond it (``Execution.host_memory``) into spill_dir
    spill_dir: str | None = None
    warmup: int = 1  # spilled: 0 = no warm-up step (the timed step then includes compilation)


def parse(argv=None) -> Config:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small inputs instead of the targets")
    p.add_argument("--shapes", type=_shapes,
                   help="NxHxWxC inputs instead, comma-separated (e.g. 1x4096x4096x3,1x8192x8192x3)")
    p.add_argument("--depth", type=int, default=18, choices=(18, 34, 50))
    p.add_argument("--max_partition_bytes", type=byte_size, default=Config.budget,
                   help="partition budget, bytes or 32MiB")
    p.add_argument("--separate", action="store_true", help="the paper's separate ops, not fused")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", help="also write the results as JSON lines to this file; with --sweep "
                                 "the folder for sweep.md/.json/.png (default runs/sweep)")
    p.add_argument("--sweep", action="store_true", help="time vs input side per configuration")
    p.add_argument("--sides", help="with --sweep: comma-separated sides (default 256,...,2048 in "
                                   "steps of sqrt(2); ResNet-50: 256,...,1024)")
    p.add_argument("--warmup", type=int, default=1,
                   help="with --sweep: untimed iterations per point (more while one still compiles); "
                        "with --host_memory: 0 skips the warm-up step, so the timed step includes "
                        "compilation (for sides whose steps take many minutes)")
    p.add_argument("--fewer-reps", dest="fewer_reps", type=_side_reps,
                   help="with --sweep: SIDE:REPS, sides above SIDE get REPS timed iterations")
    p.add_argument("--gpu-scale", dest="gpu_scale", action="store_true",
                   help="with --sweep: sides 4096,8192,16384,32768")
    p.add_argument("--configs", help=f"with --sweep: comma-separated subset of {','.join(CONFIGS)}")
    p.add_argument("--profile", action="store_true",
                   help="also print the breakdown of one Big-Layers step by category")
    p.add_argument("--prefetch", type=_prefetch, default=1,
                   help="partitions in flight beside the current one (default 1; none = unbounded)")
    p.add_argument("--host_dtype", choices=["bfloat16"],
                   help="keep the Big step's host activations in this dtype (half the bytes); "
                        "also prints its gradient error against float32")
    p.add_argument("--engine", type=_engines, default=("eager",),
                   help="eager, compiled, or both comma-separated (timed one after the other, each "
                        "against the jitted twin, per input)")
    p.add_argument("--host_memory", type=byte_size,
                   help="keep at most this many bytes of activations in RAM, spill the rest to "
                        "--spill_dir; prints step time, peak RSS, disk bytes and floor per shape")
    p.add_argument("--spill_dir", help="a local directory for the spill store (with --host_memory)")
    a = p.parse_args(argv)
    if (a.host_memory is None) != (a.spill_dir is None):
        p.error("--host_memory and --spill_dir go together")
    if a.sweep:
        return _sweep_config(a)
    shapes = a.shapes or (QUICK if a.quick else FULL)
    return Config(a.depth, tuple(shapes), a.max_partition_bytes,
                  not a.separate, a.reps, a.out, a.profile, a.prefetch, a.host_dtype, a.engine,
                  a.host_memory, a.spill_dir, a.warmup)


# --sweep --quick: a few minutes on 2 CPU cores; three sides (enough for a power-law fit) of the
# in-memory twin and the fewest and most big stages, one timed iteration each
QUICK_SIDES = (128, 181, 256)
QUICK_CONFIGS = ("inmemory", "big0", "big4")


def _sweep_config(a) -> tuple[SweepConfig, str]:
    if a.sides:
        sides = tuple(int(s) for s in a.sides.split(","))
    elif a.gpu_scale:
        sides = (4096, 8192, 16384, 32768)
    elif a.quick:
        sides = QUICK_SIDES
    else:
        sides = (256, 512, 724, 1024, 1448, 2048) if a.depth != 50 else (256, 362, 512, 724, 1024)
    configs = tuple(a.configs.split(",")) if a.configs else QUICK_CONFIGS if a.quick else CONFIGS
    reps = 1 if a.quick else a.reps
    cfg = SweepConfig(a.depth, sides, configs, a.max_partition_bytes, warmup=a.warmup, reps=reps,
                      fewer_reps=a.fewer_reps)
    return cfg, a.out or "runs/sweep"


def main(argv=None) -> None:
    cfg = parse(argv)
    if isinstance(cfg, tuple):
        sweep, out = cfg
        title = f"ResNet-{sweep.depth}, {jax.devices()[0].platform}"
        result = run_sweep(sweep, after_side=lambda part: write_sweep(part, out, title))
        print(write_sweep(result, out, title), end="")
        return
    if cfg.host_memory is not None:
        return _spilled(cfg)
    print(f"{'input':>14} {'engine':>8} {'budget':>11} {'parts':>5} {'big s':>7} {'jit s':>7} "
          f"{'ratio':>6} {'h2d MiB':>8} {'d2h MiB':>8} {'GB/s':>6} {'floor s':>7} {'orch.':>6} "
          f"{'peak MB':>8}")
    for shape in cfg.shapes:
        for engine in cfg.engines:
            t = benchmark_step(cfg.depth, shape, cfg.budget, fused=cfg.fused, reps=cfg.reps,
                               prefetch=cfg.prefetch, host_dtype=cfg.host_dtype, engine=engine)
            _report(t, cfg)


def _spilled(cfg: Config) -> None:
    """Per shape: a spilled step's time and peak RSS, its disk bytes against the disk floor."""
    print(f"{'input':>14} {'step s':>7} {'RSS GiB':>8} {'wrote GiB':>9} {'read GiB':>8} "
          f"{'disk peak':>9} {'disk GB/s':>9} {'probe w/r GB/s':>14} {'floor s':>7} {'kernel s':>8} "
          f"{'ratio':>6}")
    for shape in cfg.shapes:
        for engine in cfg.engines:
            t = benchmark_spilled(shape, cfg.host_memory, cfg.spill_dir, cfg.budget,
                                  cfg.host_dtype, engine, warmup=cfg.warmup > 0)
            print(f"{'x'.join(map(str, shape)):>14} {t.step_s:>7.1f} {t.peak_rss / 2**30:>8.2f} "
                  f"{t.written / 2**30:>9.2f} {t.read / 2**30:>8.2f} {t.disk_peak / 2**30:>9.2f} "
                  f"{t.disk_s / 1e9:>9.2f} {f'{t.disk_write / 1e9:.2f} / {t.disk_read / 1e9:.2f}':>14} "
                  f"{t.floor_s:>7.2f} {t.kernel_s:>8.1f} {t.ratio:>6.2f}", flush=True)
            if cfg.out:
                with open(cfg.out, "a") as f:
                    f.write(json.dumps({**asdict(t), "floor_s": t.floor_s, "ratio": t.ratio}) + "\n")


def _report(t, cfg: Config) -> None:
    """One input's line (and, as asked, its precision, profile and JSON record)."""
    m = {k: v / 2**20 for k, v in t.traffic.items() if k.endswith(("h2d", "d2h"))}
    print(f"{'x'.join(map(str, t.shape)):>14} {t.engine:>8} {t.budget:>11,} {t.conv_partitions:>5} "
          f"{t.big_s:>7.3f} {t.plain_s:>7.3f} {t.ratio:>6.2f} {m['fwd_h2d'] + m['bwd_h2d']:>8.0f} "
          f"{m['fwd_d2h'] + m['bwd_d2h']:>8.0f} {t.moved_bytes / t.big_s / 1e9:>6.2f} "
          f"{t.floor_s:>7.3f} {t.orchestration_share:>6.0%} {_mb(t.big_peak_bytes):>8}",
          flush=True)
    if t.precision:
        print(f"    {t.host_dtype} host activations: gradient error "
              f"{t.precision['grad_error']:.2%} (relative L2 vs float32 storage); rounding "
              f"only the input: {t.precision['input_rounding_error']:.2%}", flush=True)
    if cfg.profile:
        for category, seconds in sorted(t.profile.items(), key=lambda kv: -kv[1]):
            print(f"    {category:<36} {seconds:8.3f} s")
    if cfg.out:
        with open(cfg.out, "a") as f:
            f.write(json.dumps(t.as_dict()) + "\n")


def _engines(text: str) -> tuple[str, ...]:
    engines = tuple(text.split(","))
    if not engines or any(e not in ENGINES for e in engines):
        raise argparse.ArgumentTypeError(f"{text!r}: give {' or '.join(ENGINES)}, or both with a comma")
    return engines


def _shapes(text: str) -> list[tuple[int, ...]]:
    try:
        shapes = [tuple(int(n) for n in s.split("x")) for s in text.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 4 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"{text!r}: give NxHxWxC shapes such as 1x1024x1024x3")
    return shapes


def _side_reps(text: str) -> tuple[int, int]:
    try:
        side, reps = (int(n) for n in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give SIDE:REPS such as 1024:2") from None
    return side, reps


def _prefetch(text: str) -> int | None:
    return None if text == "none" else int(text)


def _mb(n) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


if __name__ == "__main__":
    sys.exit(run_cli(main))
