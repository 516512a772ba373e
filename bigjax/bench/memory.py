"""Memory of a benchmark point: compiled device bytes, device and host peaks, a host-RAM predictor."""

from __future__ import annotations

import os
from pathlib import Path

import jax

__all__ = ["compiled_bytes", "device_peak_bytes", "host_ram_bytes", "reset_host_peak",
           "host_peak_bytes", "predicted_host_bytes"]

# float32 values a training step keeps per input pixel (conv, BatchNorm and ReLU outputs of every layer,
# counted from the architectures: ResNet-18 ≈ 50 conv-output values per pixel, x3)
_VALUES_PER_PIXEL = {18: 150, 34: 250, 50: 600}


def compiled_bytes(fn, *args) -> int | None:
    """Arguments + outputs + temporaries of a jitted ``fn`` on ``args``, from XLA's memory analysis."""
    stats = fn.lower(*args).compile().memory_analysis()
    if stats is None:
        return None
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes)


def device_peak_bytes() -> int | None:
    """Peak bytes in use on the default device since start (GPU); None where unknown (CPU)."""
    stats = jax.devices()[0].memory_stats()
    return None if stats is None else stats.get("peak_bytes_in_use")


def host_ram_bytes() -> int:
    """Physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def reset_host_peak() -> None:
    """Restart the peak resident set size count (Linux ``clear_refs`` 5); a no-op elsewhere."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def host_peak_bytes() -> int | None:
    """Peak resident set size since the last ``reset_host_peak`` (Linux ``VmHWM``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def predicted_host_bytes(depth: int, side: int) -> int:
    """Rough activation bytes of one S x S image's training step (what host RAM must hold)."""
    return 4 * _VALUES_PER_PIXEL[depth] * side * side
