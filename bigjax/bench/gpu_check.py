"""GPU readiness in one command: the checks a session with an accelerator runs first (≤ 8 minutes).

    python -m bigjax.bench.gpu_check [--out=runs/gpu_check.md]   # on an H100/H200
    python -m bigjax.bench.gpu_check --dry-run                   # the same checks, tiny, on CPU devices

One markdown table:

* every float32 engine (eager, compiled, whole blocks) on the compute device against the in-memory
  twin's loss and gradients computed on the CPU (float32, "highest" matmul precision: Hopper would use
  TF32 otherwise), each within its bound; bfloat16 host activations against the same engine with the
  same storage on the CPU (its difference from float32 storage is tens of percent on a random ResNet,
  whose gradient is not smooth in its activations: docs/benchmarks.md, "Gradient error"; what the
  device must show is that it computes what the CPU does from the same rounded activations);
* the device's peak (``memory_stats()["peak_bytes_in_use"]``) after an eager step against the bound
  ``resnet_fit.choose_big_stages`` predicts for it (CPU devices report none: "n/a");
* pinned-host staging in use: device->host copies of a step that land in ``pinned_host`` memory;
* the four lines of docs/benchmarks.md's GPU table (1×1024² and 32×256² at 32 MiB fused, 1×1024² at
  256 MiB, 32×256² on the separate path): Big s, jit s, ratio, peak (``bench.step.benchmark_step``).

The exit status is 1 when a check fails. ``--dry-run`` runs it at tiny sizes with the compute and
host on two CPU devices (two of the four benchmark lines; the default suite tests it), with the
staging through the compute device's ``pinned_host`` memory forced (``pinned_staging=True``), as a
GPU does it by default.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import numpy as np

# float32 convolutions on Hopper default to TF32 (~1e-3): compare at full precision
jax.config.update("jax_default_matmul_precision", "highest")

from flax import nnx  # noqa: E402

from bigjax.bench.step import benchmark_step, step_setup  # noqa: E402
from bigjax.errors import ArgumentParser
from bigjax.layers.execution import Execution  # noqa: E402
from bigjax.models.resnet_fit import choose_big_stages  # noqa: E402

__all__ = ["engine_rows", "peak_row", "benchmark_rows", "main"]

MiB = 2**20
# engine -> (Execution settings, bound on the gradient error relative to the largest gradient)
ENGINES = {"eager": (dict(engine="eager", whole_blocks=False), 1e-4),
           "compiled": (dict(engine="compiled", whole_blocks=False), 1e-4),
           "whole blocks": (dict(engine="eager", whole_blocks=True), 1e-4),
           "bf16 host": (dict(engine="eager", whole_blocks=False, host_dtype="bfloat16"), 0.05)}
# bfloat16 host activations are compared with the same storage on the CPU, as a relative L2 error: a
# kernel's float32 round-off that differs between devices flips a few bf16 roundings (2^-8 each)
# docs/benchmarks.md, GPU table: (shape, budget, fused)
LINES = (((1, 1024, 1024, 3), 32 * MiB, True), ((32, 256, 256, 3), 32 * MiB, True),
         ((1, 1024, 1024, 3), 256 * MiB, True), ((32, 256, 256, 3), 32 * MiB, False))
# the dry run: one tiny shape (its programs compile once), the fused and the separate path
DRY_LINES = (((2, 64, 64, 3), 32 * MiB, True), ((2, 64, 64, 3), 32 * MiB, False))


class _Staged:
    """Observer: counts the copies to host memory and those that land in ``pinned_host``."""

    def __init__(self):
        self.copies = self.pinned = 0

    def __call__(self, event, fn, *args, **kwargs):
        out = fn(*args, **kwargs)
        if event == "to_host" and isinstance(out, jax.Array) and not isinstance(out, jax.core.Tracer):
            self.copies += 1
            self.pinned += out.sharding.memory_kind == "pinned_host"
        return out


def _error(grads, reference, l2: bool = False) -> float:
    """Largest gradient difference relative to the reference's largest gradient (per tree), or
    with ``l2`` the relative L2 norm of the difference."""
    ours, theirs = (np.concatenate([np.ravel(np.asarray(jax.device_get(v), np.float64))
                                    for v in jax.tree.leaves(t)]) for t in (grads, reference))
    if l2:
        return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def engine_rows(shape, budget, base: Execution) -> tuple[list[tuple], _Staged]:
    """One row per engine: its loss and gradients on ``base.compute`` against the CPU twin's."""
    x, big, twin, loss = step_setup(18, shape)
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        twin_result = nnx.jit(nnx.value_and_grad(loss))(twin, jax.device_put(x, cpu))
    rows, staged = [], _Staged()
    for name, (settings, bound) in ENGINES.items():
        ex = base.replace(max_partition_bytes=budget, observer=staged, **settings)
        value, grads = nnx.value_and_grad(loss)(nnx.clone(big), ex.to_host(x), ex)
        narrow = "host_dtype" in settings
        loss0, g0 = twin_result
        if narrow:  # the reference: the same engine and storage, every device the CPU
            on_cpu = ex.replace(compute=cpu, host=cpu, observer=None, pinned_staging=None)
            loss0, g0 = nnx.value_and_grad(loss)(nnx.clone(big), on_cpu.to_host(x), on_cpu)
        err = max(_error(grads, g0, l2=narrow), abs(float(value) - float(loss0)) / abs(float(loss0)))
        what = "CPU, same bf16 storage" if narrow else "CPU twin"
        rows.append((f"engine {name} = {what}", f"{err:.1e}", f"< {bound:.0e}", err < bound))
    return rows, staged


def peak_row(shape, budget, base: Execution) -> tuple:
    """The device's peak after an eager step against the predicted bound of that step."""
    x, big, _, loss = step_setup(18, shape)
    ex = base.replace(max_partition_bytes=budget)
    nnx.value_and_grad(loss)(big, ex.to_host(x), ex)
    bound = choose_big_stages(big, shape, 2**62, big_stages=4, budget=budget).predicted_bytes
    stats = ex.compute.memory_stats()
    if stats is None:
        return ("device peak ≤ predicted", f"n/a ({ex.compute.platform}: no memory_stats)",
                f"{bound / MiB:,.0f} MiB", True)
    peak = stats["peak_bytes_in_use"]
    return ("device peak ≤ predicted", f"{peak / MiB:,.0f} MiB", f"{bound / MiB:,.0f} MiB", peak <= bound)


def benchmark_rows(lines, reps: int) -> list[tuple]:
    rows = []
    for shape, budget, fused in lines:
        t = benchmark_step(18, shape, budget, fused=fused, reps=reps, profile=False)
        peak = "n/a" if t.big_peak_bytes is None else f"{t.big_peak_bytes / 2**20:,.0f} MB"
        what = f"benchmark {'×'.join(map(str, shape[:3]))}, {budget // MiB} MiB, " + (
            "fused" if fused else "separate")
        rows.append((what, f"Big {t.big_s:.2f} s, jit {t.plain_s:.3f} s, ratio {t.ratio:.2f}",
                     f"peak {peak}", True))
    return rows


def table(rows) -> str:
    lines = ["| check | value | bound / note | ok |", "|---|---|---|---|"]
    lines += [f"| {what} | {value} | {bound} | {'yes' if ok else '**NO**'} |"
              for what, value, bound, ok in rows]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--dry-run", dest="dry_run", action="store_true",
                   help="tiny sizes on two CPU devices (compute and host)")
    p.add_argument("--out", default="runs/gpu_check.md", help="where the table is written")
    a = p.parse_args(argv)
    if a.dry_run:
        devices = jax.devices("cpu")
        base = Execution(compute=devices[0], host=devices[-1], pinned_staging=True)
        shape, budget, lines, reps = (2, 64, 64, 3), 32 * MiB, DRY_LINES, 1
    else:
        base = Execution()
        shape, budget, lines, reps = (2, 512, 512, 3), 32 * MiB, LINES, 3
    rows, staged = engine_rows(shape, budget, base)
    rows.append(("pinned-host staging in use", f"{staged.pinned} of {staged.copies} copies to host",
                 "> 0", staged.pinned > 0))
    rows.append(peak_row(shape, budget, base))
    rows += benchmark_rows(lines, reps)
    text = f"device: {base.compute.device_kind} ({base.compute.platform}), jax {jax.__version__}\n\n"
    text += table(rows)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)
    print(text, end="")
    return 0 if all(ok for *_, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
