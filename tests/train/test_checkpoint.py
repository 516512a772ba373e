"""orbax checkpoints of model + optimiser state: exact round trip, RNG streams, best and latest in one commit."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from bigjax.errors import Diverged
from bigjax.models import mil
from bigjax.train.checkpoint import RunCheckpoints
from bigjax.train.optim import make_optimizer


def model_and_optimizer(seed):
    model = mil.build("abmil", 8, 3, rngs=nnx.Rngs(seed), hidden=16, attn_dim=8, dropout=0.5)  # RNG streams
    tx = make_optimizer(lr=1e-2, accum=2, schedule="cosine", steps_per_epoch=2, epochs=2)
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


@nnx.jit
def step(model, optimizer, x, label=1):
    grads = nnx.grad(lambda m: mil.bag_loss(m(x, train=True), label))(model)
    optimizer.update(model, grads)


def leaves(*objs):
    return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
                       else x) for x in jax.tree.leaves(nnx.state(objs))]


def test_round_trip_then_identical_steps(tmp_path):
    x = jax.random.normal(jax.random.key(0), (7, 8))
    model, opt = model_and_optimizer(0)
    step(model, opt, x)  # mid-accumulation: MultiSteps holds a gradient
    checkpoints = RunCheckpoints(tmp_path)
    checkpoints.save(1, model, opt, {"step": 1, "best": 0.5})
    other, other_opt = model_and_optimizer(3)
    assert checkpoints.restore_latest(other, other_opt) == {"step": 1, "best": 0.5}
    for a, b in zip(leaves(model, opt), leaves(other, other_opt)):
        np.testing.assert_array_equal(a, b)
    for _ in range(3):  # the same pseudo-bag draws and updates afterwards
        step(model, opt, x)
        step(other, other_opt, x)
    for a, b in zip(leaves(model, opt), leaves(other, other_opt)):
        np.testing.assert_array_equal(a, b)


def test_best_is_kept_beyond_the_latest(tmp_path):
    model, opt = model_and_optimizer(0)
    checkpoints = RunCheckpoints(tmp_path, keep=1)
    checkpoints.save(1, model, opt, {"step": 1}, best=True)
    best_kernel = np.asarray(model.classifier.kernel[...])
    step(model, opt, jnp.ones((5, 8)))
    step(model, opt, jnp.ones((5, 8)))
    checkpoints.save(2, model, opt, {"step": 2})
    checkpoints.save(3, model, opt, {"step": 3})
    assert checkpoints.latest.all_steps() == [1, 3]  # step 2 went; step 1 stays as the best
    assert (checkpoints.latest_step(), checkpoints.best_step()) == (3, 1)
    fresh, _ = model_and_optimizer(9)
    assert checkpoints.restore_best(fresh) == {"step": 1}
    np.testing.assert_array_equal(fresh.classifier.kernel[...], best_kernel)
    checkpoints.save(4, model, opt, {"step": 4}, best=True)  # a new best frees the old one
    assert checkpoints.latest.all_steps() == [4]


def test_resaving_a_step_as_best_moves_the_best(tmp_path):
    model, opt = model_and_optimizer(0)
    checkpoints = RunCheckpoints(tmp_path)
    checkpoints.save(1, model, opt, {"step": 1}, best=True)
    checkpoints.save(2, model, opt, {"step": 2})
    checkpoints.save(2, model, opt, {"step": 2, "again": True})  # no-op
    assert checkpoints.restore_latest(model, opt) == {"step": 2}
    checkpoints.save(2, model, opt, {"step": 2, "best_step": 2}, best=True)
    assert checkpoints.best_step() == 2
    assert checkpoints.restore_best(model) == {"step": 2, "best_step": 2}


def test_nothing_to_restore(tmp_path):
    model, opt = model_and_optimizer(0)
    checkpoints = RunCheckpoints(tmp_path)
    assert checkpoints.restore_latest(model, opt) is None
    assert checkpoints.restore_best(model) is None
    checkpoints.save(1, model, opt, {"step": 1})
    assert checkpoints.restore_best(model) is None  # no step was saved as best


def test_one_committed_folder_per_save(tmp_path):
    model, opt = model_and_optimizer(0)
    RunCheckpoints(tmp_path).save(4, model, opt, {"step": 4}, best=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4"]
    assert {"model", "opt", "meta", "best"} <= {p.name for p in (tmp_path / "checkpoints" / "4").iterdir()}
    assert not any("tmp" in p.name for p in tmp_path.rglob("*"))


def test_a_non_finite_state_is_never_saved(tmp_path):
    model, opt = model_and_optimizer(0)
    checkpoints = RunCheckpoints(tmp_path)
    checkpoints.save(1, model, opt, {"step": 1}, best=True)
    model.embed.kernel[...] = model.embed.kernel[...].at[0, :3].set(jnp.nan)
    with pytest.raises(Diverged, match=r"refusing to save step 2: 3 non-finite values in the model and optimiser "
                                       r"state, 3 of them in model/embed/kernel"):
        checkpoints.save(2, model, opt, {"step": 2}, best=True)
    assert checkpoints.latest.all_steps() == [1] and checkpoints.best_step() == 1


def test_an_older_layout_is_refused_by_name(tmp_path):
    (tmp_path / "best" / "3").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"older bigjax \(best/ apart from checkpoints/\)"):
        RunCheckpoints(tmp_path)


def test_meta_round_trips(tmp_path):
    model, opt = model_and_optimizer(0)
    checkpoints = RunCheckpoints(tmp_path)
    checkpoints.save(1, model, opt, {"step": 1, "best": None, "loss_sum": 1.5})
    assert checkpoints.restore_latest(model, opt)["loss_sum"] == 1.5


class Killed(BaseException):
    """Stands for a kill -9: nothing after it runs."""


@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
def test_kill_inside_the_best_write_keeps_the_previous_best(tmp_path, monkeypatch):
    model, opt = model_and_optimizer(0)
    checkpoints = RunCheckpoints(tmp_path)
    checkpoints.save(1, model, opt, {"step": 1, "best_step": 1}, best=True)
    best_kernel = np.asarray(model.classifier.kernel[...])
    checkpoints.save(2, model, opt, {"step": 2, "best_step": 1})
    step(model, opt, jnp.ones((5, 8)))
    real = ocp.StandardCheckpointHandler.async_save
    calls = []

    def killed_on_second_item(self, *args, **kwargs):  # the model is written, the optimiser is not
        calls.append(1)
        if len(calls) == 2:
            raise Killed()
        return real(self, *args, **kwargs)
    monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", killed_on_second_item)
    with pytest.raises(Killed):
        checkpoints.save(3, model, opt, {"step": 3, "best_step": 3}, best=True)
    monkeypatch.undo()
    assert any("tmp" in p.name for p in (tmp_path / "checkpoints").iterdir())  # the half-written step

    restarted = RunCheckpoints(tmp_path)  # the next process
    fresh, fresh_opt = model_and_optimizer(7)
    meta = restarted.restore_latest(fresh, fresh_opt)
    assert meta == {"step": 2, "best_step": 1} and restarted.best_step() == meta["best_step"]
    assert restarted.restore_best(fresh) == {"step": 1, "best_step": 1}
    np.testing.assert_array_equal(fresh.classifier.kernel[...], best_kernel)
    assert not any("tmp" in p.name for p in (tmp_path / "checkpoints").iterdir())  # cleaned at start


SAVER = """
import sys
from flax import nnx
import optax
from bigjax.errors import Diverged
from bigjax.models import mil
from bigjax.train.checkpoint import RunCheckpoints
model = mil.build("abmil", 8, 3, rngs=nnx.Rngs(0), hidden=16, attn_dim=8)
opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
checkpoints = RunCheckpoints(sys.argv[1])
print("ready", flush=True)
for step in range((checkpoints.latest_step() or 0) + 1, 10_000):
    best = step % 3 == 0
    best_step = step if best else checkpoints.best_step()
    checkpoints.save(step, model, opt, {"step": step, "best_step": best_step}, best=best)
"""


@pytest.mark.slow
def test_kill_9_at_any_moment_leaves_a_restorable_best(tmp_path):
    """A saver killed with SIGKILL at random moments: every restart finds a latest whose meta names
    a best step that restores."""
    script = tmp_path / "saver.py"
    script.write_text(textwrap.dedent(SAVER))
    rng = np.random.default_rng(0)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    model = mil.build("abmil", 8, 3, rngs=nnx.Rngs(0), hidden=16, attn_dim=8)
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)  # as in the saver
    last = 0
    for attempt in range(4):
        child = subprocess.Popen([sys.executable, str(script), str(tmp_path / "run")], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert child.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(1.0, 3.0))
        child.send_signal(signal.SIGKILL)
        child.wait()
        checkpoints = RunCheckpoints(tmp_path / "run")
        meta = checkpoints.restore_latest(model, opt)
        assert meta is not None and meta["step"] >= last, attempt  # what was committed survives
        last = meta["step"]
        if meta["best_step"] is None:
            continue
        assert checkpoints.best_step() == meta["best_step"], (attempt, meta)
        assert checkpoints.restore_best(model)["step"] == meta["best_step"]


def truncate_data_files(step_dir):
    """Damage a committed step as a failing disk would: every array data file cut to half its size."""
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    for p in files:
        p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])


def checkpoint_messages(caplog):
    """What `bigjax.train.checkpoint` logged. Other loggers are left out: when orbax's reads of a damaged
    step fail, asyncio may log a failed read's unretrieved task whenever the garbage collector meets it."""
    return [r.getMessage() for r in caplog.records if r.name == "bigjax.train.checkpoint"]


def test_a_step_that_does_not_restore_is_named_and_the_one_before_is_used(tmp_path, caplog):
    model, opt = model_and_optimizer(0)
    checkpoints = RunCheckpoints(tmp_path)
    checkpoints.save(1, model, opt, {"step": 1}, best=True)
    first = leaves(model, opt)
    step(model, opt, jnp.ones((5, 8)))
    step(model, opt, jnp.ones((5, 8)))
    checkpoints.save(2, model, opt, {"step": 2}, best=True)
    truncate_data_files(tmp_path / "checkpoints/2/model")
    fresh, fresh_opt = model_and_optimizer(7)
    with caplog.at_level("WARNING", logger="bigjax.train.checkpoint"):
        assert RunCheckpoints(tmp_path).restore_latest(fresh, fresh_opt) == {"step": 1}
    for a, b in zip(first, leaves(fresh, fresh_opt)):
        np.testing.assert_array_equal(a, b)
    [named, used, moved] = checkpoint_messages(caplog)
    assert named.startswith(f"checkpoint step 2 in {tmp_path / 'checkpoints'} does not restore (")
    assert "is not valid for value of size" in named and "tensorstore_spec" not in named and "\n" not in named
    assert used == f"restored step 1 in {tmp_path / 'checkpoints'} as the latest checkpoint (step 2 did not restore)"
    assert moved == f"moved the damaged step 2 to {tmp_path / 'checkpoints' / 'damaged' / '2'}"
    caplog.clear()
    with caplog.at_level("WARNING", logger="bigjax.train.checkpoint"):
        assert RunCheckpoints(tmp_path).restore_best(fresh) == {"step": 1}  # the best named before
    assert not checkpoint_messages(caplog)  # the damaged step is out of the way


def test_no_step_that_restores_is_one_error_naming_each(tmp_path):
    from bigjax.train.checkpoint import CheckpointUnreadable

    model, opt = model_and_optimizer(0)
    checkpoints = RunCheckpoints(tmp_path)
    checkpoints.save(1, model, opt, {"step": 1})
    checkpoints.save(2, model, opt, {"step": 2})
    for s in (1, 2):
        truncate_data_files(tmp_path / f"checkpoints/{s}/opt")
    with pytest.raises(CheckpointUnreadable, match=r"no checkpoint in .* restores \(step 2: .*; step 1: .*\)"):
        RunCheckpoints(tmp_path).restore_latest(model, opt)
