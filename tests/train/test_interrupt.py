"""Ctrl-C becomes a stop request that a garbage-collector callback cannot swallow."""

import gc
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from bigjax.train.interrupt import stop_on_interrupt


def interrupt_self(sig=signal.SIGINT):
    os.kill(os.getpid(), sig)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # Python runs the handler between bytecodes, soon after
        time.sleep(0.001)


def test_first_interrupt_is_recorded_not_raised(capfd):
    before = signal.getsignal(signal.SIGINT)
    with stop_on_interrupt() as stop:
        assert not stop.requested()
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(1000):
            if stop.requested():
                break
            time.sleep(0.001)
        assert stop.requested() and stop.signal == "SIGINT"
    assert signal.getsignal(signal.SIGINT) is before
    assert "stopping after this step" in capfd.readouterr().err


def test_second_interrupt_raises():
    with pytest.raises(KeyboardInterrupt), stop_on_interrupt() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        while not stop.requested():
            time.sleep(0.001)
        interrupt_self()
    assert stop.requested()


def test_other_signals_on_request():
    with stop_on_interrupt((signal.SIGINT, signal.SIGTERM)) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        while not stop.requested():
            time.sleep(0.001)
    assert stop.signal == "SIGTERM"


def busy_gc_callback(phase, info):
    """Stands for JAX's _xla_gc_callback: Python code running inside a garbage collection."""
    if phase == "start" and signal_in_callback[0]:
        signal_in_callback[0] = False
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.monotonic() + 5  # the handler runs here, inside the callback, however loaded
        while time.monotonic() < deadline and not (watched[0] and watched[0].requested()):
            time.sleep(0.001)


signal_in_callback = [False]
watched = [None]  # the stop_on_interrupt in force, if any


def collect_with_signal_inside():
    signal_in_callback[0] = True
    gc.callbacks.append(busy_gc_callback)
    try:
        gc.collect()
    finally:
        gc.callbacks.remove(busy_gc_callback)


def test_an_interrupt_inside_a_gc_callback_is_not_lost(monkeypatch):
    dropped = []
    monkeypatch.setattr(sys, "unraisablehook", lambda info: dropped.append(info.exc_type))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # whatever ran before us
    try:
        collect_with_signal_inside()  # the default handler: KeyboardInterrupt raised there, dropped
    finally:
        signal.signal(signal.SIGINT, previous)
    assert dropped == [KeyboardInterrupt]
    with stop_on_interrupt() as stop:
        watched[0] = stop
        try:
            collect_with_signal_inside()
        finally:
            watched[0] = None
        assert stop.requested()
    assert dropped == [KeyboardInterrupt]


TRAINER = """
import sys
import jax.numpy as jnp
from bigjax.errors import Interrupted, run_cli
from bigjax.train.interrupt import stop_on_interrupt


def main(argv):
    x = jnp.ones((64, 64))
    with stop_on_interrupt() as stop:
        print("ready", flush=True)
        for step in range(1, 10**7):
            x = jnp.tanh(x @ x.T * 1e-3)  # device arrays die each step: JAX's gc callback runs often
            cycle = []
            cycle.append(cycle)
            if stop.requested():
                raise Interrupted(f"stopped at step {step}; continue with --resume")


sys.exit(run_cli(main))
"""


@pytest.mark.slow
def test_ctrl_c_stops_a_jax_loop_every_time(tmp_path):
    """Ctrl-C at random moments of a JAX loop: each run stops between steps with status 130 and one line."""
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    for attempt in range(5):
        child = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(random.Random(attempt).uniform(0.1, 1.0))
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
        assert child.returncode == 130, (attempt, err)
        lines = [line for line in err.splitlines() if line]
        assert lines[0].startswith("interrupted: stopping after this step"), err
        assert lines[1].startswith("error: stopped at step ") and lines[1].endswith("continue with --resume")
        assert len(lines) == 2, err
