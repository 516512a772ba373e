"""One process per folder: a second process is refused naming the holder's pid; a dead holder's lock
is taken over; the CLIs refuse a workdir or store another process holds, before any work."""

import os
import subprocess
import sys
import textwrap

import pytest

from bigjax import lock

HOLDER = textwrap.dedent("""
    import sys, time
    from bigjax import lock
    with lock.hold(sys.argv[1], "a test holder"):
        print("held", flush=True)
        time.sleep(120)
""")


def env():
    return dict(os.environ, PYTHONPATH=os.getcwd())


@pytest.fixture
def holder(tmp_path):
    """A live process holding ``tmp_path/run.lock``; killed with SIGKILL at the end if still alive."""
    procs = []

    def start(lock_file):
        p = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock_file)], env=env(), text=True,
                             stdout=subprocess.PIPE)
        assert p.stdout.readline().strip() == "held"
        procs.append(p)
        return p
    yield start
    for p in procs:
        p.kill()
        p.wait()


def test_a_second_process_is_refused_naming_the_holder(tmp_path, holder):
    p = holder(tmp_path / lock.RUN_LOCK)
    with pytest.raises(lock.FolderInUse, match=rf"{tmp_path} is in use by process {p.pid} \(a test holder\) "):
        with lock.hold(tmp_path / lock.RUN_LOCK, "a run"):
            pass


def test_a_dead_holders_lock_is_taken_over(tmp_path, holder, caplog):
    p = holder(tmp_path / lock.RUN_LOCK)
    p.kill()  # SIGKILL: no clean-up ran, the pid stays in the file
    p.wait()
    assert (tmp_path / lock.RUN_LOCK).read_text() == f"{p.pid} a test holder\n"
    with caplog.at_level("INFO", logger="bigjax.lock"):
        with lock.hold(tmp_path / lock.RUN_LOCK, "a run"):
            assert (tmp_path / lock.RUN_LOCK).read_text() == f"{os.getpid()} a run\n"
    assert f"taking over the lock of process {p.pid} (a test holder), which is no longer running" in caplog.text
    assert (tmp_path / lock.RUN_LOCK).read_text() == ""  # a clean end leaves no stale pid


def test_the_lock_is_reentrant_in_one_process(tmp_path):
    with lock.hold(tmp_path / "x.lock", "a run"):
        with lock.hold(tmp_path / "x.lock", "a run"):
            pass
        # still held after the inner block: another process is refused
        probe = subprocess.run([sys.executable, "-c", "import sys; from bigjax import lock\n"
                                "with lock.hold(sys.argv[1], 'p'): pass", str(tmp_path / "x.lock")],
                               env=env(), capture_output=True, text=True, timeout=60)
        assert probe.returncode == 1 and "FolderInUse" in probe.stderr and str(os.getpid()) in probe.stderr


@pytest.mark.parametrize("cli, lock_file", [
    (["experiments.panda", "--eval_only"], lock.RUN_LOCK),
    (["experiments.panda", "--encoder=precomputed"], lock.RUN_LOCK),
    (["experiments.tile", "--layout=synthetic", "--data_dir=DATA", "--n_slides=2", "--side=64,96"],
     lock.TILING_LOCK),
])
def test_the_clis_refuse_a_folder_in_use_in_one_line(tmp_path, holder, cli, lock_file):
    """The panda CLI (training and --eval_only) on a held workdir, the tiler on a held store: exit 2,
    one line naming the pid, before any work (no data generated)."""
    folder = tmp_path / "run"
    p = holder(folder / lock_file)
    flags = [f.replace("DATA", str(tmp_path / "data")) for f in cli[1:]]
    flags += [f"--workdir={folder}", "--no_progress"] if "panda" in cli[0] else [f"--out={folder}"]
    done = subprocess.run([sys.executable, "-m", cli[0], *flags], env=env(), capture_output=True, text=True,
                          timeout=120)
    lines = [l for l in done.stderr.splitlines() if l.startswith("error:")]
    assert done.returncode == 2, done.stderr
    assert lines == [l for l in done.stderr.splitlines() if "Traceback" in l or l.startswith("error:")]
    assert len(lines) == 1 and f"{folder} is in use by process {p.pid} (a test holder)" in lines[0]
    assert not any(p.exists() for p in (folder / "data", folder / "slides", tmp_path / "data"))


def test_the_whole_slide_trainer_refuses_a_workdir_in_use(tmp_path, holder):
    from bigjax.data.layouts import SlideEntry
    from bigjax.local.wholeslide import WholeSlideConfig, train_wholeslide

    p = holder(tmp_path / lock.RUN_LOCK)
    slides = [SlideEntry("a", tmp_path / "a.tiff", 1, "train")]
    with pytest.raises(lock.FolderInUse, match=rf"in use by process {p.pid} \(a test holder\)"):
        train_wholeslide(WholeSlideConfig(workdir=str(tmp_path)), slides, network=object())
