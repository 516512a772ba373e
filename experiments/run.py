"""Run a training experiment from its parsed flags: --eval_only, or prepare the store and train.

Library INFO logs (orbax, absl) go to ``<workdir>/libraries.log``, not the console; Ctrl-C stops at the
end of the current step with the latest checkpoint saved; errors reach the user as one line through
``bigjax.errors.run_cli`` (the CLIs' ``__main__``). A workdir another run holds is refused before any
work (``bigjax.lock``). ``--processes=P``: after preparing the store the
CLI starts itself again as P processes of one run (``bigjax.parallel.launch``, loopback) and waits.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path
from typing import Callable

from bigjax.data.manifest import read_manifest
from bigjax.data.tiling import TilingConfig, check_tiling
from bigjax.errors import Diverged
from bigjax.logs import quiet_libraries
from bigjax.parallel import distributed, launch
from bigjax.train.interrupt import stop_on_interrupt
from bigjax.train.loop import evaluate_run, train, workdir_lock
from experiments.presets import Preset

__all__ = ["run", "store_ready", "continue_command"]


def store_ready(preset: Preset, tiling: TilingConfig) -> bool:
    """Whether the run's store is tiled as ``tiling`` asks with no failed slide (those are retried).

    A store tiled otherwise (tile size, foreground rule or magnification) is refused, naming each."""
    config = preset.train
    if not config.manifest_path.is_file():
        return False
    check_tiling(config.store, tile_size=tiling.tile_size, rule=tiling.rule, mpp=tiling.mpp)
    failed = [r.slide_id for r in read_manifest(config.manifest_path) if r.status == "failed"]
    if failed:
        logging.info("retrying %d slide(s) that failed tiling: %s", len(failed), ", ".join(failed[:5]))
    return not failed


def run(a: argparse.Namespace, preset: Preset, prepare: Callable[[], None]) -> int:
    """--eval_only, or ``prepare()`` the store and train (Ctrl-C: save, stop, say how to resume)."""
    # force: a library imported earlier may have configured the root logger (INFO lines were lost)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    config = preset.train
    Path(config.workdir).mkdir(parents=True, exist_ok=True)
    quiet_libraries(log_file=Path(config.workdir) / "libraries.log")
    if a.eval_only:
        evaluate_run(config.workdir, manifest=a.eval_manifest, progress=config.progress)
        return 0
    if a.processes > 1 and not distributed.launched():
        with workdir_lock(config.workdir):  # a second run on this workdir is refused before any work
            prepare()
        return _relaunch(a.processes)  # process 0 of the run takes the workdir's lock
    with workdir_lock(config.workdir):
        prepare()
        with stop_on_interrupt() as stop:
            try:
                train(config, resume=a.resume, should_stop=stop.requested)
            except Diverged as error:
                if error.resume_flags is None:
                    raise
                raise Diverged(f"{error.reason}; continue with: {continue_command(error.resume_flags)}") from None
    return 0


def continue_command(resume_flags: str) -> str:
    """This command with ``resume_flags`` (e.g. ``--resume --lr=1e-05``) in place of its own of those."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    program = ["python", "-m", spec.name] if spec is not None else ["python", sys.argv[0]]
    replaced = {flag.split("=")[0] for flag in resume_flags.split()}
    given, kept = iter(sys.argv[1:]), []
    for arg in given:
        name = arg.split("=")[0]
        if name not in replaced:
            kept.append(arg)
        elif name != "--resume" and "=" not in arg:
            next(given, None)  # "--lr 0.1": its value too
    return shlex.join(program + kept + resume_flags.split())


def _relaunch(processes: int) -> int:
    """This CLI (``python -m`` module and arguments) as ``processes`` processes of one run."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    if spec is None:
        raise ValueError(f"--processes={processes} starts the CLI again as python -m MODULE: run it "
                         "as python -m experiments.<name>")
    logging.info("starting %d processes of %s", processes, spec.name)
    return launch.launch(processes, spec.name, sys.argv[1:])
