"""This machine, measured: the conv throughput, the host's bandwidth and one all-big step."""

import pytest

from bigjax.bench import machine
from bigjax.models.machine_fit import footprint


def test_measured_throughput_and_host_bandwidth_are_positive_and_finite():
    assert 0 < machine.measure_throughput(side=32, channels=8, repeats=1) < 1e15
    assert 1e6 < machine.measure_host_bandwidth(nbytes=2**20, repeats=1) < 1e13


@pytest.mark.slow  # ~40 s: a ResNet-18's initialisation and two all-big steps
def test_measure_step_reads_the_peak_rss_rise_of_one_step():
    m = machine.measure_step(18, 128)
    activations = footprint("resnet18", 128).activation_bytes
    assert m["seconds"] > 0 and activations <= m["rss_rise"] < 50 * activations
