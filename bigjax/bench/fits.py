"""Scaling fits of step time against input area, as the "Big-Layers" paper's Table 4 (Appendix A.2).

Each configuration's times are fitted with ``t(A) = a·A^b + c`` (a, b, c ≥ 0) by scipy's bounded
least squares (``curve_fit``, trust-region reflective). The doubling factor ``F_dbl = t(2A)/t(A)`` at the
median measured area tells how the time grows when the area doubles (2.0 for linear growth without an
offset); the paper reports b = 1.03 and F_dbl = 2.00 for its all-on-GPU baseline.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from scipy.optimize import curve_fit

__all__ = ["PowerLawFit", "fit_power_law", "power_law"]


def power_law(area, a, b, c):
    """``a * area**b + c``."""
    return a * np.power(area, b) + c


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
    """A fitted ``t(A) = a·A^b + c`` with its goodness of fit and doubling factor.

    Attributes:
      a, b, c: the parameters (time unit: that of the data; area unit: pixels).
      r2: coefficient of determination of the fit on the points.
      n: number of points.
      doubling: ``t(2A)/t(A)`` at ``at_area`` (the median measured area).
      at_area: where ``doubling`` is evaluated.
    """

    a: float
    b: float
    c: float
    r2: float
    n: int
    doubling: float
    at_area: float

    def __call__(self, area):
        return power_law(np.asarray(area, np.float64), self.a, self.b, self.c)


def fit_power_law(areas, times) -> PowerLawFit:
    """Fit ``t(A) = a·A^b + c`` with a, b, c ≥ 0 to measured (area, time) points.

    Args:
      areas: input areas (pixels, e.g. side²), at least 3 distinct values.
      times: step times, one per area.
    Raises:
      ValueError: fewer than 3 points, or non-positive values.
    """
    area = np.asarray(areas, np.float64)
    t = np.asarray(times, np.float64)
    if area.shape != t.shape or len(area) < 3:
        raise ValueError(f"a power-law fit needs at least 3 (area, time) points, got {len(area)}")
    if np.any(area <= 0) or np.any(t <= 0):
        raise ValueError("areas and times must be positive")
    scale = area.max()  # fit in units of the largest area: a well-conditioned problem
    x = area / scale
    b0 = _slope_guess(x, t)
    params, _ = curve_fit(power_law, x, t, p0=(t.max(), b0, 0.0),
                          bounds=([0.0, 0.0, 0.0], [np.inf, 10.0, np.inf]), maxfev=20_000)
    a, b, c = (float(v) for v in params)
    a /= scale ** b
    residual = t - power_law(area, a, b, c)
    r2 = 1.0 - float(np.sum(residual**2)) / max(float(np.sum((t - t.mean()) ** 2)), 1e-300)
    mid = float(np.median(area))
    doubling = float(power_law(2 * mid, a, b, c) / power_law(mid, a, b, c))
    return PowerLawFit(a, b, c, r2, len(area), doubling, mid)


def _slope_guess(x, t) -> float:
    """The log-log slope between the smallest and largest point (a starting exponent)."""
    lo, hi = np.argmin(x), np.argmax(x)
    if x[hi] == x[lo]:
        return 1.0
    return float(np.clip(np.log(t[hi] / t[lo]) / np.log(x[hi] / x[lo]), 0.1, 5.0))
