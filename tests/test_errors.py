"""One line and an exit status for the user's errors, a traceback for bugs and with --debug."""

import argparse
import errno
import os
import subprocess
import sys

import numpy as np
import pytest

from bigjax.errors import ArgumentParser, Diverged, Interrupted, UserError, run_cli


def raising(error):
    def main(argv):
        raise error
    return main


def lines(text):
    return [line for line in text.splitlines() if line]


@pytest.mark.parametrize("error, status, message", [
    (UserError("--lr=-1: the learning rate must be positive"), 2, "--lr=-1: the learning rate must be positive"),
    (ValueError("layout file a.csv, line 3, column isup_grade: 'abc'\n  is not a grade"), 2,
     "layout file a.csv, line 3, column isup_grade: 'abc' is not a grade"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "runs/x/config.json"), 2,
     "runs/x/config.json: No such file or directory"),
    (FileExistsError("workdir runs/x already holds checkpoints; pass --resume"), 2,
     "workdir runs/x already holds checkpoints; pass --resume"),
    (KeyError("unknown aggregator 'bogus'"), 2, "unknown aggregator 'bogus'"),
    (Diverged("training loss is nan at step 3; the last good checkpoint is step 2"), 1,
     "training loss is nan at step 3; the last good checkpoint is step 2"),
    (Interrupted("stopped at step 12; continue with --resume"), 130, "stopped at step 12; continue with --resume"),
])
def test_user_errors_are_one_line(capsys, error, status, message):
    assert run_cli(raising(error), []) == status
    out, err = capsys.readouterr()
    assert out == "" and lines(err) == [f"error: {message}"]


def test_disk_full_is_one_line_even_when_wrapped(capsys):
    def main(argv):
        try:
            raise OSError(errno.ENOSPC, "No space left on device", "/runs/x/checkpoints/3")
        except OSError as full:
            raise RuntimeError("Event loop is closed") from full
    assert run_cli(main, []) == 1
    assert lines(capsys.readouterr().err) == ["error: no space left on device writing /runs/x/checkpoints/3"]
    assert run_cli(raising(ValueError("tensorstore: ... [OS error: No space left on device]")), []) == 1
    assert lines(capsys.readouterr().err) == ["error: no space left on device"]


def test_keyboard_interrupt(capsys):
    assert run_cli(raising(KeyboardInterrupt()), []) == 130
    assert lines(capsys.readouterr().err) == ["error: interrupted (Ctrl-C)"]


def test_a_bug_keeps_its_traceback(capsys):
    assert run_cli(raising(ZeroDivisionError("division by zero")), []) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "ZeroDivisionError: division by zero" in err
    assert "error:" not in err


def test_value_error_from_inside_a_library_is_a_bug(capsys):
    def main(argv):
        np.stack([])  # ValueError raised inside numpy, not by validation
    assert run_cli(main, []) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "need at least one array" in err and "error:" not in err


def test_debug_shows_the_traceback_and_is_not_passed_on(capsys):
    seen = []

    def main(argv):
        seen.append(argv)
        raise UserError("bad flag")
    assert run_cli(main, ["--epochs=2", "--debug"]) == 2
    err = capsys.readouterr().err
    assert seen == [["--epochs=2"]]
    assert "Traceback" in err and lines(err)[-1] == "error: bad flag"


def test_exit_statuses_of_normal_ends(capsys):
    assert run_cli(lambda argv: None, []) == 0
    assert run_cli(lambda argv: 3, []) == 3
    assert run_cli(lambda argv: {"test_qwk": 0.8}, []) == 0  # a main returning its results
    parser = argparse.ArgumentParser(prog="panda")
    parser.add_argument("--epochs", type=int)
    assert run_cli(lambda argv: parser.parse_args(argv) and 0, ["--epochs=x"]) == 2
    assert "invalid int value" in capsys.readouterr().err


def test_a_refused_flag_is_one_line_without_the_usage_block(capsys):
    parser = ArgumentParser(prog="panda")
    parser.add_argument("--epochs", type=int)
    assert run_cli(lambda argv: parser.parse_args(argv) and 0, ["--epochs=x"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: argument --epochs: invalid int value: 'x' (--help lists the flags)"]
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(["--help"])
    assert stop.value.code == 0 and "usage: panda" in capsys.readouterr().out


def test_a_cli_with_a_bad_layout_prints_one_line(tmp_path):
    """A real process: validation inside bigjax, reported by run_cli as one line with status 2."""
    (tmp_path / "train.csv").write_text("image_id,isup_grade\na,1\nb,abc\n")
    code = ("import sys; from bigjax.errors import run_cli; from bigjax.data.layouts import panda_layout; "
            "sys.exit(run_cli(lambda argv: panda_layout(argv[0]) and 0))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=os.getcwd()), timeout=60)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"error: layout file {tmp_path / 'train.csv'}, line 3, column isup_grade: "
                                        f"'abc' is not a class label (an integer 0..5)"]
