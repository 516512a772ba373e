"""Memory of a benchmark point: compiled device bytes, device and host peaks, a host-RAM predictor."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import os
from pathlib import Path

import jax

__all__ = ["compiled_bytes", "device_buffer_bytes", "device_peak_bytes", "device_limit_bytes",
           "host_ram_bytes", "host_available_bytes", "reset_host_peak", "host_peak_bytes",
           "host_rss_bytes", "PhasePeaks", "release_host", "predicted_host_bytes"]

# float32 values a training step keeps per input pixel (conv, BatchNorm and ReLU outputs of every layer,
# counted from the architectures: ResNet-18 ≈ 50 conv-output values per pixel, x3)
_VALUES_PER_PIXEL = {18: 150, 34: 250, 50: 600}


def compiled_bytes(fn, *args) -> int | None:
    """Arguments + outputs + temporaries of a jitted ``fn`` on ``args``, from XLA's memory analysis."""
    stats = fn.lower(*args).compile().memory_analysis()
    if stats is None:
        return None
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes)


def device_buffer_bytes(device: jax.Device) -> int:
    """Bytes of the distinct buffers now in ``device``'s own memory (``jax.live_arrays``; several
    array objects may alias one buffer, so buffers are counted once). Works on a CPU too."""
    arrays = [a for a in jax.live_arrays()
              if a.devices() == {device} and a.sharding.memory_kind == "device"]
    return sum({a.unsafe_buffer_pointer(): a.nbytes for a in arrays}.values())


def device_peak_bytes() -> int | None:
    """Peak bytes in use on the default device since start (GPU); None where unknown (CPU)."""
    stats = jax.devices()[0].memory_stats()
    return None if stats is None else stats.get("peak_bytes_in_use")


def device_limit_bytes() -> int | None:
    """Bytes the default device may allocate (a GPU's ``bytes_limit``); None where unknown (CPU)."""
    stats = jax.devices()[0].memory_stats()
    return None if stats is None else stats.get("bytes_limit")


def host_ram_bytes() -> int:
    """Physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def host_available_bytes() -> int:
    """Memory the kernel could give this process now (Linux ``MemAvailable``; else physical RAM)."""
    return _proc_kib("/proc/meminfo", "MemAvailable:") or host_ram_bytes()


def reset_host_peak() -> None:
    """Restart the peak resident set size count (Linux ``clear_refs`` 5); a no-op elsewhere."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def host_peak_bytes() -> int | None:
    """Peak resident set size since the last ``reset_host_peak`` (Linux ``VmHWM``)."""
    return _proc_kib("/proc/self/status", "VmHWM:")


class PhasePeaks:
    """The process's peak resident set (VmHWM) apart for named phases of a run: the count restarts
    before each phase (``reset_host_peak``) and is read after it; ``peaks[name]`` is the largest a
    phase of that name reached. A whole-slide run's training steps keep their residuals within the
    host budget, while its evaluation, a forward that keeps none, holds what its blocks make at once,
    so the two peaks differ (docs/benchmarks.md, fourteenth session)."""

    def __init__(self):
        self.peaks: dict[str, int] = {}

    @contextlib.contextmanager
    def phase(self, name: str):
        reset_host_peak()
        try:
            yield
        finally:
            self.peaks[name] = max(self.peaks.get(name, 0), host_peak_bytes() or 0)


def host_rss_bytes() -> int | None:
    """Resident set size now (Linux ``VmRSS``)."""
    return _proc_kib("/proc/self/status", "VmRSS:")


def _proc_kib(path: str, key: str) -> int | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


_LIBC = ctypes.util.find_library("c")


def release_host() -> None:
    """Collect Python garbage and hand freed heap memory back to the OS (glibc ``malloc_trim(0)``).

    Without it glibc keeps the freed buffers of one configuration's iteration in its arenas and the
    resident set grows with every configuration a sweep interleaves (9.4 GB at 1024² in a first run).
    """
    gc.collect()
    try:
        ctypes.CDLL(_LIBC).malloc_trim(0)
    except (OSError, TypeError, AttributeError):  # not glibc
        pass


def predicted_host_bytes(depth: int, side: int) -> int:
    """Rough activation bytes of one S x S image's training step (what host RAM must hold)."""
    return 4 * _VALUES_PER_PIXEL[depth] * side * side
