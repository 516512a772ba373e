"""Library INFO off the console (or into a file), warnings kept, event-loop noise dropped."""

import logging
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import orbax.checkpoint as ocp
import pytest

from bigjax.logs import NOISY_LOGGERS, quiet_libraries


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.NOTSET)
        self.records = []

    def emit(self, record):
        self.records.append(record)

    def of_libraries(self, level):
        return [r for r in self.records if r.levelno == level and r.name.split(".")[0] in
                {n.split(".")[0] for n in NOISY_LOGGERS}]


@pytest.fixture
def console(monkeypatch):
    """The root logger at INFO, as the CLIs configure it, with a handler recording what reaches it;
    the logging state and hooks that quiet_libraries changes come back afterwards."""
    loggers = [logging.getLogger(name) for name in (*NOISY_LOGGERS, "asyncio")]
    saved = [(lg, lg.level, lg.propagate, list(lg.handlers), list(lg.filters)) for lg in loggers]
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    root, records = logging.getLogger(), Records()
    root_level = root.level
    root.setLevel(logging.INFO)  # setLevel, not the attribute: loggers cache isEnabledFor
    root.addHandler(records)
    yield records
    root.removeHandler(records)
    root.setLevel(root_level)
    for logger, level, propagate, handlers, filters in saved:
        for added in set(logger.handlers) - set(handlers):
            added.close()
        logger.handlers[:], logger.filters[:] = handlers, filters
        logger.propagate = propagate
        logger.setLevel(level)


def save_and_restore(path):
    manager = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
    tree = {"w": np.arange(3.0)}
    manager.save(1, args=ocp.args.StandardSave(tree))
    restored = manager.restore(1, args=ocp.args.StandardRestore(tree))
    manager.close()
    np.testing.assert_array_equal(restored["w"], tree["w"])


def test_orbax_info_leaves_the_console_warnings_stay(console, tmp_path):
    save_and_restore(tmp_path / "before")
    assert len(console.of_libraries(logging.INFO)) > 5  # what the issue counted: ~690 lines of a short run
    console.records.clear()
    quiet_libraries()
    save_and_restore(tmp_path / "after")
    assert console.of_libraries(logging.INFO) == []
    logging.getLogger("absl").warning("a real warning")
    logging.getLogger("jax._src.xla_bridge").info("Unable to initialize backend 'tpu'")
    assert [r.getMessage() for r in console.records] == ["a real warning"]


def test_library_info_goes_to_the_log_file(console, tmp_path):
    quiet_libraries(tmp_path / "first.log")
    quiet_libraries(tmp_path / "run.log")  # again, for another workdir: one file handler
    save_and_restore(tmp_path / "ckpt")
    logging.getLogger("absl").warning("a real warning")
    assert console.of_libraries(logging.INFO) == []
    assert [r.getMessage() for r in console.records] == ["a real warning"]
    text = (tmp_path / "run.log").read_text()
    assert "INFO absl:" in text and "a real warning" in text
    assert "a real warning" not in (tmp_path / "first.log").read_text()


def test_event_loop_closed_noise_is_dropped(console):
    seen = []
    threading.excepthook = lambda args: seen.append(str(args.exc_value))
    quiet_libraries()

    def fail(message):
        raise RuntimeError(message)
    for message in ("Event loop is closed", "a real failure"):
        thread = threading.Thread(target=fail, args=(message,))
        thread.start()
        thread.join()
    assert seen == ["a real failure"]
    logging.getLogger("asyncio").error("Task exception was never retrieved: RuntimeError: Event loop is closed")
    logging.getLogger("absl").error("Event loop is closed")
    logging.getLogger("absl").error("No space left on device")
    assert [r.getMessage() for r in console.records] == ["No space left on device"]


def test_coroutines_a_library_abandoned_print_nothing_at_exit(tmp_path):
    """After a failed save (a full disk), orbax leaves write coroutines that never ran; Python warns
    about each when it collects them, at exit, after the run's one-line error."""
    script = tmp_path / "abandon.py"
    script.write_text(textwrap.dedent("""
        import sys
        from bigjax.logs import quiet_libraries
        if sys.argv[1] == "quiet":
            quiet_libraries()
        async def write_fragment():
            pass
        abandoned = write_fragment()
        del abandoned
    """))
    runs = {how: subprocess.run([sys.executable, str(script), how], capture_output=True, text=True,
                                env=dict(os.environ, PYTHONPATH=os.getcwd()), timeout=120)
            for how in ("loud", "quiet")}
    assert "was never awaited" in runs["loud"].stderr  # what the filter is for
    assert runs["quiet"].returncode == 0 and runs["quiet"].stderr == ""
