"""Start P processes of one multi-process run on this machine (loopback, a free port).

    python -m bigjax.parallel.launch -n 2 -- experiments.panda --encoder=big --devices=2

runs ``python -m <module> <args>`` P times with ``JAX_COORDINATOR_ADDRESS=127.0.0.1:<port>``,
``JAX_NUM_PROCESSES=P`` and ``JAX_PROCESS_ID=i``; the module calls
``bigjax.parallel.distributed.initialize()`` first. Process i's output lines are prefixed ``[i]``.
If one process fails, the others are stopped and the launcher exits with its status.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time

from bigjax.errors import ArgumentParser

__all__ = ["free_port", "launch", "main"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _relay(i: int, stream, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"[{i}] {line}")
        out.flush()


def launch(n: int, module: str, args: list[str], *, env: dict | None = None,
           timeout: float | None = None) -> int:
    """Run ``python -m module *args`` as processes 0..n-1 of one run; the first failing status, or 0.

    Args:
      env: extra environment variables for every process.
      timeout: seconds before every process still running is stopped (status 124).
    """
    if n < 1:
        raise ValueError(f"-n must be at least 1, got {n}")
    address = f"127.0.0.1:{free_port()}"
    procs = []
    for i in range(n):
        penv = {**os.environ, **(env or {}), "JAX_COORDINATOR_ADDRESS": address,
                "JAX_NUM_PROCESSES": str(n), "JAX_PROCESS_ID": str(i)}
        procs.append(subprocess.Popen([sys.executable, "-m", module, *args], env=penv, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    relays = [threading.Thread(target=_relay, args=(i, p.stdout, sys.stdout), daemon=True)
              for i, p in enumerate(procs)]
    for t in relays:
        t.start()
    status = _wait(procs, timeout)
    for t in relays:
        t.join(timeout=5)
    return status


def _wait(procs, timeout) -> int:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        codes = [p.poll() for p in procs]
        failed = [c for c in codes if c not in (None, 0)]
        late = deadline is not None and time.monotonic() > deadline
        if failed or late or all(c == 0 for c in codes):
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                p.wait()
            return failed[0] if failed else 124 if late else 0
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m bigjax.parallel.launch",
                            description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--processes", type=int, required=True, help="number of processes")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before stopping all")
    parser.add_argument("module", help="python module to run (as python -m)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    opts = parser.parse_args(argv)
    return launch(opts.processes, opts.module, opts.args, timeout=opts.timeout)


if __name__ == "__main__":
    sys.exit(main())
