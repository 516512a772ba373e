"""The host-RAM budget of a Big-Layers run and what it spilled to disk.

``--host_memory=BYTES|auto`` bounds the host RAM the streaming engine keeps activations in; what does
not fit goes to a store in ``--spill_dir`` (``Execution(host_memory=, spill_dir=)``). ``auto`` is
``AUTO_SHARE`` of the kernel's ``MemAvailable`` when the run starts: the rest is left to the
process's own memory (parameters, compiled programs, the slide being read) and to the page cache the
spill store itself reads through. ``SpillMeter`` is an ``Execution`` observer adding the bytes of the
engine's ``spill_write``/``spill_read`` events and the seconds it waited on the store (``spill_wait``).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np

from bigjax.bench.memory import host_available_bytes
from bigjax.units import parse_bytes

__all__ = ["AUTO", "AUTO_SHARE", "parse_host_memory", "host_budget", "spill_options",
           "shard_spill_options", "SpillMeter"]

AUTO = "auto"
AUTO_SHARE = 0.5  # of MemAvailable: half for spilled-engine activations, half for everything else
SPILL_EVENTS = ("spill_write", "spill_read", "spill_wait")


def parse_host_memory(text: str | int | None) -> int | str | None:
    """``--host_memory``'s value: None (not given), ``"auto"`` or a positive number of bytes.

    Raises:
      ValueError: ``--host_memory=abc: ...`` (one line).
    """
    if text is None or text == AUTO:
        return text
    try:
        value = text if isinstance(text, int) else parse_bytes(str(text))
    except ValueError as e:
        raise ValueError(f"--host_memory={text}: {e}; or auto ({AUTO_SHARE:.0%} of MemAvailable)") from None
    if value < 1:
        raise ValueError(f"--host_memory={text}: must be at least 1 byte")
    return value


def host_budget(value: int | str | None) -> int | None:
    """Bytes of host RAM the engine may keep activations in: ``auto`` resolved now, None = no bound."""
    if value == AUTO:
        return int(AUTO_SHARE * host_available_bytes())
    return value


def spill_options(host_memory: int | str | None, spill_dir: str | os.PathLike | None,
                  workdir: str | os.PathLike) -> dict:
    """``Execution``'s keyword arguments for the run's host budget: none when ``host_memory`` is None
    (everything in RAM), else ``host_memory`` in bytes and ``spill_dir`` (default ``<workdir>/spill``).

    Raises:
      ValueError: ``spill_dir`` given without ``host_memory`` (it would never be written).
    """
    if host_memory is None:
        if spill_dir is not None:
            raise ValueError(f"--spill_dir={spill_dir} has no effect without --host_memory: "
                             "nothing spills when every activation stays in RAM")
        return {}
    return {"host_memory": host_budget(host_memory),
            "spill_dir": str(spill_dir if spill_dir is not None else Path(workdir) / "spill")}


def shard_spill_options(options: dict, shard: int, shards: int) -> dict:
    """One of ``shards`` engines' part of ``spill_options``: an equal share of the host budget and a
    folder of its own (engines in one process must not write each other's stores)."""
    if not options:
        return {}
    return {"host_memory": options["host_memory"] // shards,
            "spill_dir": str(Path(options["spill_dir"]) / f"shard{shard}")}


class SpillMeter:
    """An ``Execution`` observer adding the bytes of the engine's spill reads and writes and the
    seconds it waited on the store, over the wall-clock time since it started counting.

    A spill event's bytes are its ``nbytes`` keyword, else its first integer argument, else the
    bytes of its array arguments; its seconds are the time inside the call. The store is
    asynchronous: ``spill_write``/``spill_read`` only start the I/O, ``spill_wait`` is the engine
    blocked on it (a band it needs now, or too many writes in flight).
    """

    def __init__(self, chain: Callable | None = None):
        self.chain = chain  # another observer to pass every event on to
        self.bytes, self.seconds = Counter(), Counter()  # since the last ``take``
        self.total_bytes, self.total_seconds = Counter(), Counter()
        self.started = self.since = time.perf_counter()

    def __call__(self, event: str, fn: Callable, *args, **kwargs):
        if event not in SPILL_EVENTS:
            return self._run(event, fn, *args, **kwargs)
        start = time.perf_counter()
        try:
            return self._run(event, fn, *args, **kwargs)
        finally:
            self.seconds[event] += time.perf_counter() - start
            self.bytes[event] += _event_bytes(args, kwargs)

    def _run(self, event, fn, *args, **kwargs):
        return self.chain(event, fn, *args, **kwargs) if self.chain else fn(*args, **kwargs)

    def take(self) -> dict:
        """``summary`` of the events since the last ``take`` (an epoch), then start counting anew."""
        now = time.perf_counter()
        out = _summary(self.bytes, self.seconds, now - self.since)
        self.total_bytes.update(self.bytes)
        self.total_seconds.update(self.seconds)
        self.bytes, self.seconds, self.since = Counter(), Counter(), now
        return out

    def total(self) -> dict:
        """``summary`` of every event so far."""
        return _summary(self.total_bytes + self.bytes, self.total_seconds + self.seconds,
                        time.perf_counter() - self.started)


def _summary(nbytes: Counter, seconds: Counter, elapsed: float) -> dict:
    """``{"spill_written", "spill_read"}`` bytes; ``"disk_gb_s"``, the bytes moved over the
    ``elapsed`` wall-clock seconds (what the disk achieved while the run went on: 0 when nothing
    spilled); ``"spill_wait_s"``, the seconds the engine waited on the store."""
    moved = nbytes["spill_write"] + nbytes["spill_read"]
    return {"spill_written": nbytes["spill_write"], "spill_read": nbytes["spill_read"],
            "disk_gb_s": moved / elapsed / 1e9 if moved and elapsed > 0 else 0.0,
            "spill_wait_s": seconds["spill_wait"]}


def _event_bytes(args: tuple, kwargs: dict) -> int:
    if "nbytes" in kwargs:
        return int(kwargs["nbytes"])
    for a in args:
        if isinstance(a, (int, np.integer)) and not isinstance(a, bool):
            return int(a)
    return sum(int(a.nbytes) for a in args if hasattr(a, "nbytes") and hasattr(a, "dtype"))
