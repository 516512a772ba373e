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


@pytest.mark.slow  # whole ResNet-18 steps, twins, profiles and traffic counts: ~2 CPU-minutes
def test_the_benchmark_prints_every_figure_of_each_engine(capsys):
    benchmark.main(["--shapes=1x48x40x3", "--reps=1", "--max_partition_bytes=24MiB",
                    "--engine=eager,compiled"])
    header, *rows = capsys.readouterr().out.strip().splitlines()[-3:]
    assert header.split() == ["input", "engine", "budget", "parts", "big", "s", "jit", "s", "ratio",
                              "h2d", "MiB", "d2h", "MiB", "GB/s", "floor", "s", "orch.", "peak", "MB"]
    moved = []
    for row, engine in zip(rows, ("eager", "compiled")):
        cells = row.split()
        # conv kernel calls: the convs of the blocks that run op by op (a block that fits runs whole)
        assert cells[:2] == ["1x48x40x3", engine] and int(cells[3]) >= 5
        assert 0 < float(cells[10]) and 0 <= float(cells[11].rstrip("%")) <= 100
        moved.append(cells[7:9])
    assert moved[0] == moved[1]  # the engines move the same bytes


def test_an_unknown_engine_is_refused_by_the_parser():
    with pytest.raises(SystemExit):
        benchmark.parse(["--engine=eager,fast"])


def test_the_profiler_knows_every_event():
    from bigjax.bench.profile import CATEGORIES
    from bigjax.layers.execution import EVENTS

    assert set(CATEGORIES) == set(EVENTS)
