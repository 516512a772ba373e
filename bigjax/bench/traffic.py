"""What a Big-Layers step moves across the bus: an ``Execution`` observer counting bytes and calls.

``Traffic`` adds ``Execution.crossing_bytes`` of every ``to_compute`` (host -> device) and ``to_host``
(device -> host) event, so parameters already on the compute device and arrays already in host memory
count nothing; it also counts every event's calls (partitions, blocking host reads, prefetch waits).
``step_traffic`` splits one training step into its forward and backward: the forward is counted on a
forward-only call (a custom_vjp op's forward under ``jax.grad`` moves exactly what its primal call
moves), the backward as the step's total minus that.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable

from bigjax.layers.execution import Execution

__all__ = ["Traffic", "step_traffic"]


class Traffic:
    """An observer adding the bytes each copy moves between host memory and the compute device."""

    def __init__(self, execution: Execution):
        self.execution = execution
        self.bytes = Counter({"to_compute": 0, "to_host": 0})
        self.calls = Counter()

    def __call__(self, event: str, fn: Callable, *args, **kwargs):
        self.calls[event] += 1
        if event in self.bytes:
            self.bytes[event] += self.execution.crossing_bytes(event, args[0])
        elif event == "band_copies":  # a compiled pass: its copies ran inside the program
            self.bytes["to_compute"] += args[0]
            self.bytes["to_host"] += args[1]
        return fn(*args, **kwargs)

    def observe(self, execution: Execution) -> Execution:
        """``execution`` with this counter as its observer (it must have the same devices)."""
        return execution.replace(observer=self)


def step_traffic(forward: Callable[[Execution], object], step: Callable[[Execution], object],
                 execution: Execution) -> dict[str, int]:
    """Bytes each way in the forward and the backward of ``step`` (forward + backward), and calls.

    Returns:
      ``{"fwd_h2d", "fwd_d2h", "bwd_h2d", "bwd_d2h"}`` in bytes, plus ``host_reads`` and ``waits``
      (blocking reads and prefetch waits in one step).
    """
    fwd, total = Traffic(execution), Traffic(execution)
    forward(fwd.observe(execution))
    step(total.observe(execution))
    return {"fwd_h2d": fwd.bytes["to_compute"], "fwd_d2h": fwd.bytes["to_host"],
            "bwd_h2d": total.bytes["to_compute"] - fwd.bytes["to_compute"],
            "bwd_d2h": total.bytes["to_host"] - fwd.bytes["to_host"],
            "host_reads": total.calls["host_read"], "waits": total.calls["wait"]}
