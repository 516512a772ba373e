"""The scaling fit t(A) = a·A^b + c recovers known parameters; the sweep runs and writes its outputs."""

import json

import numpy as np
import pytest

from bigjax.bench.fits import fit_power_law
from bigjax.bench.report import write_sweep
from bigjax.bench.sweep import SweepConfig, run_sweep


@pytest.mark.parametrize("a,b,c", [(2e-7, 1.0, 0.05), (3e-9, 1.4, 0.0), (5e-6, 0.83, 0.2)])
def test_fit_recovers_known_parameters(a, b, c):
    area = np.array([256, 512, 1024, 2048, 4096], np.float64) ** 2
    t = a * area**b + c
    fit = fit_power_law(area, t * (1 + 1e-4 * np.random.default_rng(0).normal(size=t.shape)))
    assert fit.b == pytest.approx(b, rel=1e-2)
    assert fit.a == pytest.approx(a, rel=0.1)
    assert fit.c == pytest.approx(c, abs=1e-2)
    assert fit.r2 > 0.999 and fit.n == 5
    assert fit.doubling == pytest.approx((a * (2 * fit.at_area) ** b + c) / (a * fit.at_area**b + c),
                                         rel=1e-2)


def test_linear_growth_doubles():
    area = np.array([1e4, 4e4, 1.6e5, 6.4e5])
    fit = fit_power_law(area, 3e-6 * area)
    assert fit.doubling == pytest.approx(2.0, rel=1e-3) and fit.b == pytest.approx(1.0, rel=1e-3)


def test_too_few_points_are_refused():
    with pytest.raises(ValueError, match="at least 3"):
        fit_power_law([1.0, 2.0], [1.0, 2.0])


def _two_point_sweep(tmp_path, configs, compiled_memory):
    cfg = SweepConfig(depth=18, sides=(32, 48), configs=configs, budget=4 * 2**20, warmup=1, reps=2,
                      compiled_memory=compiled_memory)
    points = run_sweep(cfg, progress=False)
    assert [(p.config, p.side, p.status) for p in points] == [
        (c, s, "ok") for s in (32, 48) for c in configs]
    assert all(p.mean_s > 0 and p.std_s >= 0 for p in points)
    assert all(p.device_peak_bytes for p in points if compiled_memory or p.config.startswith("big"))
    text = write_sweep(points, tmp_path, "test")
    assert "| inmemory |" in text and "32² s" in text
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert len(saved["points"]) == 2 * len(configs) and saved["fits"]["big2"] is None  # 2 points
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_a_two_point_sweep_runs_and_writes_table_json_and_plot(tmp_path):
    _two_point_sweep(tmp_path, ("inmemory", "big2"), compiled_memory=False)


@pytest.mark.slow
def test_every_sweep_configuration_runs(tmp_path):
    _two_point_sweep(tmp_path, ("inmemory", "checkpoint", "big0", "big2", "big4", "big4_separate"),
                     compiled_memory=True)


def test_a_point_that_cannot_fit_the_host_is_skipped():
    cfg = SweepConfig(depth=18, sides=(10**6,), configs=("inmemory",))
    (point,) = run_sweep(cfg, progress=False)
    assert point.status == "skipped" and "GiB of host RAM" in point.note
