"""What --resume may change: a lower learning rate and more epochs pass and are named; a setting that
defines the run's data and steps is refused, each named."""

from bigjax.train import recovery
from bigjax.train.config import FREE_ON_RESUME, RECOVERIES


def saved(**changes):
    return {"optim.lr": 1e-3, "epochs": 2, "batch_size": 2, "tiles_per_bag": 4, "seed": 0, "progress": True,
            "log_every": 1, **changes}


def test_a_lower_lr_and_more_epochs_are_recoveries():
    allowed, refused = recovery.compare(saved(), saved(**{"optim.lr": 1e-4, "epochs": 5, "progress": False}),
                                        RECOVERIES, FREE_ON_RESUME)
    assert refused == []
    assert allowed == {"optim.lr": [1e-3, 1e-4], "epochs": [2, 5], "progress": [True, False]}


def test_the_other_way_and_what_defines_the_steps_are_refused_each_named():
    allowed, refused = recovery.compare(
        saved(), saved(**{"optim.lr": 1e-2, "epochs": 1, "batch_size": 4, "seed": 3, "log_every": 5}),
        RECOVERIES, FREE_ON_RESUME)
    assert allowed == {"log_every": [1, 5]}
    assert refused == ["optim.lr: 0.01 (was 0.001; a resume may only lower it)",
                       "epochs: 1 (was 2; a resume may only raise it)",
                       "batch_size: 4 (was 2)", "seed: 3 (was 0)"]
    message = recovery.refusal("runs/x", refused, {"--lr": recovery.LOWER, "--epochs": recovery.MORE})
    assert message.startswith("--resume of runs/x with other settings (optim.lr: 0.01")
    assert "a resume may change only a lower --lr, a larger --epochs" in message


def test_an_unchanged_setting_is_no_change():
    assert recovery.compare(saved(), saved(), RECOVERIES, FREE_ON_RESUME) == ({}, [])
