"""One process per folder: an advisory lock (``fcntl.flock``) on a lock file that holds its pid.

A training run holds ``<workdir>/run.lock`` (``<pid> a training run``) for as long as it runs, and a tiler holds
``<store>/tiling.lock`` while it writes the store, so a second process started on the same folder is
refused at once, in one line naming the holder's pid, instead of interleaving its metrics rows and
checkpoints with the first's. The kernel releases a ``flock`` when its holder dies, however it dies
(kill -9 included): a lock left by a dead process is free, and the next process takes it over
(saying whose it was). The pid in the file is only for the messages; the lock is the ``flock``.

Within one process the lock is re-entrant (a CLI holding the workdir may call ``train``, which takes
it too): ``flock`` locks belong to an open file description, so a second ``open`` + ``flock`` of the
same file in the same process would refuse itself.

References: flock(2) (released on close and on process exit).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

from bigjax.errors import UserError

log = logging.getLogger(__name__)

__all__ = ["FolderInUse", "RUN_LOCK", "TILING_LOCK", "hold"]

RUN_LOCK = "run.lock"  # in a run's workdir
TILING_LOCK = "tiling.lock"  # in a tile store

_held: dict[Path, list] = {}  # lock file -> [open file, depth] held by this process
_guard = threading.Lock()


class FolderInUse(UserError):
    """Another live process holds the folder's lock; the message names its pid."""


@contextlib.contextmanager
def hold(lock_file: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold ``lock_file`` (created with its folder) for the block; refuse if another process holds it.

    Args:
      lock_file: e.g. ``<workdir>/run.lock``.
      what: what this process does there, written beside its pid for the messages of others, e.g.
        "a training run", "a tiler".
    Raises:
      FolderInUse: a live process holds it (one line: the folder, the pid, what to do).
    """
    path = Path(lock_file).absolute()
    with _guard:
        entry = _held.get(path)
        if entry is None:
            entry = _held[path] = [_acquire(path, what), 0]
        entry[1] += 1
    try:
        yield
    finally:
        with _guard:
            entry[1] -= 1
            if entry[1] == 0:
                del _held[path]
                _release(entry[0])


def _acquire(path: Path, what: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(f) or "another process (its pid not yet written)"
        f.close()
        raise FolderInUse(f"{path.parent} is in use by {holder} (lock {path.name}); wait for it to end, "
                          f"stop it, or use another folder") from None
    stale = _holder(f)
    if stale:
        log.info("%s: taking over the lock of %s, which is no longer running", path, stale)
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()} {what}\n")
    f.flush()
    return f


def _release(f) -> None:
    """Empty the file (a clean end leaves no pid to report as stale), then unlock by closing it."""
    f.seek(0)
    f.truncate()
    f.flush()
    f.close()


def _holder(f) -> str:
    """"process <pid> (<what>)" as the holder wrote it, or "" for an empty file."""
    f.seek(0)
    pid, _, what = f.read().strip().partition(" ")
    return f"process {pid} ({what})" if pid else ""
