"""Per-slide augmentation: one draw, the same transform on every tile."""
import numpy as np

from bigjax.data.augment import AugmentParams, augment_bag, sample_params


def _bag(k=6, t=24, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (k, t, t, 3), dtype=np.uint8)


def _strong():
    return AugmentParams(np.bool_(True), np.bool_(True), np.int32(3), np.float32(11.0), np.float32(1.1),
                         np.float32(1.08), np.float32(0.93), np.float32(1.1))


def test_same_params_hit_every_tile():
    bag = _bag()
    params = _strong()
    out = np.asarray(augment_bag(bag, params))
    assert not (out == bag).all()
    for i in range(len(bag)):
        # tile i alone (a bag of copies, same shape: no recompile) gets exactly what it got in the bag
        copies = np.asarray(augment_bag(np.repeat(bag[i:i + 1], len(bag), axis=0), params))
        assert (copies == out[i]).all()


def test_identity_params_change_nothing():
    bag = _bag()
    np.testing.assert_array_equal(np.asarray(augment_bag(bag, AugmentParams.identity())), bag)


def test_flips_and_quarter_turns_match_numpy():
    bag = _bag()
    ident = AugmentParams.identity()
    cases = [(ident._replace(flip_h=np.bool_(True)), bag[:, :, ::-1]),
             (ident._replace(flip_v=np.bool_(True)), bag[:, ::-1]),
             (ident._replace(rot90=np.int32(1)), np.rot90(bag, 1, axes=(1, 2)))]
    for params, expected in cases:
        np.testing.assert_array_equal(np.asarray(augment_bag(bag, params)), expected)


def test_blur_and_colour_act():
    flat = np.full((1, 24, 24, 3), 128, np.uint8)
    ident = AugmentParams.identity()
    blurred = np.asarray(augment_bag(flat, ident._replace(blur_sigma=np.float32(1.2))))
    np.testing.assert_array_equal(blurred, flat)  # blur keeps a flat image flat (normalised kernel)
    brighter = np.asarray(augment_bag(flat, ident._replace(brightness=np.float32(1.1))))
    assert (brighter > flat).all()
    edges = _bag(1)
    assert np.asarray(augment_bag(edges, ident._replace(blur_sigma=np.float32(1.2)))).std() < edges.std()


def test_sample_params_is_reproducible():
    draws = [sample_params(np.random.default_rng([7, i])) for i in range(20)]
    again = [sample_params(np.random.default_rng([7, i])) for i in range(20)]
    assert all(all(np.array_equal(x, y) for x, y in zip(a, b)) for a, b in zip(draws, again))
    assert len({float(d.angle) for d in draws}) == 20 and {int(d.rot90) for d in draws} == {0, 1, 2, 3}
