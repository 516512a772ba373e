"""Multi-process runs: ``distributed.initialize`` settings, the launcher, and the mesh gradient over
two processes (one CPU device each, gloo) or four devices in one process, against one device.

The runs start fresh Python processes (``tests/parallel/mesh_worker.py``), which is how a test gets
more devices than the two of tests/conftest.py: ``--devices 4`` sets ``jax_num_cpu_devices`` there.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from bigjax.parallel import distributed
from bigjax.parallel.launch import free_port, launch
from tests.parallel.helpers import EXACT, TILES, float64, head, one_device, tiny_resnet, to_float64

ROOT = Path(__file__).resolve().parents[2]
ENV = {"PYTHONPATH": str(ROOT)}


def _check_against_one_device(result, devices, processes):
    with float64():  # the worker computes in float64 too: the bound measures the algorithm
        loss0, (g_enc0, g_head0) = one_device(to_float64(tiny_resnet), to_float64(head),
                                              TILES.astype(np.float64))
    assert int(result["devices"]) == devices and int(result["processes"]) == processes
    assert bool(result["agree"])
    np.testing.assert_allclose(result["psum"], devices * (devices + 1) / 2)
    np.testing.assert_allclose(result["loss"], loss0, rtol=EXACT)
    for name, grads in (("encoder", g_enc0), ("head", g_head0)):
        flat = nnx.to_flat_state(grads)
        scale = max(float(np.max(np.abs(v.get_value()))) for _, v in flat)
        for path, v in flat:
            ours = result["/".join(map(str, (name, *path)))]
            assert ours.dtype == np.float64, path
            assert np.max(np.abs(ours - np.asarray(v.get_value()))) / scale < EXACT, path


@pytest.mark.slow
def test_two_processes_compute_the_one_device_gradient(tmp_path):
    prefix = str(tmp_path / "out_")
    assert launch(2, "tests.parallel.mesh_worker", [prefix], env=ENV, timeout=600) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out_0.npz"]  # only process 0 writes
    _check_against_one_device(np.load(prefix + "0.npz"), devices=2, processes=2)


@pytest.mark.slow
def test_four_devices_with_five_tiles_compute_the_one_device_gradient(tmp_path):
    prefix = str(tmp_path / "out_")
    subprocess.run([sys.executable, "-m", "tests.parallel.mesh_worker", prefix, "--devices", "4"],
                   check=True, timeout=600, cwd=ROOT, env={**os.environ, **ENV})
    _check_against_one_device(np.load(prefix + "0.npz"), devices=4, processes=1)


def test_launcher_reports_a_failing_process():
    assert launch(2, "tests.parallel.no_such_module", [], env=ENV, timeout=60) != 0


def test_initialize_without_a_coordinator_is_one_process(monkeypatch):
    for name in distributed.ENV:
        monkeypatch.delenv(name, raising=False)
    assert distributed.initialize() is False
    assert distributed.is_main_process()


def test_initialize_names_the_missing_setting(monkeypatch):
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    with pytest.raises(ValueError, match="num_processes.*JAX_NUM_PROCESSES"):
        distributed.initialize(f"127.0.0.1:{free_port()}", process_id=0)
