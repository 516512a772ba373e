"""The training loop on a tiny generated PANDA-like store: resume, learning, NaN stop, eval_only."""

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from bigjax.data.bags import epoch_order
from bigjax.errors import Interrupted
from bigjax.train.config import TrainConfig
from bigjax.train.features import FeatureCache
from bigjax.train.loop import NonFiniteLossError, Run, evaluate_run, improves, train
from bigjax.train.optim import OptimizerConfig

def tiny(store, workdir, **overrides) -> TrainConfig:
    """A run small enough for a test: 4 tiles of 16 px, 2 bags x 2 accumulated, 2 epochs.

    The default encoder mode is ``precomputed`` (fast: one eval-mode compile of the encoder);
    the ``slow`` tests run the same checks through the Big-Layers encoder.
    """
    optim = OptimizerConfig(lr=overrides.pop("lr", 1e-3), accum=overrides.pop("accum", 2))
    base = dict(workdir=str(workdir), store=str(store), encoder="precomputed", aggregator="abmil",
                arch="resnet18", big_stages=1, max_partition_bytes=400_000, optim=optim, epochs=2,
                batch_size=2, tiles_per_bag=4, augment=True, val_draws=2, val_tiles=4, eval_draws=3,
                eval_tiles=4, embed_chunk=16, log_every=1, progress=False)
    return TrainConfig(**{**base, **overrides})


def saved_state(config: TrainConfig):
    """Leaves of the latest checkpoint's model and optimiser state, restored into a fresh run."""
    run = Run(config)
    meta = run.checkpoints.restore_latest(run.model, run.optimizer)
    state = nnx.state((run.model, run.optimizer))
    leaves = [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
                         else x) for x in jax.tree.leaves(state)]
    return meta, leaves


class Killed(Exception):
    pass


def kill_at(step):
    def on_step(s):
        if s == step:
            raise Killed(f"killed after step {s}")
    return on_step


@pytest.fixture(scope="module")
def uninterrupted(store, tmp_path_factory):
    config = tiny(store, tmp_path_factory.mktemp("whole"))
    results = train(config)
    return config, results


def test_resume_equals_uninterrupted(store, uninterrupted, tmp_path):
    check_resume(uninterrupted[0], tiny(store, tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["big", "inmemory", "frozen"])
def test_resume_equals_uninterrupted_encoder_modes(store, tmp_path, mode):
    whole = tiny(store, tmp_path / "whole", encoder=mode)  # big: stem + layer1 big, partitioned
    train(whole)
    check_resume(whole, dataclasses.replace(whole, workdir=str(tmp_path / "resumed")))


def check_resume(whole: TrainConfig, config: TrainConfig):
    """Kill ``config``'s run mid-epoch 2 (4 steps per epoch), resume: the same state as ``whole``."""
    # resumes from the end of epoch 1 and redoes steps 5-6
    with pytest.raises(Killed):
        train(config, on_step=kill_at(6))
    assert saved_state(config)[0]["step"] == 4
    train(config, resume=True)
    meta_a, a = saved_state(whole)
    meta_b, b = saved_state(config)
    assert meta_a["step"] == meta_b["step"] == 8
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


def test_resume_from_a_step_checkpoint(store, uninterrupted, tmp_path):
    whole, _ = uninterrupted
    config = dataclasses.replace(tiny(store, tmp_path), checkpoint_every=3)
    with pytest.raises(Killed):
        train(config, on_step=kill_at(7))
    assert saved_state(config)[0]["step"] == 6  # mid-epoch checkpoint: resume skips 2 bags of epoch 2
    train(config, resume=True)
    for x, y in zip(saved_state(whole)[1], saved_state(config)[1]):
        np.testing.assert_array_equal(x, y)


def test_run_writes_metrics_curves_and_results(uninterrupted):
    config, results = uninterrupted
    workdir = config.workdir
    rows = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")]
    assert [r["epoch"] for r in rows if r["kind"] == "epoch"] == [1, 2]
    assert "val_qwk" in rows[-1] or any("val_qwk" in r for r in rows)
    text = open(f"{workdir}/results.md").read()
    assert "test QWK" in text and "(3 draws of 4 tiles)" in text and "(all tiles)" in text
    assert results["lines"] == text.splitlines()[1:]
    with open(f"{workdir}/curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    events = b"".join(p.read_bytes() for p in Path(workdir, "tensorboard").glob("events.*"))
    assert b"epoch/train_loss" in events and b"step/loss" in events


def test_eval_only_restores_the_best(uninterrupted):
    import os

    config, results = uninterrupted
    again = evaluate_run(config.workdir)
    assert again["best_step"] == results["best_step"]
    assert again["lines"] == results["lines"]
    board = str(Path(config.workdir, "tensorboard").resolve())
    open_files = [os.path.realpath(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")]
    assert not [f for f in open_files if f.startswith(board)]  # train's and evaluate_run's writers closed


def test_existing_checkpoints_need_resume(uninterrupted):
    config, _ = uninterrupted
    with pytest.raises(FileExistsError, match="--resume"):
        train(config)


def test_short_run_lowers_the_training_loss(store, tmp_path):
    config = tiny(store, tmp_path, epochs=4, lr=3e-3, accum=1)
    train(config)
    losses = [json.loads(line)["train_loss"] for line in open(tmp_path / "metrics.jsonl")
              if '"epoch"' in line and "train_loss" in line]
    assert len(losses) == 4
    assert np.mean(losses[-2:]) < np.mean(losses[:2])


def test_nan_loss_stops_and_keeps_the_checkpoint(store, tmp_path):
    config = tiny(store, tmp_path, checkpoint_every=1)
    run = Run(config)
    run.prepare()
    # poison the cached embeddings of the slide that the second step of epoch 1 trains on
    slide = run.slides["train"][int(epoch_order(len(run.slides["train"]), config.seed, 0)[2])]
    cache = FeatureCache(tmp_path / "features")
    np.save(cache.path(slide.slide_id), np.full_like(cache.features(slide.slide_id), np.nan))
    with pytest.raises(NonFiniteLossError, match=rf"loss is nan at step 2 \(epoch 1, slides .*"
                                                 rf"{slide.slide_id}.*last good checkpoint, of step 1 in .* is kept"
                                                 rf".*; continue with --resume --lr=0.0001$"):
        train(config)
    meta, _ = saved_state(config)
    assert meta["step"] == 1


@pytest.mark.parametrize("change, named", [
    (dict(batch_size=1), r"batch_size: 1 \(was 2\)"),
    (dict(tiles_per_bag=8, seed=1), r"tiles_per_bag: 8 \(was 4\); seed: 1 \(was 0\)"),
    (dict(aggregator="dtfd", encoder="frozen"), r"encoder: 'frozen' \(was 'precomputed'\); aggregator: 'dtfd'"),
    (dict(optim=OptimizerConfig(lr=1e-2, accum=2)), r"optim.lr: 0.01 \(was 0.001; a resume may only lower it\)"),
    (dict(optim=OptimizerConfig(lr=1e-3, accum=1)), r"optim.accum: 1 \(was 2\)"),
    (dict(epochs=1), r"epochs: 1 \(was 2; a resume may only raise it\)"),
])
def test_resume_with_what_defines_the_steps_is_refused(uninterrupted, change, named):
    config, _ = uninterrupted
    with pytest.raises(ValueError, match=named + r".*a resume may change only a lower --lr, a larger --epochs"):
        train(dataclasses.replace(config, **change), resume=True)


def test_resume_recovers_with_a_lower_lr_and_more_epochs(uninterrupted, tmp_path):
    """A finished 2-epoch run goes on for a third epoch at a tenth of the learning rate: the change is
    in config.json and the metrics log, the cosine schedule is said to be recomputed."""
    import shutil

    config, _ = uninterrupted
    shutil.copytree(config.workdir, tmp_path / "run")
    more = dataclasses.replace(config, workdir=str(tmp_path / "run"), epochs=3,
                               optim=dataclasses.replace(config.optim, lr=1e-4, schedule="cosine"))
    with pytest.raises(ValueError, match=r"optim.schedule: 'cosine' \(was 'constant'\)"):
        train(more, resume=True)
    more = dataclasses.replace(more, optim=dataclasses.replace(more.optim, schedule="constant"))
    train(more, resume=True)
    saved = json.loads((tmp_path / "run/config.json").read_text())
    changed = {"workdir": [config.workdir, more.workdir], "optim.lr": [1e-3, 1e-4], "epochs": [2, 3]}
    note = "the constant schedule does not depend on the number of epochs"
    assert saved["resumes"] == [{"step": 8, "changed": changed, "schedule": note}]
    assert saved["optim"]["lr"] == 1e-4 and saved["epochs"] == 3
    rows = [json.loads(line) for line in open(tmp_path / "run/metrics.jsonl")]
    resumed = [r for r in rows if r["kind"] == "resume"]
    assert len(resumed) == 1 and resumed[0]["changed"] == changed and resumed[0]["step"] == 8
    assert [r["epoch"] for r in rows if r["kind"] == "epoch"] == [1, 2, 3]
    assert saved_state(more)[0]["step"] == 12
    assert TrainConfig.from_json((tmp_path / "run/config.json").read_text()) == more


def test_more_epochs_recompute_a_cosine_schedule_and_say_so(store, tmp_path):
    from bigjax.train.loop import _schedule_note

    run = Run(tiny(store, tmp_path, optim=OptimizerConfig(lr=1e-3, accum=2, schedule="cosine")))
    run.close()
    assert _schedule_note(run, 2, 5) == ("the cosine schedule recomputed over 5 epochs (10 optimiser updates), "
                                         "not 2")


def test_all_tiles_metrics_carry_a_bootstrap_interval_over_slides():
    from bigjax.train.evaluate import ProtocolResult, _result

    labels = np.array([0, 1, 2, 3, 4, 5, 0, 1, 2, 3])
    probs = np.eye(6)[[0, 1, 2, 3, 4, 5, 1, 1, 2, 5]][None]  # 8 of 10 right
    r = _result("test", "all tiles", "panda", labels, probs)
    low, high = r.ci("accuracy")
    assert low < 0.8 < high <= 1.0 and low >= 0.4
    assert "test accuracy 0.80 [95% CI" in r.lines()[1]
    assert r.to_json()["accuracy_ci95"] == (low, high)
    draws = ProtocolResult("test", "2 draws", {"qwk": [0.5, 0.6]}, labels, np.concatenate([probs] * 2))
    assert draws.ci("qwk") is None  # repeated draws report their spread


def test_a_stop_on_an_epochs_last_step_validates_that_epoch_first(store, tmp_path):
    """Ctrl-C during the last step of an epoch: the epoch is validated (and kept as best) before the
    stop, so the resumed run does not skip it (here: the only epoch, then the test evaluation)."""
    config = tiny(store, tmp_path, epochs=1)  # 4 steps
    steps = []
    with pytest.raises(Interrupted, match="stopped at step 4"):
        train(config, on_step=steps.append, should_stop=lambda: steps[-1] == 4)
    assert [json.loads(line)["epoch"] for line in open(tmp_path / "metrics.jsonl")
            if '"kind": "epoch"' in line] == [1]
    results = train(config, resume=True)
    assert results["best_step"] == 4


def test_eval_only_of_a_folder_without_a_run_names_it(tmp_path):
    from bigjax.errors import _classify

    with pytest.raises(FileNotFoundError, match="holds no run") as err:
        evaluate_run(tmp_path)
    assert _classify(err.value, ("bigjax",))[1] == 2  # one line "error: ...", not a traceback


def test_an_undefined_validation_score_is_never_the_best():
    nan = float("nan")
    assert improves(0.6, nan)  # a NaN first epoch (an AUC of one class) does not stay best
    assert not improves(nan, 0.6) and not improves(nan, nan)
    assert improves(0.7, 0.6) and not improves(0.6, 0.6) and not improves(0.5, 0.6)


def test_a_bootstrap_interval_is_computed_once_per_metric(monkeypatch):
    from bigjax import metrics
    from bigjax.train.evaluate import _result

    calls = []
    monkeypatch.setattr(metrics, "bootstrap_ci", lambda *a, **k: calls.append(1) or (0.1, 0.9))
    r = _result("test", "all tiles", "panda", np.array([0, 1, 2]), np.eye(6)[[0, 1, 1]][None])
    r.lines(), r.to_json(), r.to_json()
    assert len(calls) == 2 and r.to_json()["qwk_ci95"] == (0.1, 0.9)


def damaged_copy(config: TrainConfig, folder: Path, step: int) -> TrainConfig:
    """A copy of a finished run whose checkpoint ``step`` has its model's data files cut in half."""
    import shutil

    shutil.copytree(config.workdir, folder)
    files = [p for p in (folder / f"checkpoints/{step}/model").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    for p in files:
        p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])
    return dataclasses.replace(config, workdir=str(folder))


def test_resume_past_a_damaged_newest_step_retakes_its_steps(store, uninterrupted, tmp_path, caplog):
    """The newest step (8) does not restore: the resume names it, starts from step 4, and takes the
    uninterrupted run's steps again to the same state."""
    whole, _ = uninterrupted
    config = damaged_copy(whole, tmp_path / "run", 8)
    with caplog.at_level("WARNING", logger="bigjax.train.checkpoint"):
        train(config, resume=True)
    assert any(r.getMessage().startswith(f"checkpoint step 8 in {tmp_path / 'run/checkpoints'} does not restore")
               for r in caplog.records)
    assert "restored step 4 in" in caplog.text and "as the latest checkpoint (step 8 did not restore)" in caplog.text
    for x, y in zip(saved_state(whole)[1], saved_state(config)[1]):
        np.testing.assert_array_equal(x, y)


def test_eval_only_past_a_damaged_best_step_on_a_clean_console(uninterrupted, tmp_path):
    """The CLI in a subprocess: --eval_only of a run whose best step is damaged names it in one warning,
    evaluates the step before it, and prints no traceback."""
    import os
    import subprocess
    import sys

    whole, results = uninterrupted
    best = results["best_step"]
    config = damaged_copy(whole, tmp_path / "run", best)
    done = subprocess.run([sys.executable, "-m", "experiments.panda", f"--workdir={config.workdir}", "--eval_only",
                           "--no_progress"], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "tensorstore_spec" not in done.stderr
    warnings = [line for line in done.stderr.splitlines()
                if line.startswith(("WARNING bigjax.train.checkpoint", "WARNING bigjax.train.loop: evaluating", "ERROR"))]
    other = 4 if best == 8 else 8
    assert warnings[0].startswith(f"WARNING bigjax.train.checkpoint: checkpoint step {best} in ")
    assert warnings[1].endswith(f"restored step {other} in {tmp_path / 'run/checkpoints'} as the best checkpoint "
                                f"(step {best} did not restore)")
    assert len(warnings) == 2 + (best == 4)  # evaluating step 8, not the best by validation
    assert json.loads((tmp_path / "run/results.json").read_text())["best_step"] == other
