"""User errors and the command-line wrapper that reports them in one line.

A mistake the user can fix (a flag, a file, a label) is reported as one line ``error: <message>`` on
stderr with exit status 2, a run stopped by diverging training with 1, a Ctrl-C with 130. Anything else
is a bug in bigjax or below it and keeps its traceback; ``--debug`` shows the traceback always.

Which exceptions are the user's: ``UserError`` and its subclasses wherever raised; ``ValueError``,
``FileNotFoundError``, ``FileExistsError`` and ``KeyError`` raised by bigjax's (or the CLI's) own
validation, i.e. when the innermost frame of the traceback is bigjax code (or the CLI's module); and a full disk (``ENOSPC``)
anywhere in the exception's chain. A ``ValueError`` from inside numpy or JAX is a bug and keeps its
traceback. A flag argparse refuses (an unknown one, a bad value) is one such line too: every CLI builds
its flags with this module's ``ArgumentParser``.
"""

from __future__ import annotations

import argparse
import errno
import sys
import traceback
from collections.abc import Callable, Sequence

__all__ = ["ArgumentParser", "flag_value", "UserError", "Diverged", "Interrupted", "disk_full", "run_cli",
           "EXIT_USAGE", "EXIT_FAILED", "EXIT_INTERRUPTED"]

EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130
VALIDATION_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError)
OWN_PACKAGES = ("bigjax", "experiments")


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose refusals are one ``error: …`` line and exit status 2, as the CLIs'
    other errors, without argparse's usage block (``--help`` still prints it)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {' '.join(message.split())} (--help lists the flags)\n")


def flag_value(parse: Callable[[str], object]) -> Callable[[str], object]:
    """An argparse ``type`` from a parser that raises ValueError: its message (which says what a value
    looks like) becomes argparse's refusal of the flag, where argparse would print only "invalid
    value"."""
    def parse_flag(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse_flag


class UserError(Exception):
    """A mistake the user can fix; its message says what and how, in one line."""

    exit_code = EXIT_USAGE


class Diverged(UserError):
    """Training stopped on a non-finite loss or state; the message names the step and the checkpoint kept.

    ``resume_flags`` (e.g. "--resume --lr=1e-05"), when given, are the flags that continue from the last
    saved checkpoint; the message ends with them, and a CLI may turn them into its whole command.
    """

    exit_code = EXIT_FAILED

    def __init__(self, message: str, resume_flags: str | None = None):
        super().__init__(message if resume_flags is None else f"{message}; continue with {resume_flags}")
        self.reason, self.resume_flags = message, resume_flags


class Interrupted(UserError):
    """Training stopped at a safe point after Ctrl-C; the message says how to continue."""

    exit_code = EXIT_INTERRUPTED


def run_cli(main: Callable[[list[str]], object], argv: Sequence[str] | None = None,
            debug_flag: str = "--debug") -> int:
    """Run ``main(argv)`` and turn what it raises into an exit status (use as ``sys.exit(run_cli(main))``).

    Args:
      main: the CLI's entry point; gets ``argv`` without ``debug_flag``; returns an exit status (anything
        not an int, e.g. None or a results dict, counts as 0).
      argv: the arguments (default ``sys.argv[1:]``).
      debug_flag: the flag that asks for a traceback on every error.
    Returns:
      main's status (0 for None); 2 for a user error, 1 for a stop on divergence, a full disk or a bug,
      130 for Ctrl-C, an argparse exit's own status.
    """
    if argv is None:  # the process's own command line: a host budget restarts it with huge pages
        from bigjax.layers.pages import restart_with_huge_pages  # here: errors itself needs no jax
        restart_with_huge_pages(sys.argv[1:])
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_flag in argv
    try:
        status = main([a for a in argv if a != debug_flag])
    except SystemExit as stop:  # argparse has printed its usage line (status 2)
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)  # sys.exit("message"), as Python itself reports it
        return EXIT_FAILED
    except KeyboardInterrupt as stop:
        return _report(stop, "interrupted (Ctrl-C)", EXIT_INTERRUPTED, debug)
    except Exception as error:  # noqa: BLE001 -- the one place that decides what a user sees
        message, status = _classify(error, own=(*OWN_PACKAGES, main.__module__))
        return _report(error, message, status, debug)
    return status if isinstance(status, int) else 0


def _classify(error: Exception, own: tuple[str, ...]) -> tuple[str | None, int]:
    """(one-line message, exit status) for a user's error; (None, 1) for a bug."""
    if isinstance(error, UserError):
        return _one_line(error), error.exit_code
    full = disk_full(error)
    if full is not None:
        return f"no space left on device{f' writing {full.filename}' if full.filename else ''}", EXIT_FAILED
    if isinstance(error, VALIDATION_ERRORS) and _raised_by(error, own):
        return _one_line(error), EXIT_USAGE
    return None, EXIT_FAILED


def _report(error: BaseException, message: str | None, status: int, debug: bool) -> int:
    if debug or message is None:
        traceback.print_exception(error, file=sys.stderr)
    if message is not None:
        print(f"error: {message}", file=sys.stderr)
    return status


def _one_line(error: Exception) -> str:
    if isinstance(error, KeyError) and len(error.args) == 1:
        text = str(error.args[0])  # str(KeyError) adds quotes
    elif isinstance(error, OSError) and error.strerror and error.filename:
        text = f"{error.filename}: {error.strerror}"
    else:
        text = str(error)
    return " ".join(text.split()) or type(error).__name__


def disk_full(error: BaseException) -> OSError | None:
    """The ENOSPC OSError in ``error``'s chain of causes, or a stand-in when only a message says so."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return error
        if "No space left on device" in str(error):  # tensorstore and orbax wrap it in their own errors
            return OSError(errno.ENOSPC, "No space left on device")
        error = error.__cause__ or error.__context__
    return None


def _raised_by(error: BaseException, own: tuple[str, ...]) -> bool:
    """Whether the innermost frame of the traceback is in one of the ``own`` modules or packages
    (bigjax, the experiments, the CLI's own module): a deliberate raise, not a failure deep in a library."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "")
    return module in own or module.split(".")[0] in own
