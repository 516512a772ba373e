"""Host RAM of one Big-Layers training step against the activations it must keep (issue 21).

The rise of the process's peak resident set (``/proc/self/status`` VmHWM, reset through
``/proc/self/clear_refs``) during one all-big ResNet train step, after a warm-up step at the same
shape (compilation is not counted), is compared with the *activations stored once*: the input plus
every convolution's output, counted from the shapes in the step's host dtype. Their ratio says how
many copies of its activations the engine holds at its peak. With ``host_memory`` the step spills
what exceeds that budget (``layers.spill``) and the spill observer's totals are reported too.

    python -m bigjax.bench.host_memory --sides 512,1024 [--host_dtype bfloat16] [--spill_dir DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
from flax import nnx

from bigjax.bench.memory import host_peak_bytes, host_rss_bytes, release_host, reset_host_peak
from bigjax.bench.step import executions, step_setup
from bigjax.errors import ArgumentParser
from bigjax.layers.pages import return_freed_buffers
from bigjax.layers.spill import SpillStats
from bigjax.models.resnet import ResNet

__all__ = ["HostStep", "SpilledStep", "stored_once_bytes", "measure_host_step", "benchmark_spilled",
           "disk_bandwidth", "main"]


@dataclass
class HostStep:
    """One measured step: sizes in bytes, time in seconds."""

    side: int
    host_dtype: str
    budget: int
    host_memory: int | None
    stored_once: int
    rss_rise: int
    step_s: float
    spilled: int = 0  # bytes written to the spill store (0: nothing spilled)
    read: int = 0  # bytes read back from it
    cpu_s: float = 0.0  # the process's CPU seconds in the step (over the cores: the step alone)
    largest_read: int = 0  # bytes of the largest band read back from the spill store

    @property
    def ratio(self) -> float:
        return self.rss_rise / self.stored_once


def stored_once_bytes(model: ResNet, shape: tuple, itemsize: int) -> int:
    """Bytes of the input plus every conv output of ``model`` on an NHWC ``shape`` input."""
    n, h, w, c = shape
    total = h * w * c

    def conv(module, size):
        out = module.geom.out_size(*size)
        return out, out[0] * out[1] * module.kernel.get_value().shape[-1]

    size, values = conv(model.conv1, (h, w))
    total += values
    size = (size[0] - 1) // 2 + 1, (size[1] - 1) // 2 + 1  # the stem's 3x3/2 max-pool, padding 1
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            inner = size
            for name in ("conv1", "conv2", "conv3"):
                if hasattr(block, name):
                    inner, values = conv(getattr(block, name), inner)
                    total += values
            if block.downsample is not None:
                total += conv(block.downsample[0], size)[1]
            size = inner
    return n * total * itemsize


def measure_host_step(side: int, budget: int = 64 * 2**20, host_dtype: str | None = None,
                      host_memory: int | None = None, spill_dir: str | None = None,
                      engine: str = "eager", whole_blocks: bool = True,
                      mmap_threshold: bool = False, stream_stem: bool | None = None,
                      depth: int = 18, fused: bool = True) -> HostStep:
    """Peak-RSS rise of one all-big ResNet-``depth`` train step on a 1 x side x side x 3 image
    (``mmap_threshold``: freed buffers returned to the OS, ``pages.return_freed_buffers``, which a
    ``host_memory`` setting does anyway; ``stream_stem``: ``Execution.stream_stem``; ``fused``
    False: the paper's separate ops), its seconds and CPU seconds; a first step at the same shape
    compiles the kernels beforehand."""
    if mmap_threshold:
        return_freed_buffers()
    shape = (1, side, side, 3)
    x, big, _, loss = step_setup(depth, shape, fused=fused)
    _, ex = executions(budget, 1, host_dtype, engine, whole_blocks)
    stats = SpillStats()
    ex = ex.replace(host_memory=host_memory, spill_dir=spill_dir, observer=stats,
                    stream_stem=stream_stem)
    grad = nnx.value_and_grad(loss)
    x = ex.to_host(x)
    _block(grad(big, x, ex))  # warm-up: compile every kernel at this shape
    stats.reset()
    release_host()
    reset_host_peak()
    before = host_rss_bytes()
    start, cpu = time.perf_counter(), time.process_time()
    _block(grad(big, x, ex))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    rise = host_peak_bytes() - before
    itemsize = np.dtype(host_dtype or np.float32).itemsize
    return HostStep(side, host_dtype or "float32", budget, host_memory,
                    stored_once_bytes(big, shape, itemsize), rise, seconds, stats.written,
                    stats.read, cpu / len(os.sched_getaffinity(0)), stats.largest_read)


@dataclass
class SpilledStep:
    """One spilled training step against its floors: seconds, bytes, bytes/s."""

    shape: tuple
    host_dtype: str
    host_memory: int
    step_s: float
    peak_rss: int  # the step's peak resident set rise
    written: int
    read: int
    kernel_s: float  # kernels of a profiled (blocking) step: conv, batch-norm, host ops, whole blocks
    disk_write: float  # bytes/s of the spill store's own layout in spill_dir, measured in the run
    disk_read: float
    disk_peak: int  # the most bytes the step's spill files held at once (freed as the backward goes)

    @property
    def disk_s(self) -> float:
        """Achieved: the step's disk bytes over its seconds, in bytes/s."""
        return (self.written + self.read) / self.step_s

    @property
    def floor_s(self) -> float:
        """The disk floor: bytes written and read at the measured bandwidths."""
        return self.written / self.disk_write + self.read / self.disk_read

    @property
    def ratio(self) -> float:
        """Step time over max(kernel time, disk floor)."""
        return self.step_s / max(self.kernel_s, self.floor_s)


def disk_bandwidth(spill_dir, nbytes: int = 512 * 2**20, reps: int = 3) -> tuple[float, float]:
    """(write, read) bytes/s of a spill-store array of ``nbytes`` in ``spill_dir`` (through the
    page cache, as the store itself writes: on a machine whose RAM holds the bytes, reads may
    come from it), each the best of ``reps`` probes: a fresh process's first probe wrote at a
    third of the later ones' speed here (docs/benchmarks.md, eighth session), and a floor from it
    would overstate the disk's share of a step."""
    from bigjax.layers import Execution
    from bigjax.layers.spill import read_finish, read_start, release
    ex = Execution(host_memory=0, spill_dir=spill_dir)
    side = int((nbytes / 4 / 64) ** 0.5)
    x = ex.to_host(np.ones((1, side, side, 64), np.float32))
    write = read = 0.0
    for _ in range(reps):
        start = time.perf_counter()
        handle = ex.keep(x)
        handle.written()
        write = max(write, x.nbytes / (time.perf_counter() - start))
        start = time.perf_counter()
        read_finish(ex, read_start(ex, handle)).block_until_ready()
        read = max(read, x.nbytes / (time.perf_counter() - start))
        release(handle)
    return write, read


def benchmark_spilled(shape: tuple, host_memory: int, spill_dir, budget: int = 64 * 2**20,
                      host_dtype: str | None = None, engine: str = "eager",
                      probe_bytes: int = 512 * 2**20, warmup: bool = True) -> SpilledStep:
    """A warm-up step, a timed step (peak RSS, spill bytes) and a profiled step (kernel seconds)
    of the all-big ResNet-18 with ``Execution(host_memory, spill_dir)``; without ``warmup`` the
    timed step compiles (it then overstates the step, never the kernels)."""
    from bigjax.bench.profile import KERNELS, profile_step
    write, read = disk_bandwidth(spill_dir, probe_bytes)
    x, big, _, loss = step_setup(18, shape)
    _, ex = executions(budget, 1, host_dtype, engine)
    stats = SpillStats()
    ex = ex.replace(host_memory=host_memory, spill_dir=spill_dir)
    grad = nnx.value_and_grad(loss)
    x = ex.to_host(x)
    if warmup:
        _block(grad(big, x, ex))
    release_host()
    reset_host_peak()
    before = host_rss_bytes()
    timed = ex.replace(observer=stats)
    start = time.perf_counter()
    _block(grad(big, x, timed))
    seconds = time.perf_counter() - start
    rise = host_peak_bytes() - before
    profile = profile_step(lambda e: grad(big, x, e), ex)
    kernels = sum(profile.get(c, 0.0) for c in KERNELS)
    return SpilledStep(tuple(shape), host_dtype or "float32", host_memory, seconds, rise,
                       stats.written, stats.read, kernels, write, read, timed.spill.peak_on_disk)


def _block(result):
    import jax
    jax.block_until_ready(result)


def _gib(n) -> str:
    return f"{n / 2**30:.2f}"


def main(argv=None) -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sides", default="512,1024", help="comma-separated image sides")
    p.add_argument("--host_dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--budget", type=int, default=64 * 2**20, help="max_partition_bytes")
    p.add_argument("--host_memory", type=int, help="bytes of residuals kept in RAM (spill beyond)")
    p.add_argument("--spill_dir", help="directory of the spill store (with --host_memory)")
    p.add_argument("--engine", choices=["eager", "compiled"], default="eager")
    p.add_argument("--no_whole_blocks", action="store_true")
    p.add_argument("--mmap_threshold", action="store_true",
                   help="return freed buffers to the OS (implied by --host_memory)")
    p.add_argument("--stream_stem", choices=["auto", "on", "off"], default="auto",
                   help="the stem streamed in row bands (auto: with --host_memory or bfloat16)")
    p.add_argument("--separate", action="store_true",
                   help="the paper's separate ops (conv, two-pass BatchNorm, ReLU) for the fused path")
    a = p.parse_args(argv)
    dtype = None if a.host_dtype == "float32" else a.host_dtype
    print("side  dtype     stored GiB  RSS rise GiB  ratio  step s  spilled GiB  read GiB  "
          "largest read MiB")
    for side in map(int, a.sides.split(",")):
        r = measure_host_step(side, a.budget, dtype, a.host_memory, a.spill_dir, a.engine,
                              not a.no_whole_blocks, a.mmap_threshold,
                              {"auto": None, "on": True, "off": False}[a.stream_stem],
                              fused=not a.separate)
        print(f"{side:>5} {r.host_dtype:<9} {_gib(r.stored_once):>10} {_gib(r.rss_rise):>13} "
              f"{r.ratio:>6.2f} {r.step_s:>7.1f} {_gib(r.spilled):>12} {_gib(r.read):>9} "
              f"{r.largest_read / 2**20:>17.1f}", flush=True)
        print("  " + str(asdict(r)), file=sys.stderr)


if __name__ == "__main__":
    main()
