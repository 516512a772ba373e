"""How a host budget hands freed activations back to the OS, and what that costs in page faults.

A spill store bounds the resident set only if a freed activation leaves it. glibc keeps freed buffers
below its mmap threshold in its heap, so ``return_freed_buffers`` lowers that threshold to 1 MiB: every
buffer of that size or more gets a mapping of its own and goes back to the OS when freed. Each new
mapping then faults in, 4 KiB page by page. At 4096² (an all-big ResNet-18 step in RAM) that took the
step from 39.8 s to 57.6 s for a 13 % lower peak. With transparent huge pages on those mappings (2 MiB,
512 times fewer faults) it took 44.9 s at the same peak, and a spilled step 47.5 s instead of 69.0 s
(docs/benchmarks.md, fifth session).

glibc asks for them when started with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, where the kernel's
THP mode is ``madvise`` (its default). A tunable is read when the process starts, so a running process
cannot set it: a CLI whose command line sets ``--host_memory`` or ``--spill_dir`` restarts itself,
once, with it (``restart_with_huge_pages``, from ``errors.run_cli``), and a spill store made any
other way logs the advice once per process (``advise_huge_pages``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import sys
from pathlib import Path

__all__ = ["return_freed_buffers", "huge_pages_hint", "advise_huge_pages", "restart_with_huge_pages",
           "HUGE_PAGES"]

HUGE_PAGES = "glibc.malloc.hugetlb=1"
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"
_M_MMAP_THRESHOLD = -3


def return_freed_buffers(threshold: int = 2**20) -> bool:
    """Make glibc serve allocations of ``threshold`` bytes or more with their own mappings, so a
    freed activation goes back to the OS at once (``mallopt(M_MMAP_THRESHOLD)``).

    By default glibc raises that threshold to 32 MiB after the first large free, and buffers freed
    below it stay in its heap: an all-big step at 1024^2 then holds ~0.2 GiB more at its peak
    (docs/benchmarks.md, issue 21). Returns whether the setting took (False off glibc)."""
    try:
        return bool(ctypes.CDLL(ctypes.util.find_library("c")).mallopt(_M_MMAP_THRESHOLD,
                                                                       threshold))
    except (OSError, AttributeError, TypeError):
        return False


def huge_pages_hint(environ=os.environ, thp_mode: str | os.PathLike = THP_MODE) -> str | None:
    """The advice to start this process under ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``; None where
    the tunable is set already or would not help (THP ``always`` has huge pages without asking,
    ``never`` refuses them, and without the file there is no THP)."""
    if HUGE_PAGES in environ.get("GLIBC_TUNABLES", ""):
        return None
    try:
        mode = Path(thp_mode).read_text()
    except OSError:
        return None
    if "[madvise]" not in mode:
        return None
    return ("a host budget maps every freed buffer back to the OS; start the process with "
            f"GLIBC_TUNABLES={HUGE_PAGES} so those mappings use huge pages (a fifth to a third less "
            "time at 4096², docs/benchmarks.md)")


@functools.cache
def advise_huge_pages() -> None:
    """Log ``huge_pages_hint``'s advice, once per process, where it applies."""
    hint = huge_pages_hint()
    if hint is not None:
        logging.getLogger(__name__).info(hint)


def restart_with_huge_pages(argv, environ=os.environ, execve=os.execve,
                            thp_mode: str | os.PathLike = THP_MODE) -> None:
    """Replace this process by the same command under ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` when
    ``argv`` (the process's own command line) sets ``--host_memory`` or ``--spill_dir`` (a budget by
    another name: ``machine_fit --check --budget``) and ``huge_pages_hint`` applies; else return. The
    restarted process has the tunable, so it does not restart again."""
    budgeted = any(a.startswith(("--host_memory", "--spill_dir")) for a in argv)
    if not budgeted or huge_pages_hint(environ, thp_mode) is None:
        return
    tunables = ":".join(filter(None, (environ.get("GLIBC_TUNABLES"), HUGE_PAGES)))
    sys.stdout.flush()
    sys.stderr.flush()
    execve(sys.executable, sys.orig_argv, {**environ, "GLIBC_TUNABLES": tunables})
