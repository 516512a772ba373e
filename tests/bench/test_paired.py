"""Paired timing: every configuration once per round, ratios per round."""

import pytest

from bigjax.bench.paired import engine_steps, median_ratio, paired_seconds


def test_paired_seconds_times_every_step_once_per_round():
    calls = {"a": 0, "b": 0}

    def step(name):
        def run():
            calls[name] += 1
        return run

    times = paired_seconds({"a": step("a"), "b": step("b")}, rounds=3)
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert calls == {"a": 5, "b": 5}  # two untimed calls each, then one per round


def test_the_median_ratio_is_taken_pair_by_pair():
    times = {"a": [2.0, 10.0, 3.0], "b": [1.0, 10.0, 1.0]}  # a slow round slows both
    assert median_ratio(times, "a", "b") == pytest.approx(2.0)


@pytest.mark.slow  # four ResNet-18 steps compiled: ~1 CPU-minute
def test_engine_steps_give_the_same_loss_in_every_configuration_and_the_twin():
    steps = engine_steps(18, (1, 40, 36, 3), 24_000_000)
    assert set(steps) == {"eager", "compiled", "eager, op by op", "jit"}
    losses = {name: float(step()[0]) for name, step in steps.items()}
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-5)
    assert losses["eager, op by op"] == pytest.approx(losses["eager"], rel=1e-5)
    assert losses["jit"] == pytest.approx(losses["eager"], rel=1e-4)


def test_a_bad_shape_is_refused_by_the_parser():
    from bigjax.bench.paired import main

    with pytest.raises(SystemExit):
        main(["--shape=1x1024"])
