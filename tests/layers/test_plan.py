import pytest

from bigjax.layers.plan import IDENTITY, ConvGeometry, Footprint, plan_partitions, _band_bytes

SHAPE = (3, 37, 29, 5)
FP = Footprint(in_buffers=2, out_buffers=2, fixed_bytes=1000, carry=True)


def _covered(parts, n, oh):
    rows = [(i, r) for p in parts for i in range(p.n0, p.n1) for r in range(p.r0, p.r1)]
    return sorted(rows) == [(i, r) for i in range(n) for r in range(oh)]


@pytest.mark.parametrize("geom", [ConvGeometry.make(3, 1, 1), ConvGeometry.make(7, 2, 3),
                                  ConvGeometry.make(1, 2, 0), ConvGeometry.make(3, 1, 2, 2)])
@pytest.mark.parametrize("budget", [10**7, 60_000, 25_000])
def test_partitions_cover_each_output_row_once_within_budget(geom, budget):
    oh, _ = geom.out_size(37, 29)
    parts = plan_partitions(SHAPE, 6, geom, FP, budget)
    assert _covered(parts, 3, oh)
    for p in parts:
        assert _band_bytes(SHAPE, geom, FP, 4, p.n1 - p.n0, p.r1 - p.r0, 6) <= budget
        i0, i1 = geom.input_rows(p.r0, p.r1)
        assert (p.i0 - p.pad_top, p.i1 + p.pad_bottom) == (i0, i1)
        assert 0 <= p.i0 <= p.i1 <= 37


def test_batch_first_then_rows():
    whole = plan_partitions(SHAPE, 6, IDENTITY, FP, 10**7)
    assert len(whole) == 1 and (whole[0].n0, whole[0].n1) == (0, 3)
    per_image = _band_bytes(SHAPE, IDENTITY, FP, 4, 1, 37, 6)
    two = plan_partitions(SHAPE, 6, IDENTITY, FP, per_image * 2)
    assert [(p.n0, p.n1, p.r0, p.r1) for p in two] == [(0, 2, 0, 37), (2, 3, 0, 37)]
    bands = plan_partitions(SHAPE, 6, IDENTITY, FP, per_image // 3)
    assert all(p.n1 - p.n0 == 1 for p in bands) and len(bands) >= 9


def test_tiny_budget_forces_dozens_of_partitions():
    parts = plan_partitions(SHAPE, 6, ConvGeometry.make(3, 1, 1), FP, 12_000)
    assert len(parts) >= 36


def test_budget_below_one_band_names_the_smallest_that_works():
    geom = ConvGeometry.make(3, 1, 1)
    with pytest.raises(ValueError, match=r"needs [\d,]+ B") as err:
        plan_partitions(SHAPE, 6, geom, FP, 2_000)
    need = int(str(err.value).rsplit("needs ", 1)[1].split(" ")[0].replace(",", ""))
    assert plan_partitions(SHAPE, 6, geom, FP, need)  # the number it names works
    with pytest.raises(ValueError):
        plan_partitions(SHAPE, 6, geom, FP, need - 1)
