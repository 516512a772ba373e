"""Bounded asynchronous streaming: how many partitions may be in flight at once.

The ops dispatch each partition (host->device copy, kernel, device->host copy) without waiting for it.
Left alone, Python runs ahead of the device and every partition it has dispatched holds its device
buffers until its copies finish, so the device can hold many budgets at once. A ``Window`` of depth
``d`` (``Execution.prefetch``) lets at most ``d`` older partitions be in flight when the next one is
dispatched: with ``d = 0`` a partition starts when the previous one has landed in host memory (device
peak one budget), with ``d = 1`` the next band's copies overlap the current kernel (double buffering,
two budgets, the default). ``None`` keeps no window (unbounded, the engine before windows existed).
Without a window, on an accelerator, nothing would stop the loop from dispatching a whole layer's
host->device copies at once now that no band is read back inside the loop.
"""

from __future__ import annotations

from collections import deque

import jax

__all__ = ["Window"]


class Window:
    """The partitions in flight of one streaming engine, oldest first."""

    def __init__(self, depth: int | None):
        self.depth = depth
        self._in_flight: deque = deque()

    def admit(self, ex) -> None:
        """Before dispatching a partition: wait until at most ``depth`` older ones are in flight."""
        if self.depth is None:
            return
        while len(self._in_flight) > self.depth:
            ex.call("wait", jax.block_until_ready, self._in_flight.popleft())

    def in_flight(self) -> int:
        """Partitions noted in flight whose results are not ready yet."""
        return sum(not all(a.is_ready() for a in jax.tree.leaves(r)) for r in self._in_flight)

    def track(self, result) -> None:
        """Note a dispatched partition by its last result (ready once its buffers are released)."""
        if self.depth is not None:
            self._in_flight.append(result)
