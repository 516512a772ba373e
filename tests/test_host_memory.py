"""The host-RAM budget: parsing, ``auto``, Execution's keyword arguments, the spill meter; the flags."""

import json

import time

import pytest

from bigjax.bench.memory import host_available_bytes
from bigjax.errors import run_cli
from bigjax.host_memory import (AUTO_SHARE, SpillMeter, host_budget, parse_host_memory,
                                shard_spill_options, spill_options)
from bigjax.layers.execution import Execution
from bigjax.train import recovery
from bigjax.train.config import FREE_ON_RESUME, RECOVERIES, flat_settings
from bigjax.units import parse_bytes, parse_rate
from experiments import panda, wholeslide


@pytest.mark.parametrize("text, value", [("8GiB", 8 * 2**30), ("20GB", 20 * 10**9),
                                         ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000),
                                         ("4096", 4096), ("2T", 2 * 2**40)])
def test_sizes_are_read_in_decimal_and_binary_units(text, value):
    assert parse_bytes(text) == value


def test_rates_and_bad_sizes():
    assert parse_rate("3GB/s") == 3e9 and parse_rate("500MiB/s") == 500 * 2**20
    for bad in ("abc", "8XB", "-1GB", "nanGB", ""):
        with pytest.raises(ValueError, match="is not a size in bytes"):
            parse_bytes(bad)
    with pytest.raises(ValueError, match="not a rate"):
        parse_rate("fast/s")


def test_auto_is_a_share_of_mem_available_resolved_when_the_execution_is_built():
    assert parse_host_memory("auto") == "auto" and parse_host_memory(None) is None
    assert parse_host_memory("1MiB") == 2**20
    available = host_available_bytes()
    assert abs(host_budget("auto") - AUTO_SHARE * available) < 0.05 * available  # it moves a little
    with pytest.raises(ValueError, match="--host_memory=0: must be at least 1 byte"):
        parse_host_memory("0")


def test_the_execution_gets_the_budget_only_when_given(tmp_path):
    assert spill_options(None, None, tmp_path) == {}  # main's Execution: no new keyword arguments
    assert spill_options(2**30, None, tmp_path) == {"host_memory": 2**30,
                                                    "spill_dir": str(tmp_path / "spill")}
    assert spill_options(2**30, "/s", tmp_path)["spill_dir"] == "/s"
    with pytest.raises(ValueError, match="--spill_dir=/s has no effect without --host_memory"):
        spill_options(None, "/s", tmp_path)
    shards = [shard_spill_options(spill_options(2**30, "/s", tmp_path), i, 4) for i in range(4)]
    assert {s["host_memory"] for s in shards} == {2**28}
    assert len({s["spill_dir"] for s in shards}) == 4 and shard_spill_options({}, 0, 4) == {}


def test_the_spill_meter_adds_bytes_and_seconds_of_spill_events_only():
    seen = []
    meter = SpillMeter(chain=lambda event, fn, *a, **k: seen.append(event) or fn(*a, **k))
    assert meter("spill_write", lambda n: "w", 1000) == "w"
    meter("spill_read", lambda *, nbytes: None, nbytes=600)
    meter("to_host", lambda n: None, 10**9)  # not a spill: counted by nobody here
    assert seen == ["spill_write", "spill_read", "to_host"]
    epoch = meter.take()
    assert (epoch["spill_written"], epoch["spill_read"]) == (1000, 600) and epoch["disk_gb_s"] > 0
    assert epoch["spill_wait_s"] == 0.0
    meter("spill_wait", time.sleep, 0.05)  # blocked on the store: seconds, no bytes
    second = meter.take()
    assert second == {"spill_written": 0, "spill_read": 0, "disk_gb_s": 0.0,
                      "spill_wait_s": pytest.approx(0.05, abs=0.04)}
    meter("spill_read", lambda n: None, 10**8)
    time.sleep(0.1)
    third = meter.take()  # the bytes over the wall-clock seconds since the last take
    assert 0.1 <= 10**8 / third["disk_gb_s"] / 1e9 < 5  # seconds: at least the sleep
    meter("spill_write", lambda n: None, 400)
    assert meter.total()["spill_written"] == 1400


@pytest.mark.parametrize("argv, message", [
    (["--host_memory=abc"], "--host_memory=abc: 'abc' is not a size in bytes"),
    (["--spill_dir=/tmp/s"], "--spill_dir=/tmp/s has no effect without --host_memory"),
    (["--encoder=frozen", "--host_memory=8GiB"], "--host_memory has no effect with --encoder=frozen"),
    (["--encoder=local", "--host_memory=auto"], "--host_memory has no effect with --encoder=local")])
def test_bad_host_memory_flags_are_one_line_errors_before_any_work(argv, message, capsys, tmp_path):
    assert run_cli(panda.main, [*argv, f"--workdir={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {message}") and "\n" not in err
    assert not any(tmp_path.iterdir())  # nothing generated, tiled or written


def test_host_memory_flags_reach_the_config_and_a_resume_may_change_them(tmp_path):
    config = panda.config_from_flags(panda.parse_flags(
        ["--host_memory=8GiB", "--spill_dir=/tmp/s", f"--workdir={tmp_path}"])).train
    assert (config.host_memory, config.spill_dir) == (8 * 2**30, "/tmp/s")
    auto = panda.config_from_flags(panda.parse_flags(["--host_memory=auto"])).train
    assert auto.host_memory == "auto"  # resolved when the execution is built
    old, new = (json.loads(c.to_json()) for c in (config, auto))
    allowed, refused = recovery.compare(flat_settings(old), flat_settings(new), RECOVERIES, free=FREE_ON_RESUME)
    assert {"host_memory", "spill_dir"} <= set(allowed) and not any(
        r.startswith(("host_memory", "spill_dir")) for r in refused)


def test_wholeslide_reads_mpp_and_the_host_budget(tmp_path):
    a = wholeslide.parse_flags(["--mpp=0.5", "--host_memory=8GiB", f"--workdir={tmp_path}"])
    config = wholeslide.config_from_flags(a)
    assert (config.mpp, config.host_memory, config.spill_dir) == (0.5, 8 * 2**30, None)
    assert wholeslide.config_from_flags(wholeslide.parse_flags(["--magnification=20"])).mpp == 0.5
    assert wholeslide.config_from_flags(wholeslide.parse_flags([])).mpp == 2.0  # 5×
    for argv, message in ((["--mpp=0.5", "--magnification=20"], "give one of them"),
                          (["--mpp=0"], "--mpp=0.0: must be positive"),
                          (["--host_memory=lots"], "--host_memory=lots: 'lots' is not a size"),
                          (["--spill_dir=/s"], "--spill_dir=/s has no effect without"),
                          (["--side=0"], "--side=0: must be at least 1")):
        with pytest.raises(ValueError, match=message):
            wholeslide.config_from_flags(wholeslide.parse_flags(argv))


@pytest.mark.skipif("host_memory" not in Execution.__dataclass_fields__,
                    reason="needs the spill engine: Execution(host_memory=, spill_dir=) (issue 21, "
                           "branch spill)")
def test_the_big_mode_builds_its_execution_with_the_host_budget(tmp_path):
    from bigjax.train import modes
    from bigjax.train.config import TrainConfig

    config = TrainConfig(workdir=str(tmp_path), store=str(tmp_path / "store"), host_memory="64MiB")
    ex = modes.get_class("big", 1)(config, tmp_path).execution
    assert (ex.host_memory, str(ex.spill_dir)) == (64 * 2**20, str(tmp_path / "spill"))
    plain = modes.get_class("big", 1)(TrainConfig(workdir=str(tmp_path), store=str(tmp_path)), tmp_path)
    assert plain.execution.host_memory is None  # everything in RAM, as before
