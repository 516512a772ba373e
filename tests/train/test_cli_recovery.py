"""The panda CLI in a subprocess on the tiny store: a diverged run names its last saved step and the
exact command that continues from it with a lower --lr; that command with a setting that defines the
run's steps changed is refused, naming it."""

import os
import shlex
import subprocess
import sys

import pytest

from experiments import run as cli_run


def panda(*flags, timeout=300):
    return subprocess.run([sys.executable, "-m", "experiments.panda", *flags], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=os.getcwd()), timeout=timeout)


def errors(done):
    return [line for line in done.stderr.splitlines() if line.startswith("error:") or "Traceback" in line]


def test_a_diverged_run_says_how_to_continue_and_a_changed_batch_is_refused(store, tmp_path):
    flags = [f"--store={store}", "--tile_size=16", f"--workdir={tmp_path}", "--encoder=precomputed",
             "--epochs=1", "--batch_size=2", "--tiles_per_bag=4", "--accum=1", "--checkpoint_every=1",
             "--no_progress", "--lr", "1e38"]  # "--lr 1e38": two arguments, replaced in the command
    done = panda(*flags)
    assert done.returncode == 1, done.stderr
    [line] = errors(done)
    assert "training loss is nan at step 2" in line
    assert f"the last good checkpoint, of step 1 in {tmp_path / 'checkpoints'}, is kept" in line
    command = line.split("; continue with: ")[1]
    assert command == shlex.join(["python", "-m", "experiments.panda", *flags[:-2], "--resume", "--lr=1e+37"])

    refused = panda(*shlex.split(command)[3:], "--batch_size=4", "--tiles_per_bag=8")
    assert refused.returncode == 2, refused.stderr
    [line] = errors(refused)
    assert line.startswith(f"error: --resume of {tmp_path} with other settings (batch_size: 4 (was 2); "
                           "tiles_per_bag: 8 (was 4))")


@pytest.mark.parametrize("argv, expected", [
    (["--lr=0.1", "--epochs=2"], ["--epochs=2", "--resume", "--lr=0.01"]),
    (["--resume", "--lr", "0.1", "--workdir=a b"], ["'--workdir=a b'", "--resume", "--lr=0.01"]),
])
def test_the_continue_command_replaces_resume_and_lr(monkeypatch, argv, expected):
    monkeypatch.setattr(sys, "argv", ["panda.py", *argv])
    monkeypatch.setattr(sys.modules["__main__"], "__spec__", None, raising=False)
    assert cli_run.continue_command("--resume --lr=0.01") == " ".join(["python", "panda.py", *expected])
