"""Ctrl-C as a request to stop at the next safe point, which no library can swallow.

Python's default SIGINT handler raises ``KeyboardInterrupt`` in whatever Python code runs at that
moment. When that is a garbage-collector callback (JAX registers ``_xla_gc_callback``), the exception
is printed as "Exception ignored in ..." and dropped, and training goes on. Here the handler only
records the request; the loop polls ``requested()`` after each step, saves and stops. A second Ctrl-C
raises ``KeyboardInterrupt`` at once (for a hung step); should that one be swallowed too, the request
is still recorded and the loop stops after the step.

Usage::

    with stop_on_interrupt() as stop:
        for batch in batches:
            train_step(batch)
            if stop.requested():
                save(); raise Interrupted(f"stopped at step {step}; continue with --resume")
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

__all__ = ["StopRequest", "stop_on_interrupt"]


class StopRequest:
    """What the handler recorded: ``requested()`` after the first signal, the signal's name in ``signal``."""

    def __init__(self):
        self.signal: str | None = None

    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, frame) -> None:
        if self.requested():
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        os.write(2, b"\ninterrupted: stopping after this step (interrupt again to stop at once)\n")


@contextlib.contextmanager
def stop_on_interrupt(signals: tuple[int, ...] = (signal.SIGINT,)) -> Iterator[StopRequest]:
    """Within the block, ``signals`` (default SIGINT, i.e. Ctrl-C) set a stop request instead of raising.

    The previous handlers come back on exit. Signal handlers can only be set from the main thread;
    elsewhere this raises RuntimeError.
    """
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("stop_on_interrupt() must be entered in the main thread (Python delivers "
                           "signals there only)")
    request = StopRequest()
    previous = {s: signal.signal(s, request._handle) for s in signals}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
