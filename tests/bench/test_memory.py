"""The host's peak resident set counted apart for the phases of a run (``PhasePeaks``)."""

import numpy as np
import pytest

from bigjax.bench.memory import PhasePeaks, host_peak_bytes, host_rss_bytes

MIB = 2**20


@pytest.mark.skipif(host_peak_bytes() is None, reason="VmHWM is Linux's")
def test_each_phase_has_its_own_peak():
    """A phase that touches 256 MiB peaks that much above the resident set before it; a later phase
    that allocates nothing peaks below it (the count restarted), and a repeat keeps the larger."""
    peaks = PhasePeaks()
    before = host_rss_bytes()
    with peaks.phase("training"):
        big = np.ones(256 * MIB, np.uint8)
        del big
    with peaks.phase("evaluation"):
        pass
    with peaks.phase("training"):
        pass
    assert peaks.peaks["training"] >= before + 250 * MIB
    assert peaks.peaks["evaluation"] < peaks.peaks["training"] - 200 * MIB
