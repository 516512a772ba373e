"""orbax checkpoints of model + optimiser state: exact round trip, RNG streams, best kept apart."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigjax.models import mil
from bigjax.train.checkpoint import RunCheckpoints
from bigjax.train.optim import make_optimizer


def model_and_optimizer(seed):
    model = mil.build("abmil", 8, 3, rngs=nnx.Rngs(seed), hidden=16, attn_dim=8, dropout=0.5)  # RNG streams
    tx = make_optimizer(lr=1e-2, accum=2, schedule="cosine", steps_per_epoch=2, epochs=2)
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)


@nnx.jit
def step(model, optimizer, x, label=1):
    grads = nnx.grad(lambda m: mil.bag_loss(m(x, train=True), label))(model)
    optimizer.update(model, grads)


def leaves(*objs):
    return [np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
                       else x) for x in jax.tree.leaves(nnx.state(objs))]


def test_round_trip_then_identical_steps(tmp_path):
    x = jax.random.normal(jax.random.key(0), (7, 8))
    model, opt = model_and_optimizer(0)
    step(model, opt, x)  # mid-accumulation: MultiSteps holds a gradient
    checkpoints = RunCheckpoints(tmp_path)
    checkpoints.save(1, model, opt, {"step": 1, "best": 0.5})
    other, other_opt = model_and_optimizer(3)
    assert checkpoints.restore_latest(other, other_opt) == {"step": 1, "best": 0.5}
    for a, b in zip(leaves(model, opt), leaves(other, other_opt)):
        np.testing.assert_array_equal(a, b)
    for _ in range(3):  # the same pseudo-bag draws and updates afterwards
        step(model, opt, x)
        step(other, other_opt, x)
    for a, b in zip(leaves(model, opt), leaves(other, other_opt)):
        np.testing.assert_array_equal(a, b)


def test_best_is_kept_apart_from_the_latest(tmp_path):
    model, opt = model_and_optimizer(0)
    checkpoints = RunCheckpoints(tmp_path, keep=1)
    checkpoints.save(1, model, opt, {"step": 1}, best=True)
    best_kernel = np.asarray(model.classifier.kernel[...])
    step(model, opt, jnp.ones((5, 8)))
    step(model, opt, jnp.ones((5, 8)))
    checkpoints.save(2, model, opt, {"step": 2})
    checkpoints.save(3, model, opt, {"step": 3})
    assert checkpoints.latest.all_steps() == [3]
    fresh, _ = model_and_optimizer(9)
    assert checkpoints.restore_best(fresh) == {"step": 1}
    np.testing.assert_array_equal(fresh.classifier.kernel[...], best_kernel)


def test_nothing_to_restore(tmp_path):
    model, opt = model_and_optimizer(0)
    checkpoints = RunCheckpoints(tmp_path)
    assert checkpoints.restore_latest(model, opt) is None
    assert checkpoints.restore_best(model) is None


def test_checkpoints_are_atomic_folders(tmp_path):
    model, opt = model_and_optimizer(0)
    RunCheckpoints(tmp_path).save(4, model, opt, {"step": 4}, best=True)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4"]
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == ["4"]
    assert not any("tmp" in p.name for p in tmp_path.rglob("*"))


def test_meta_round_trips(tmp_path):
    model, opt = model_and_optimizer(0)
    checkpoints = RunCheckpoints(tmp_path)
    checkpoints.save(1, model, opt, {"step": 1, "best": None, "loss_sum": 1.5})
    assert checkpoints.restore_latest(model, opt)["loss_sum"] == 1.5
