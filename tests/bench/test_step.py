"""The step benchmark: per input the ratio, bytes each way, GB/s, floor, orchestration share."""

import pytest

from bigjax.bench.bandwidth import Bandwidth, copy_bandwidth
from bigjax.layers.execution import Execution
from experiments import benchmark


def test_the_floor_is_bytes_over_bandwidth_each_way():
    bw = Bandwidth(h2d=2e9, d2h=1e9, nbytes=1)
    assert bw.floor_seconds(4e9, 1e9) == pytest.approx(3.0)


def test_copy_bandwidth_is_measured_both_ways():
    bw = copy_bandwidth(Execution(2**20), nbytes=2**20, reps=2)
    assert bw.h2d > 0 and bw.d2h > 0


@pytest.mark.slow  # a whole ResNet-18 step, its twin, a profile and a traffic count: ~1 CPU-minute
def test_the_benchmark_prints_every_figure_of_a_configuration(capsys):
    benchmark.main(["--shapes=1x48x40x3", "--reps=1", "--max_partition_bytes=24MiB"])
    header, row = capsys.readouterr().out.strip().splitlines()[-2:]
    assert header.split() == ["input", "budget", "parts", "big", "s", "jit", "s", "ratio", "h2d",
                              "MiB", "d2h", "MiB", "GB/s", "floor", "s", "orch.", "peak", "MB"]
    cells = row.split()
    assert cells[0] == "1x48x40x3" and int(cells[2]) >= 20  # every conv of ResNet-18
    assert 0 < float(cells[9]) and 0 <= float(cells[10].rstrip("%")) <= 100


def test_the_profiler_knows_every_event():
    from bigjax.bench.profile import CATEGORIES
    from bigjax.layers.execution import EVENTS

    assert set(CATEGORIES) == set(EVENTS)
