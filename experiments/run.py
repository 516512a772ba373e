"""Run a training experiment from its parsed flags: --eval_only, or prepare the store and train."""

from __future__ import annotations

import argparse
import logging
from typing import Callable

from bigjax.train.loop import NonFiniteLossError, evaluate_run, train
from experiments.presets import Preset

__all__ = ["run"]


def run(a: argparse.Namespace, preset: Preset, prepare: Callable[[], None]) -> int:
    """--eval_only, or ``prepare()`` the store and train; a NaN/inf loss exits 1 with its message."""
    # force: a library imported earlier may have configured the root logger (INFO lines were lost)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
    config = preset.train
    if a.eval_only:
        evaluate_run(config.workdir, manifest=a.eval_manifest, progress=config.progress)
        return 0
    prepare()
    try:
        train(config, resume=a.resume)
    except NonFiniteLossError as err:
        logging.error("%s", err)
        return 1
    return 0
