"""bench.host_memory: the activations stored once, one step's host peak, a spilled step's report."""

import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

from bigjax.bench.host_memory import (benchmark_spilled, disk_bandwidth, measure_host_step,
                                      stored_once_bytes)
from bigjax.models.resnet import ResNet


@pytest.mark.parametrize("depth,shape", [(18, (1, 67, 45, 3)), (50, (2, 64, 64, 3))])
def test_stored_once_is_the_input_plus_every_conv_output(depth, shape):
    """Counted from the architecture, checked against the convolutions in the twin's program."""
    model = ResNet(depth, rngs=nnx.Rngs(0))
    jaxpr = jax.make_jaxpr(lambda x: model(x, train=False))(np.zeros(shape, np.float32))
    outputs = [e.outvars[0].aval.size for e in jaxpr.jaxpr.eqns
               if e.primitive.name == "conv_general_dilated"]
    assert len(outputs) == (20 if depth == 18 else 53)
    assert stored_once_bytes(model, shape, 2) == 2 * (np.prod(shape) + sum(outputs))


@pytest.mark.parametrize("fused", [True, False])
def test_a_spilled_step_is_measured(tmp_path, fused):
    r = measure_host_step(64, host_memory=0, spill_dir=str(tmp_path), fused=fused)
    assert r.spilled >= r.stored_once  # all of it on disk (and the block outputs besides)
    assert r.read >= r.spilled and r.rss_rise > 0 and r.step_s > 0
    assert 0 < r.largest_read < r.stored_once  # a band, the largest activation at most


def test_the_disk_probe_writes_a_new_array_each_time_and_leaves_no_file(tmp_path):
    """The probe runs ``reps`` times (its bandwidths the best of them: a fresh process's first is
    slow), each writing the array anew (the store removed the last copy at its release) and reading
    it back; no file is left."""
    write, read = disk_bandwidth(tmp_path, 2**20, reps=3)
    assert write > 0 and read > 0
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


@pytest.mark.parametrize("warmup", [True, False])
def test_the_benchmark_reports_a_spilled_step_against_its_floors(tmp_path, warmup):
    t = benchmark_spilled((1, 64, 64, 3), 0, tmp_path, budget=20_000_000, probe_bytes=2**20,
                          warmup=warmup)
    assert t.written > 0 and t.read >= t.written and t.kernel_s > 0
    assert 0 < t.disk_peak <= t.written  # every activation is written once, at most all at once
    assert t.floor_s == pytest.approx(t.written / t.disk_write + t.read / t.disk_read)
    assert t.ratio == pytest.approx(t.step_s / max(t.kernel_s, t.floor_s))


@pytest.mark.slow
def test_experiments_benchmark_prints_the_spilled_step(tmp_path, capsys):
    from experiments.benchmark import main
    main(["--shapes=1x64x64x3", "--host_memory=0", f"--spill_dir={tmp_path}",
          "--max_partition_bytes=20MiB", "--warmup=0"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["input", "step"] and lines[1].split()[0] == "1x64x64x3"
    header, row = lines[0].split(), lines[1].split()
    assert "probe" in header and len(row) == 13  # the probe's write / read speeds: "w / r"
    write, read = float(row[7]), float(row[9])
    assert write > 0 and read > 0 and row[8] == "/"


_BOUND = textwrap.dedent("""
    import json, sys
    from bigjax.bench.host_memory import measure_host_step
    side, partition, memory = map(int, sys.argv[1:4])
    spill_dir = sys.argv[4]
    r = measure_host_step(side, budget=partition, host_memory=memory, spill_dir=spill_dir)
    print(json.dumps([r.rss_rise, r.stored_once, r.spilled]))
""")


@pytest.mark.slow  # ~90 s: two all-big ResNet-18 steps at 2048^2 in a fresh process
def test_a_spilled_steps_host_peak_stays_within_its_budget_plus_a_constant(tmp_path):
    """At 2048^2 (ResNet-18, float32), with host_memory = 256 MiB, under a third of the activations
    stored once (0.82 GiB): the peak RSS rise stays within host_memory plus what no activation's size
    sets, the parameter gradients (43 MiB), the two partitions in flight (``Execution(prefetch=1)``)
    and 96 MiB of XLA's temporaries and the allocator's slack: measured 379-398 MiB against the
    bound's 443. Before the budget kept room for the activations in flight (``spill.IN_FLIGHT``), the
    rise was 571 MiB, and what was beyond the budget grew with the side (docs/benchmarks.md, seventh
    session)."""
    partition, budget = 24 * 2**20, 256 * 2**20
    model = nnx.eval_shape(lambda: ResNet(18, rngs=nnx.Rngs(0)))
    gradients = sum(p.size * 4 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    out = subprocess.run([sys.executable, "-c", _BOUND, "2048", str(partition), str(budget),
                          str(tmp_path)], capture_output=True, text=True, check=True)
    rise, stored, spilled = __import__("json").loads(out.stdout.splitlines()[-1])
    assert spilled > stored - budget
    assert rise < budget + gradients + 2 * partition + 96 * 2**20, (rise / 2**20, stored / 2**20)
