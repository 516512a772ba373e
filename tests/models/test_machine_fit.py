"""What a machine can train: the predictor's sizes against the real model's, its arithmetic, its CLI."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigjax.errors import run_cli
from bigjax.layers.execution import Execution
from bigjax.models import machine_fit
from bigjax.models.machine_fit import Footprint, Machine, footprint, predict
from bigjax.models.resnet import BigResNet, ResNet

SIDE = 67  # odd: every stride-2 layer rounds


def _zero_model(cls, depth, **kwargs):
    """A model with zero parameters, built from shapes alone (no random initialisation runs)."""
    graph, state = nnx.split(nnx.eval_shape(lambda: cls(depth, rngs=nnx.Rngs(0), **kwargs)))
    return nnx.merge(graph, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), state))


def test_activation_bytes_are_the_input_and_every_conv_output_the_big_model_streams():
    model = _zero_model(BigResNet, 18, big_stages=4)
    outputs = []

    def observer(event, fn, *args, **kwargs):
        result = fn(*args, **kwargs)
        if event == "conv_forward":  # one output band of one conv (bands tile its output exactly)
            outputs.append(math.prod(result[0].shape))
        return result

    ex = Execution(20 * 2**20, whole_blocks=False, observer=observer)  # every conv streamed
    x = np.zeros((1, SIDE, SIDE, 3), np.float32)
    model(x, train=False, execution=ex)
    assert len(outputs) >= 20  # a band or more of each of the 20 convs
    assert footprint("resnet18", SIDE).activation_bytes == 4 * (x.size + sum(outputs))
    assert footprint("resnet18", SIDE, "bfloat16").activation_bytes == 2 * (x.size + sum(outputs))


@pytest.mark.parametrize("arch, depth", [("resnet18", 18),
                                         pytest.param("resnet50", 50, marks=pytest.mark.slow)])
def test_flops_match_xla_cost_analysis_within_3_percent(arch, depth):
    """XLA counts 2 FLOPs per multiply-add of a conv tap inside the input, and the elementwise ops
    (BatchNorm, ReLU, add, pooling) besides: measured 0.5-1 % above the convs alone at 224² and 512²
    (ResNet-18 and -50); the bound is 3 %."""
    graph, state = nnx.split(nnx.eval_shape(lambda: ResNet(depth, rngs=nnx.Rngs(0))))
    x = jax.ShapeDtypeStruct((1, SIDE, SIDE, 3), jnp.float32)
    params = nnx.state(nnx.merge(graph, state), nnx.Param)

    def forward(state, x):
        return jnp.sum(nnx.merge(graph, state)(x, train=False))

    def train(params, state, x):  # the parameters' gradient only: the image gets none
        return jax.grad(lambda p: forward(nnx.merge_state(state, p), x))(params)

    fp = footprint(arch, SIDE)
    forward_xla = jax.jit(forward).lower(state, x).compile().cost_analysis()["flops"]
    train_xla = jax.jit(train).lower(params, state, x).compile().cost_analysis()["flops"]
    assert fp.forward_flops <= forward_xla <= 1.03 * fp.forward_flops
    assert fp.train_flops <= train_xla <= 1.03 * fp.train_flops


def test_prediction_in_ram_and_over_a_host_budget():
    fp = Footprint("resnet18", 1024, "float32", activation_bytes=10 * 2**30, forward_flops=10**12,
                   train_flops=3 * 10**12, bus_bytes=50 * 2**30, largest_bytes=2**30)
    gpu = Machine("m", 8 * 2**30, 64 * 2**30, disk_read=2e9, disk_write=1e9, kernel_throughput=1e12,
                  bus=25 * 2**30)
    in_ram = predict(fp, gpu, None, copies=2.0)
    assert in_ram.in_ram_bytes == in_ram.host_bytes == 20 * 2**30 + machine_fit.PROCESS_BYTES
    assert (in_ram.disk_written, in_ram.disk_s, in_ram.kernel_s, in_ram.bus_s) == (0, 0.0, 3.0, 2.0)
    assert (in_ram.step_s, in_ram.bound) == (3.0, "kernels")
    spilled = predict(fp, gpu, 8 * 2**30, copies=2.0)
    # the residuals beyond 8 GiB less the room for 3 activations of 1 GiB in flight
    written = int(machine_fit.RESIDUALS * 10 * 2**30) - 5 * 2**30
    assert (spilled.disk_written, spilled.disk_read) == (written, int(machine_fit.READS * written))
    assert spilled.host_bytes == (8 * 2**30 + machine_fit.PROCESS_BYTES
                                  + machine_fit.PARTITIONS_IN_FLIGHT * gpu.partition_budget)
    below_the_room = predict(fp, gpu, 2**30, copies=2.0)  # everything spills; 3 activations alive
    assert below_the_room.disk_written == int(machine_fit.RESIDUALS * 10 * 2**30)
    assert below_the_room.host_bytes == spilled.host_bytes - 5 * 2**30
    assert spilled.disk_s == pytest.approx(written / 1e9 + machine_fit.READS * written / 2e9)
    assert (spilled.step_s, spilled.bound) == (spilled.disk_s, "disk")
    assert predict(fp, replace_bus(gpu, None), None).bus_s == 0.0  # the host computes: no bus


def test_a_host_budget_streams_the_stem_its_output_neither_kept_nor_held():
    fp = Footprint("resnet18", 1024, "float32", activation_bytes=10 * 2**30, forward_flops=10**12,
                   train_flops=3 * 10**12, bus_bytes=50 * 2**30, stem_bytes=2**30, stem_flops=10**11)
    gpu = Machine("m", 8 * 2**30, 64 * 2**30, disk_read=2e9, disk_write=1e9, kernel_throughput=1e12)
    spilled = predict(fp, gpu, 2**30, copies=2.0)
    written = int(machine_fit.RESIDUALS * 9 * 2**30) - 2**30
    assert spilled.disk_written == written
    assert spilled.kernel_s == pytest.approx(3.0 + machine_fit.STEM_PASSES * 0.1)
    assert predict(fp, gpu, None, copies=2.0).kernel_s == 3.0  # in RAM the stem runs op by op
    assert footprint("resnet18", 512).stem_bytes == 256 * 256 * 64 * 4
    assert footprint("resnet18", 512).largest_bytes == 128 * 128 * 64 * 4  # a stage-1 conv's output


def test_host_passes_add_to_the_kernels_on_a_cpu_and_overlap_them_beside_an_accelerator():
    fp = Footprint("resnet18", 1024, "float32", activation_bytes=10 * 2**30, forward_flops=10**12,
                   train_flops=3 * 10**12, bus_bytes=50 * 2**30)
    host = machine_fit.HOST_PASSES * 10 * 2**30 / 2e10  # seconds of host passes at 20 GB/s
    cpu = Machine("cpu", 8 * 2**30, 64 * 2**30, disk_read=2e9, disk_write=1e9, kernel_throughput=1e12,
                  host_bandwidth=2e10)
    on_cpu = predict(fp, cpu, None)
    assert on_cpu.host_s == pytest.approx(host)
    assert (on_cpu.step_s, on_cpu.bound) == (pytest.approx(3.0 + host), "kernels + host")
    beside = predict(fp, replace_bus(cpu, 25 * 2**30), None)  # kernels on the device, passes on the host
    assert (beside.step_s, beside.bound) == (pytest.approx(max(3.0, host, 2.0)),
                                             "host" if host > 3.0 else "kernels")
    assert predict(fp, dataclasses.replace(cpu, host_bandwidth=None), None).host_s == 0.0  # unknown


def replace_bus(machine, bus):
    return dataclasses.replace(machine, bus=bus)


def test_largest_side_in_ram_fits_and_one_percent_more_does_not():
    m = machine_fit.THIS_MACHINE
    side = machine_fit.largest_side("resnet18", m)
    need = lambda s: predict(footprint("resnet18", s), m).in_ram_bytes  # noqa: E731
    assert need(side) <= m.host_memory * 1.01 and need(int(side * 1.02)) > m.host_memory


def test_the_runs_partition_budget_and_an_image_held_in_ram_count_in_its_host_ram():
    fp = footprint("resnet18", 1024)
    assert fp.image_bytes == 1024 * 1024 * 3 * 4  # float32 RGB, whatever the host dtype
    m = Machine("m", 8 * 2**30, 64 * 2**30, disk_read=2e9, disk_write=1e9, kernel_throughput=1e12)
    run = dataclasses.replace(m, partition_bytes=64 * 2**20, input_in_ram=True)
    assert (m.partition_budget, run.partition_budget) == (2**30, 64 * 2**20)
    fewer_partition_bytes = machine_fit.PARTITIONS_IN_FLIGHT * (2**30 - 64 * 2**20)
    spilled, held = predict(fp, m, 0), predict(fp, run, 0)
    assert held.host_bytes - spilled.host_bytes == fp.image_bytes - fewer_partition_bytes
    assert held.base_bytes == machine_fit.PROCESS_BYTES + fp.image_bytes
    assert predict(fp, run).in_ram_bytes - predict(fp, m).in_ram_bytes == fp.image_bytes
    from_a_slide = dataclasses.replace(run, input_in_ram=False)  # the image held leaves less room
    assert (machine_fit.largest_spilled_side("resnet18", run)
            < machine_fit.largest_spilled_side("resnet18", from_a_slide))


def test_the_table_has_the_anchors_rows_on_both_machines(capsys):
    assert machine_fit.main([]) == 0
    out = capsys.readouterr().out
    for side in ("16,384²", "65,536²", "75,000²"):
        assert out.count(f"| {side} |") == 2
    assert "GPU server: largest side in RAM" in out and "this machine" in out


def test_one_given_machine_and_bad_flags(capsys):
    argv = ["--side", "16384", "--arch", "resnet34", "--host_dtype", "bfloat16", "--device_memory", "80GB",
            "--host_memory", "512GB", "--disk_read", "3GB/s", "--disk_write", "2GB/s",
            "--kernel_throughput", "1e14", "--max_partition_bytes", "64MiB", "--input_in_ram"]
    assert machine_fit.main(argv) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| given")]
    assert len(rows) == 1 and "16,384²" in rows[0]
    for bad, said in ((["--disk_read", "fast"], "--disk_read: 'fast' is not a rate in bytes per second"),
                      (["--side", "16"], "--side: '16': a ResNet needs sides of at least 32 px"),
                      (["--host_memory", "lots"], "--host_memory: 'lots' is not a size in bytes")):
        with pytest.raises(SystemExit) as stop:
            machine_fit.main(bad)
        [line] = capsys.readouterr().err.splitlines()
        assert stop.value.code == 2 and line.startswith(f"error: argument {said}")
    with pytest.raises(ValueError, match="--side=8: a ResNet needs at least 32 px"):
        footprint("resnet18", 8)


def test_check_measures_steps_here_against_the_prediction_in_ram_and_spilled(tmp_path, capsys):
    """``--check`` (the README's command): a step in RAM spills nothing; with ``--budget 0`` every
    residual is written, as predicted, and the store leaves no file."""
    assert machine_fit.main(["--check", "96"]) == 0
    assert machine_fit.main(["--check", "96", "--budget", "0", "--spill_dir", str(tmp_path)]) == 0
    rows = [r.split("|") for r in capsys.readouterr().out.splitlines() if r.startswith("| 96²")]
    in_ram, spilled = rows
    mib = lambda cell: [float(v) for v in cell.split("/")]  # noqa: E731  "predicted / measured"
    assert mib(in_ram[5]) == [0.0, 0.0] and mib(in_ram[3])[1] > 0
    predicted, written = mib(spilled[5])
    assert written > 0 and 0.5 < predicted / written < 2  # RESIDUALS, fitted at 8192²-16,384²
    assert not [f for f in tmp_path.rglob("*") if f.is_file()]
    capsys.readouterr()
    assert run_cli(machine_fit.main, ["--check", "96", "--budget", "1GiB"]) == 2  # where to spill?
    assert capsys.readouterr().err.splitlines() == [
        "error: --check with --budget needs --spill_dir (and --spill_dir needs --budget)"]


def test_largest_spilled_side_fits_its_cotangents_and_two_percent_more_does_not():
    """With every residual spilled (a zero budget) what stays in RAM is the activations in flight:
    the largest side whose prediction fits the machine is ``largest_spilled_side``."""
    m = machine_fit.THIS_MACHINE
    side = machine_fit.largest_spilled_side("resnet18", m)
    used = lambda s: predict(footprint("resnet18", s), m, 0).host_bytes  # noqa: E731
    assert used(side) <= m.host_memory * 1.01 and used(int(side * 1.02)) > m.host_memory
    assert 16_384 < side < 32_768  # 3 stage-1 cotangents of 16 bytes a pixel in 24 GB
