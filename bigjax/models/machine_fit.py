"""What a machine can train: host RAM, disk bytes and step time of one all-big ResNet training step.

``resnet_fit`` asks what fits the *device*; this asks what fits the *machine* once every stage is big
and the activations live in host RAM (or, beyond ``--host_memory``, on disk). From the architecture's
layer shapes at the requested side (the jaxpr of the ResNet's forward, so the same layer list the Big
model streams, nothing run) it counts

* ``activation_bytes``: the activations stored once, the input plus every conv's output, in the host
  dtype (the issue's yardstick, and what a spill store has to hold);
* ``forward_flops``: 2 × multiply-adds of every conv (the taps inside the input: zero padding is
  not counted, as XLA's cost analysis does not); ``train_flops`` = forward + weight gradient + input
  gradient of every conv (the first conv's input, the image, gets none), i.e. about 3 × forward;
* ``bus_bytes``: what the fused engine moves between host memory and the compute device per step:
  forward, each conv's input and output; backward, its input and output cotangent in, its input
  cotangent out (3 × inputs + 2 × outputs).

and predicts, for a ``Machine`` (device memory, host RAM, disk read/write bandwidth, bus bandwidth,
kernel throughput in FLOP/s and the host's bandwidth for memory-bound passes, both measured by
``bench.machine``):

* in RAM: host RAM = ``copies`` × activation bytes + the process (``PROCESS_BYTES``), where ``copies``
  is the engine's measured ratio of its step's peak-RSS rise to the activations stored once;
* with a host budget H: the residuals the engine keeps (``RESIDUALS`` × activation bytes: the conv
  outputs and the block outputs) beyond H, less the room H keeps for ``spill.IN_FLIGHT`` activations
  as large as the largest (``Footprint.largest_bytes``), are written once in the forward and read
  ``READS`` times in the backward; host RAM used = H, or the ``IN_FLIGHT`` activations as large as
  the largest where that is more (what a step spilling every residual holds: 3.5x the largest with
  the partitions and parameter gradients, measured at 4096²; docs/benchmarks.md, twelfth session),
  + the partitions in flight (two of the run's ``--max_partition_bytes``). Both add the process, and the
  image where the run holds it whole in RAM (``Machine.input_in_ram``, float32; a run that reads its
  slide in bands holds none of it). A budget or a narrow ``host_dtype`` streams the stem
  (``Execution.stream_stem``): its conv output is neither kept nor held, and its conv runs
  ``STEM_PASSES`` more times;
* host time: the engine's memory-bound work on the host (the host ops: folded BatchNorm, ReLU, add,
  pooling, forward and backward; band slicing and joining; the copies between memory spaces) moves
  ``HOST_PASSES`` × the activations stored once through host memory;
* step time = max(kernel time, bus time, disk floor, host time): they overlap at best (the engine
  prefetches bands and spills asynchronously), so the slowest is a lower bound and the prediction.
  Where the host is the compute device (a CPU, no bus), kernels and host passes share its cores and
  their times add.

``bench.machine.measure_step`` runs one all-big step and reads its peak-RSS rise (VmHWM) and time: the
check of the predictions on this machine (docs/benchmarks.md, "What a machine can train").
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass, replace

from bigjax.bench.machine import measure_host_bandwidth, measure_step, measure_throughput
from bigjax.errors import ArgumentParser, flag_value
from bigjax.layers.spill import IN_FLIGHT
from bigjax.models.conv_shapes import ARCHS, conv_shapes
from bigjax.units import parse_bytes, parse_rate

__all__ = ["Footprint", "Machine", "Prediction", "footprint", "predict", "largest_side",
           "largest_spilled_side", "SERVER", "THIS_MACHINE", "ANCHOR_SIDES"]

HOST_DTYPES = {"float32": 4, "bfloat16": 2}
# the engine's peak-RSS rise over the activations stored once, residuals freed as the backward goes
# (``spill.Kept``): 1.66 at 1024², 1.39 at 2048² (ResNet-18, float32, `python -m bigjax.bench.host_memory
# --sides S --mmap_threshold`, branch onecopy at 20ac146, docs/benchmarks.md); it falls with the side
# (the fixed working set around one layer weighs less), so the smallest measured side's is the one to
# plan with (before: 3.9, main at 6381d35, issue 21)
COPIES = 1.7
# a spilled step (``host_memory`` below its residuals), the stem streamed: residual bytes over the
# activations stored once less the stem's conv output, and bytes read per byte written; measured 1.52
# and 2.01 at 8192² in float32 (commit ba41870), 1.52 and 2.13 at 16,384² in bfloat16 (b996076), 8 GiB
# kept: `python -m experiments.benchmark --shapes=1xSxSx3 --host_memory=8GiB --spill_dir=D`
# (docs/benchmarks.md; before the streamed stem: 1.36 and 2.03 of all the activations at 8192²)
RESIDUALS = 1.52
READS = 2.07
# the host's memory-bound bytes per byte of activations stored once, per step: fitted at 2048² on this
# quiet machine, (9.94 s measured - 6.41 s of conv FLOPs at 137.7 GFLOP/s) x 8.2 GB/s / 840 MiB
# (`python -m bigjax.models.machine_fit --measure --check 1024,2048`, docs/benchmarks.md, "What a
# machine can train"); it holds to 4096² (1.04x); the page faults of a host budget's 1 MiB mmap
# threshold (``layers.pages``) are not in it
HOST_PASSES = 33.0
STEM_PASSES = 4  # the streamed stem's extra conv passes: 2 recomputations, 1 forward, 1 kernel gradient
PROCESS_BYTES = 1 * 2**30  # Python, JAX, the compiled kernels, parameters: the process before a step
PARTITIONS_IN_FLIGHT = 2  # Execution(prefetch=1): the band being computed and the next one
ANCHOR_SIDES = (16_384, 65_536, 75_000)  # StreamingCNN/prostate; StreamingCLAM; HMS2


@dataclass(frozen=True)
class Machine:
    """A machine as the predictor sees it (bytes, bytes per second, FLOP/s)."""

    name: str
    device_memory: int
    host_memory: int
    disk_read: float
    disk_write: float
    kernel_throughput: float
    bus: float | None = None  # host <-> device; None: the host is the compute device (no bus)
    host_bandwidth: float | None = None  # bytes/s of host memory-bound passes; None: not counted
    activation_budget: int | None = None  # --host_memory of the run; None: all RAM the step may take
    partition_bytes: int | None = None  # --max_partition_bytes of the run; None: ``partition_budget``'s
    input_in_ram: bool = False  # the run holds its image whole in RAM (float32), not read from a slide

    @property
    def partition_budget(self) -> int:
        """The run's partition budget; by default an eighth of the device (``resnet_fit``'s headroom),
        at most 1 GiB."""
        if self.partition_bytes is not None:
            return self.partition_bytes
        return min(self.device_memory // 8, 2**30)

    @property
    def free_memory(self) -> int:
        """The host RAM the process and the partitions in flight leave for activations."""
        return self.host_memory - PROCESS_BYTES - PARTITIONS_IN_FLIGHT * self.partition_budget

    @property
    def host_budget(self) -> int:
        """Host bytes for activations: the run's budget, else the RAM the process and bands leave."""
        return self.free_memory if self.activation_budget is None else self.activation_budget


# a typical GPU server: 80 GB device (H100), 512 GB RAM, NVMe ~6 GB/s read / 3 GB/s write, PCIe 5 x16
# ~25 GB/s achieved; kernel throughput: a float32 (TF32) conv step at ~100 TFLOP/s, and host passes
# at 40 GB/s (XLA:CPU on a few dozen cores of DDR5), assumptions until measured there (``--measure``)
SERVER = Machine("GPU server", 80 * 10**9, 512 * 10**9, 6e9, 3e9, 100e12, bus=25e9, host_bandwidth=40e9)
# this 2-core machine: 24 GB RAM, disk 1.9 GB/s read / 1.4 GB/s write (dd, direct I/O), CPU kernels
# at 137.7 GFLOP/s and host passes at 8.2 GB/s (``--measure`` on the quiet AMD EPYC, 2026-12-05, in CPU
# time over the 2 cores); the run is the benchmark: ``python -m experiments.benchmark
# --host_memory=8GiB --max_partition_bytes=64MiB``, its image whole in RAM
THIS_MACHINE = Machine("this machine (2-core CPU)", 24 * 10**9, 24 * 10**9, 1.9e9, 1.4e9, 137.7e9,
                       host_bandwidth=8.2e9, activation_budget=8 * 2**30,
                       partition_bytes=64 * 2**20, input_in_ram=True)


@dataclass(frozen=True)
class Footprint:
    """One training step's size, from the layer shapes (one image of ``side`` x ``side``)."""

    arch: str
    side: int
    host_dtype: str
    activation_bytes: int
    forward_flops: int
    train_flops: int
    bus_bytes: int
    stem_bytes: int = 0  # the stem conv's output (in ``activation_bytes``)
    stem_flops: int = 0  # one pass of the stem conv
    largest_bytes: int = 0  # the largest activation but the stem conv's output: the input or a conv's
    image_bytes: int = 0  # the image in float32, as a run holding it whole in RAM holds it


@dataclass(frozen=True)
class Prediction:
    """What one step needs on a machine (bytes, seconds); ``spilled`` when a host budget binds."""

    in_ram_bytes: int  # host RAM the step needs with everything in RAM
    host_bytes: int  # host RAM it uses under the budget
    disk_written: int
    disk_read: int
    kernel_s: float
    bus_s: float
    disk_s: float
    host_s: float = 0.0  # the host's memory-bound passes
    host_computes: bool = False  # kernels run on the host's cores too: their times add
    base_bytes: int = PROCESS_BYTES  # before the step: the process, and the image held in RAM

    def _terms(self) -> list[tuple[str, float]]:
        if self.host_computes:
            compute = [("kernels + host", self.kernel_s + self.host_s)]
        else:
            compute = [("kernels", self.kernel_s), ("host", self.host_s)]
        return compute + [("bus", self.bus_s), ("disk", self.disk_s)]

    @property
    def step_s(self) -> float:
        return max(t for _, t in self._terms())

    @property
    def bound(self) -> str:
        return max(self._terms(), key=lambda t: t[1])[0]


def footprint(arch: str, side: int, host_dtype: str = "float32") -> Footprint:
    """Activation bytes stored once, FLOPs and bus bytes of one all-big step on a ``side``² image."""
    if host_dtype not in HOST_DTYPES:
        raise ValueError(f"--host_dtype={host_dtype}: choose one of {', '.join(HOST_DTYPES)}")
    if side < 32:
        raise ValueError(f"--side={side}: a ResNet needs at least 32 px (five stride-2 reductions)")
    convs = conv_shapes(arch, side)
    size = HOST_DTYPES[host_dtype]
    ins, outs = [math.prod(c[0]) for c in convs], [math.prod(c[1]) for c in convs]
    macs = [c[3] for c in convs]
    forward = 2 * sum(macs)
    return Footprint(arch, side, host_dtype,
                     activation_bytes=size * (ins[0] + sum(outs)),
                     forward_flops=forward,
                     train_flops=3 * forward - 2 * macs[0],  # no input gradient for the image
                     bus_bytes=size * (3 * sum(ins) + 2 * sum(outs)),
                     stem_bytes=size * outs[0], stem_flops=2 * macs[0],
                     largest_bytes=size * max([ins[0]] + outs[1:]), image_bytes=4 * ins[0])


def predict(fp: Footprint, machine: Machine, host_budget: int | None = None,
            copies: float = COPIES) -> Prediction:
    """Host RAM, disk bytes and time of the step ``fp`` on ``machine``, within ``host_budget`` bytes
    of host RAM for activations (None: everything in RAM). The stem streams where ``Execution``'s
    default streams it: with a budget, or with narrow host activations."""
    streams = host_budget is not None or fp.host_dtype != "float32"
    stem = fp.stem_bytes if streams else 0
    need = int(copies * fp.activation_bytes) - stem
    residuals = int(RESIDUALS * (fp.activation_bytes - stem))
    largest = max(fp.largest_bytes, fp.stem_bytes - stem)
    room = IN_FLIGHT * largest
    written = 0 if host_budget is None else max(0, residuals - max(0, host_budget - room))
    flops = fp.train_flops + (STEM_PASSES * fp.stem_flops if streams else 0)
    read = int(READS * written)
    working = PARTITIONS_IN_FLIGHT * machine.partition_budget
    host = min(need, max(host_budget, room)) + working if written else need
    base = PROCESS_BYTES + _held_image(fp, machine)
    return Prediction(in_ram_bytes=need + base, host_bytes=host + base, base_bytes=base,
                      disk_written=written, disk_read=read,
                      kernel_s=flops / machine.kernel_throughput,
                      bus_s=0.0 if machine.bus is None else fp.bus_bytes / machine.bus,
                      disk_s=written / machine.disk_write + read / machine.disk_read,
                      host_s=0.0 if machine.host_bandwidth is None
                      else HOST_PASSES * fp.activation_bytes / machine.host_bandwidth,
                      host_computes=machine.bus is None)


def largest_side(arch: str, machine: Machine, host_dtype: str = "float32", copies: float = COPIES,
                 reference: int = 4096) -> int:
    """The largest square side whose in-RAM step fits ``machine``'s RAM (activations, and an image
    held in RAM, scale with area)."""
    fp = footprint(arch, reference, host_dtype)
    per_pixel = (copies * fp.activation_bytes + _held_image(fp, machine)) / reference**2
    return int(math.sqrt(max(machine.host_memory - PROCESS_BYTES, 0) / per_pixel))


def largest_spilled_side(arch: str, machine: Machine, host_dtype: str = "float32",
                         reference: int = 4096) -> int:
    """The largest square side a step spilling every residual fits in ``machine``'s RAM: the
    activations alive (``IN_FLIGHT`` × the largest, whole cotangents no budget spills) beside
    the process and the partitions in flight; the disk is not bounded."""
    fp = footprint(arch, reference, host_dtype)
    per_pixel = (IN_FLIGHT * fp.largest_bytes + _held_image(fp, machine)) / reference**2
    return int(math.sqrt(max(machine.free_memory, 0) / per_pixel))


def _held_image(fp: Footprint, machine: Machine) -> int:
    """The bytes of ``fp``'s image that ``machine``'s run holds in RAM beside the step."""
    return fp.image_bytes if machine.input_in_ram else 0


def table(machines: list[Machine], arch: str, sides, host_dtype: str, copies: float) -> list[str]:
    """Markdown rows: per machine and side, the in-RAM need, the budgeted run and its step time."""
    gib = lambda n: f"{n / 2**30:,.1f}"  # noqa: E731
    rows = ["| machine | side | activations once (GiB) | in RAM (GiB) | host budget (GiB) | host used "
            "(GiB) | disk written / read (GiB) | kernels (s) | host passes (s) | bus (s) | disk floor (s) "
            "| step (s), bound |", "|---" * 12 + "|"]
    for m in machines:
        for side in sides:
            fp = footprint(arch, side, host_dtype)
            p = predict(fp, m, m.host_budget, copies)
            rows.append(f"| {m.name} | {side:,}² | {gib(fp.activation_bytes)} | {gib(p.in_ram_bytes)} | "
                        f"{gib(m.host_budget)} | {gib(p.host_bytes)} | {gib(p.disk_written)} / "
                        f"{gib(p.disk_read)} | {p.kernel_s:,.1f} | {p.host_s:,.1f} | {p.bus_s:,.1f} | "
                        f"{p.disk_s:,.1f} | "
                        f"{p.step_s:,.1f}, {p.bound} |")
    return rows


def main(argv=None) -> int:
    """``python -m bigjax.models.machine_fit``: the anchors' sides on a GPU server and this machine;
    with machine flags, one machine; ``--check 512,1024`` measures steps here against the prediction."""
    a = _flags(argv)
    copies = a.copies
    throughput, bandwidth = a.kernel_throughput, a.host_bandwidth
    if a.measure:
        throughput, bandwidth = measure_throughput(), measure_host_bandwidth()
        print(f"measured kernel throughput: {throughput / 1e9:,.1f} GFLOP/s (3x3 conv step, jitted); "
              f"host passes: {bandwidth / 1e9:,.1f} GB/s", flush=True)
    here = replace(THIS_MACHINE, kernel_throughput=throughput or THIS_MACHINE.kernel_throughput,
                   host_bandwidth=bandwidth or THIS_MACHINE.host_bandwidth)
    if a.check:
        return _check(a, here, copies)
    given = [a.device_memory, a.host_memory, a.disk_read, a.disk_write, throughput]
    if all(v is not None for v in given):
        machines = [Machine("given", *given[:2], *given[2:], bus=a.bus, host_bandwidth=bandwidth,
                            activation_budget=a.budget, partition_bytes=a.max_partition_bytes,
                            input_in_ram=a.input_in_ram)]
    else:
        machines = [SERVER, here]
    sides = a.side or ANCHOR_SIDES
    print(f"{a.arch}, host activations {a.host_dtype}, {copies:g} copies in RAM (the engine's measured "
          "ratio); step = max(kernels, host passes, bus, disk floor), kernels + host passes on a CPU")
    print("\n".join(table(machines, a.arch, sides, a.host_dtype, copies)))
    for m in machines:
        side = largest_side(a.arch, m, a.host_dtype, copies)
        spilled = largest_spilled_side(a.arch, m, a.host_dtype)
        print(f"{m.name}: largest side in RAM {side:,}²; spilled {spilled:,}² (its cotangents whole)")
    return 0


def _check(a, here: Machine, copies: float) -> int:
    """Predicted vs measured peak-RSS rise, disk bytes and step time of all-big steps at
    ``--check``'s sides: in RAM, or with ``--budget`` bytes kept and the rest spilled to
    ``--spill_dir``."""
    cores = len(os.sched_getaffinity(0))
    print(f"| side | activations once (MiB) | RSS rise predicted / measured (MiB) | ratio measured | "
          f"spilled predicted / measured (MiB) | step predicted: kernels + host passes (s) | "
          f"measured (s) | CPU s / {cores} cores |\n" + "|---" * 8 + "|")
    for side in a.check:
        fp = footprint(a.arch, side, a.host_dtype)
        p = predict(fp, here, a.budget, copies)
        m = measure_step(ARCHS[a.arch], side, host_dtype=a.host_dtype, host_memory=a.budget,
                         spill_dir=a.spill_dir)
        mib = lambda n: f"{n / 2**20:,.1f}"  # noqa: E731
        print(f"| {side:,}² | {mib(fp.activation_bytes)} | {mib(p.host_bytes - p.base_bytes)} / "
              f"{mib(m['rss_rise'])} | {m['rss_rise'] / fp.activation_bytes:.2f} | "
              f"{mib(p.disk_written)} / {mib(m['written'])} | "
              f"{p.kernel_s:.2f} + {p.host_s:.2f} = {p.step_s:.2f} | {m['seconds']:.2f} | "
              f"{m['cpu_seconds']:.2f} |", flush=True)
    return 0


def _flags(argv) -> argparse.Namespace:
    p = ArgumentParser(description=main.__doc__)
    p.add_argument("--arch", default="resnet18", choices=tuple(ARCHS))
    p.add_argument("--host_dtype", default="float32", choices=tuple(HOST_DTYPES))
    p.add_argument("--side", type=_sides, help="square sides, comma-separated (default the anchors')")
    p.add_argument("--device_memory", type=flag_value(parse_bytes), help="e.g. 80GB")
    p.add_argument("--host_memory", type=flag_value(parse_bytes), help="host RAM, e.g. 512GB")
    p.add_argument("--budget", type=flag_value(parse_bytes), help="host RAM for activations (the run's "
                                                          "--host_memory; default: what RAM leaves)")
    p.add_argument("--max_partition_bytes", type=flag_value(parse_bytes),
                   help="the run's partition budget, e.g. 64MiB (default: an eighth of the device, "
                        "at most 1 GiB)")
    p.add_argument("--input_in_ram", action="store_true",
                   help="the run holds its image whole in RAM in float32 (default: read from a slide)")
    p.add_argument("--disk_read", type=flag_value(parse_rate), help="e.g. 3GB/s")
    p.add_argument("--disk_write", type=flag_value(parse_rate), help="e.g. 2GB/s")
    p.add_argument("--bus", type=flag_value(parse_rate),
                   help="host<->device, e.g. 25GB/s (default: none, a CPU)")
    p.add_argument("--kernel_throughput", type=float, help="FLOP/s of the kernels, e.g. 4.4e10")
    p.add_argument("--host_bandwidth", type=flag_value(parse_rate),
                   help="bytes/s of the host's memory-bound passes, e.g. 40GB/s (default: not counted)")
    p.add_argument("--measure", action="store_true",
                   help="measure the kernel throughput and the host's bandwidth here")
    p.add_argument("--copies", type=float, default=COPIES,
                   help=f"the engine's peak RSS over the activations stored once (default {COPIES})")
    p.add_argument("--check", type=_sides, help="measure all-big steps at these sides here (<= 2048 "
                                                "stays under 4 GiB; with --budget, spilled)")
    p.add_argument("--spill_dir", help="with --check and --budget: the spill store's directory")
    a = p.parse_args(argv)
    if a.check and (a.budget is None) != (a.spill_dir is None):  # one `error:` line (run_cli)
        raise ValueError("--check with --budget needs --spill_dir (and --spill_dir needs --budget)")
    return a


def _sides(text: str) -> tuple[int, ...]:
    try:
        sides = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give sides in pixels, e.g. 16384,65536") from None
    if any(s < 32 for s in sides):
        raise argparse.ArgumentTypeError(f"{text!r}: a ResNet needs sides of at least 32 px")
    return sides


if __name__ == "__main__":
    import sys

    from bigjax.errors import run_cli

    sys.exit(run_cli(main))
