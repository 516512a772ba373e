"""Ctrl-C becomes a stop request that a garbage-collector callback cannot swallow."""

import gc
import os
import signal
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
        sum(range(100_000))  # the handler runs here, inside the callback


signal_in_callback = [False]


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
    collect_with_signal_inside()  # the default handler: KeyboardInterrupt raised there, and dropped
    assert dropped == [KeyboardInterrupt]
    with stop_on_interrupt() as stop:
        collect_with_signal_inside()
        assert stop.requested()
    assert dropped == [KeyboardInterrupt]
