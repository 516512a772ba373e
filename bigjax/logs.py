"""Quiet libraries: orbax/absl/etils INFO off the console, and no "Event loop is closed" noise.

orbax logs through absl at INFO (its options, every save and restore, ~1.9 KB per line), JAX logs
an INFO line when it finds no TPU, and when a save fails (a full disk) orbax's background threads
print "RuntimeError: Event loop is closed" tracebacks by the hundred, burying the real error.
``quiet_libraries()`` keeps those libraries' warnings and errors on the console, sends their INFO to a
log file when one is given (the run's workdir), as well as their records that carry a traceback (those
reach the console only without a log file), and drops the event-loop noise from logging, thread
exceptions and unraisable exceptions, and the "coroutine ... was never awaited" warnings that Python
prints at exit for the writes orbax abandoned (bigjax has no coroutines of its own). Call it once,
early in a CLI, before importing orbax if possible (orbax logs at import).
"""

from __future__ import annotations

import logging
import sys
import threading
import warnings
from pathlib import Path

__all__ = ["NOISY_LOGGERS", "quiet_libraries"]

NOISY_LOGGERS = ("absl", "orbax", "etils", "tensorstore", "jax._src.xla_bridge", "asyncio")
EVENT_LOOP_CLOSED = "Event loop is closed"
NEVER_AWAITED = r"coroutine '.*' was never awaited"


def quiet_libraries(log_file: str | Path | None = None) -> None:
    """Keep WARNING and above of ``NOISY_LOGGERS`` on the console; their INFO to ``log_file`` if given.

    Idempotent: calling it again (another workdir) replaces the file handler.
    """
    import absl.logging  # noqa: F401 -- absl must create its logger class before we configure "absl"

    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if isinstance(h, (_LibraryFile, _ToRoot))]:
            logger.removeHandler(handler)
            handler.close()
        if not any(isinstance(f, _DropEventLoopClosed) for f in logger.filters):
            logger.addFilter(_DropEventLoopClosed())
        if log_file is None:
            logger.setLevel(logging.WARNING)
            logger.propagate = True
        else:  # INFO to the file; WARNING+ on to the console's (root's) handlers
            logger.setLevel(logging.INFO)
            logger.propagate = False
            logger.addHandler(_LibraryFile(log_file))
            logger.addHandler(_ToRoot(logging.WARNING))
    _drop_event_loop_closed_elsewhere()
    warnings.filterwarnings("ignore", message=NEVER_AWAITED, category=RuntimeWarning)


class _DropEventLoopClosed(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (EVENT_LOOP_CLOSED in record.getMessage() or _is_event_loop_closed(record.exc_info))


class _LibraryFile(logging.FileHandler):
    """The libraries' log file. A record that cannot be written (the file is on the disk that just filled
    up) is dropped: logging's default prints "--- Logging error ---" and a traceback on the console,
    burying the run's own one-line error about that disk."""

    def __init__(self, path):
        super().__init__(path, encoding="utf-8")
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def handleError(self, record: logging.LogRecord) -> None:
        if not isinstance(sys.exc_info()[1], OSError):
            super().handleError(record)


class _ToRoot(logging.Handler):
    """Hands a record on to the root logger's handlers, whichever they are when it is emitted; a record
    carrying a traceback stays in the log file only (orbax's writer threads log each failure of a save,
    a full disk, with its traceback; the run reports the failure itself, in one line)."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info is None and record.exc_text is None:
            logging.getLogger().handle(record)


def _is_event_loop_closed(exc_info) -> bool:
    error = exc_info[1] if isinstance(exc_info, tuple) else exc_info
    return isinstance(error, RuntimeError) and str(error) == EVENT_LOOP_CLOSED


def _drop_event_loop_closed_elsewhere() -> None:
    """The same noise from asyncio's logger, dying threads and garbage-collected loops."""
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _DropEventLoopClosed) for f in asyncio_log.filters):
        asyncio_log.addFilter(_DropEventLoopClosed())
    if not getattr(threading.excepthook, "_bigjax_quiet", False):
        thread_hook = threading.excepthook

        def excepthook(args):
            if not _is_event_loop_closed(args.exc_value):
                thread_hook(args)
        excepthook._bigjax_quiet = True
        threading.excepthook = excepthook
    if not getattr(sys.unraisablehook, "_bigjax_quiet", False):
        unraisable_hook = sys.unraisablehook

        def unraisablehook(info):
            if not _is_event_loop_closed(info.exc_value):
                unraisable_hook(info)
        unraisablehook._bigjax_quiet = True
        sys.unraisablehook = unraisablehook
