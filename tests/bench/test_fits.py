"""The scaling fit t(A) = a·A^b + c recovers known parameters from synthetic points."""

import numpy as np
import pytest

from bigjax.bench.fits import fit_power_law


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
