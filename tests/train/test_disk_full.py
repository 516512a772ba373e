"""A full disk while saving, for real: a small tmpfs mounted for the test (root only; skipped, with the
reason, where mounting is not permitted). The save fails in one line naming the folder and the size of
a checkpoint, nothing of the libraries' tracebacks reaches the console (they are in libraries.log), and
the previous step is intact."""

import os
import subprocess
import sys
import textwrap

import pytest

SAVER = textwrap.dedent("""
    import logging, os, sys
    from pathlib import Path
    from bigjax.errors import run_cli
    from bigjax.logs import quiet_libraries

    def main(argv):
        workdir = Path(argv[0])
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
        quiet_libraries(log_file=workdir / "libraries.log")  # as the CLIs do: on the same (full) disk
        import optax
        from flax import nnx
        from bigjax.models import mil
        from bigjax.train.checkpoint import RunCheckpoints
        model = mil.build("abmil", 64, 3, rngs=nnx.Rngs(0), hidden=512, attn_dim=128)
        opt = nnx.Optimizer(model, optax.adam(0.1), wrt=nnx.Param)
        checkpoints = RunCheckpoints(workdir)
        checkpoints.save(1, model, opt, {"step": 1}, best=True)
        disk = os.statvfs(workdir)
        (workdir / "filler").write_bytes(b"x" * (disk.f_bavail * disk.f_frsize - 200_000))  # ~1/3 step left
        checkpoints.save(2, model, opt, {"step": 2}, best=True)

    sys.exit(run_cli(main))
""")


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs at tmp_path/disk, unmounted afterwards."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs to fill ({mounted.stderr.strip() or 'mount failed'}); the disk-full "
                    "path is then untested here")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_is_one_line_and_the_previous_step_is_intact(small_disk, tmp_path):
    import optax
    from flax import nnx

    from bigjax.models import mil
    from bigjax.train.checkpoint import RunCheckpoints

    workdir = small_disk / "run"
    workdir.mkdir()
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    done = subprocess.run([sys.executable, str(script), str(workdir)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=os.getcwd()), timeout=300)
    assert done.returncode == 1
    console = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(console) == 1, done.stderr
    line = console[0]
    assert line.startswith(f"error: no space left on device saving step 2 in {workdir / 'checkpoints'}: "
                           "a checkpoint takes ")
    assert " MiB are free; the previous step, 1, is intact; free space there" in line
    log = (workdir / "libraries.log").read_text()
    assert "Traceback" in log and "No space left on device" in log  # orbax's tracebacks kept in the file
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1"]  # the unfinished step removed

    (workdir / "filler").unlink()
    model = mil.build("abmil", 64, 3, rngs=nnx.Rngs(1), hidden=512, attn_dim=128)
    opt = nnx.Optimizer(model, optax.adam(0.1), wrt=nnx.Param)
    checkpoints = RunCheckpoints(workdir)
    assert checkpoints.restore_latest(model, opt) == {"step": 1}
    assert checkpoints.restore_best(model) == {"step": 1}
    checkpoints.close()
