"""Optimisers and schedules against direct numpy implementations of their formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bigjax.train.optim import (EXPONENTIAL_DECAY_PER_EPOCH, OptimizerConfig, demon_adam,
                                demon_momentum, make_optimizer, make_schedule)


def _run(opt, grads_seq, params):
    """Apply opt to params for each gradient in grads_seq (jitted update); return final params."""
    state = opt.init(params)
    step = jax.jit(opt.update)
    for g in grads_seq:
        updates, state = step(g, state, params)
        params = optax.apply_updates(params, updates)
    return params


def _grads(n_steps, shape=(3, 2), seed=0):
    rng = np.random.default_rng(seed)
    return [{"w": rng.normal(size=shape).astype(np.float32)} for _ in range(n_steps)]


def _numpy_demon_adam(params, grads_seq, lr, beta_init, total, b2, eps, wd):
    """DEMON Adam (Chen et al. Algorithm 2) with exact bias correction, step by step in numpy."""
    p = params.astype(np.float64)
    m, v, prod = np.zeros_like(p), np.zeros_like(p), 1.0
    for t, g in enumerate(grads_seq):
        g = g.astype(np.float64) + wd * p
        frac = 1 - min(t, total) / total
        beta = beta_init * frac / ((1 - beta_init) + beta_init * frac)
        m = beta * m + (1 - beta) * g
        v = b2 * v + (1 - b2) * g * g
        prod *= beta
        rate = lr(t) if callable(lr) else lr
        p = p - rate * (m / (1 - prod)) / (np.sqrt(v / (1 - b2 ** (t + 1))) + eps)
    return p


def test_demon_momentum_formula():
    beta = demon_momentum(0.9, 100)
    for t in (0, 10, 50, 99):
        frac = 1 - t / 100
        np.testing.assert_allclose(float(beta(t)), 0.9 * frac / (0.1 + 0.9 * frac), rtol=1e-6)
    assert float(beta(100)) == 0.0 and float(beta(250)) == 0.0  # held at 0 past T
    # the total future contribution beta/(1-beta) decays linearly: half of 9 at t = T/2
    np.testing.assert_allclose(float(beta(50) / (1 - beta(50))), 4.5, rtol=1e-5)


@pytest.mark.parametrize("wd", [0.0, 1e-2])
def test_demon_adam_matches_numpy(wd):
    params = {"w": np.random.default_rng(1).normal(size=(3, 2)).astype(np.float32)}
    grads_seq = _grads(9)  # crosses T = 6, where beta reaches 0
    got = _run(demon_adam(1e-2, total_steps=6, weight_decay=wd), grads_seq, params)
    want = _numpy_demon_adam(params["w"], [g["w"] for g in grads_seq], 1e-2, 0.9, 6, 0.999, 1e-8,
                             wd)
    np.testing.assert_allclose(got["w"], want, rtol=2e-5, atol=1e-6)


def test_first_demon_step_is_a_bias_corrected_sign_step():
    # m_hat = g and v_hat = g^2 after one step, whatever beta_0: the step is -lr * sign(g)
    params = {"w": np.zeros((3, 2), np.float32)}
    grads_seq = _grads(1)
    got = _run(demon_adam(1.0, total_steps=1), grads_seq, params)
    np.testing.assert_allclose(got["w"], -np.sign(grads_seq[0]["w"]), rtol=1e-5)


def test_demon_adam_follows_a_learning_rate_schedule():
    params = {"w": np.random.default_rng(1).normal(size=(3, 2)).astype(np.float32)}
    grads_seq = _grads(4)
    got = _run(demon_adam(lambda count: 1e-2 * 0.5 ** count, total_steps=6), grads_seq, params)
    want = _numpy_demon_adam(params["w"], [g["w"] for g in grads_seq],
                             lambda t: 1e-2 * 0.5 ** t, 0.9, 6, 0.999, 1e-8, 0.0)
    np.testing.assert_allclose(got["w"], want, rtol=2e-5, atol=1e-6)


def _numpy_adam(p, grads_seq, lr, wd, decoupled, b1=0.9, b2=0.999, eps=1e-8):
    """torch.optim.Adam (L2 in the gradient) or AdamW (decoupled), step by step in numpy."""
    p = p.astype(np.float64)
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads_seq, start=1):
        g = g.astype(np.float64)
        if decoupled:
            p = p * (1 - lr * wd)
        else:
            g = g + wd * p
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return p


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_weight_decay_as_torch(name):
    params = {"w": np.random.default_rng(2).normal(size=(3, 2)).astype(np.float32)}
    grads_seq = _grads(5)
    got = _run(make_optimizer(name=name, lr=1e-2, weight_decay=0.1), grads_seq, params)
    want = _numpy_adam(params["w"], [g["w"] for g in grads_seq], 1e-2, 0.1, name == "adamw")
    np.testing.assert_allclose(got["w"], want, rtol=1e-5, atol=1e-6)


def test_schedules():
    cosine = make_schedule("cosine", 1e-3, steps_per_epoch=10, epochs=4)
    np.testing.assert_allclose([float(cosine(s)) for s in (0, 20, 40)], [1e-3, 5e-4, 0.0],
                               atol=1e-9)
    exponential = make_schedule("exponential", 1e-3, steps_per_epoch=10, epochs=4)
    values = [float(exponential(s)) for s in (0, 9, 10, 29, 30)]
    d = EXPONENTIAL_DECAY_PER_EPOCH
    np.testing.assert_allclose(values, [1e-3, 1e-3, 1e-3 * d, 1e-3 * d ** 2, 1e-3 * d ** 3],
                               rtol=1e-6)
    assert float(make_schedule("constant", 1e-3, 10, 4)(1000)) == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        make_schedule("linear", 1e-3, 10, 4)


@pytest.mark.parametrize("name", ["adam", "demon_adam"])
def test_accumulation_equals_one_big_batch_step(name):
    # linear least squares: 4 micro-batches of 2 rows accumulated == one step on all 8 rows
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(8, 3)).astype(np.float32), rng.normal(size=(8,)).astype(np.float32)
    loss = lambda p, xb, yb: jnp.mean((xb @ p["w"] - yb) ** 2)  # noqa: E731
    grad = jax.jit(jax.grad(loss))
    params = {"w": np.zeros(3, np.float32)}
    settings = dict(name=name, lr=1e-2, weight_decay=1e-3, schedule="cosine", steps_per_epoch=2,
                    epochs=2)
    micro = [grad(params, x[i:i + 2], y[i:i + 2]) for i in range(0, 8, 2)]
    accumulated = make_optimizer(accum=4, **settings)
    state, update = accumulated.init(params), jax.jit(accumulated.update)
    p_acc = params
    for i, g in enumerate(micro):
        updates, state = update(g, state, p_acc)
        p_acc = optax.apply_updates(p_acc, updates)
        if i < 3:
            np.testing.assert_array_equal(p_acc["w"], params["w"])  # no update mid-accumulation
    p_big = _run(make_optimizer(**settings), [grad(params, x, y)], params)
    np.testing.assert_allclose(p_acc["w"], p_big["w"], rtol=1e-5, atol=1e-7)


def test_make_optimizer_reads_config_objects_and_rejects_typos():
    cfg = OptimizerConfig(name="adamw", lr=3e-4)
    params = {"w": np.ones(2, np.float32)}
    g = [{"w": np.ones(2, np.float32)}]
    np.testing.assert_allclose(_run(make_optimizer(cfg), g, params)["w"],
                               _run(make_optimizer({"name": "adamw", "lr": 3e-4, "seed": 1}), g,
                                    params)["w"])
    with pytest.raises(TypeError, match="lerning_rate"):
        make_optimizer(lerning_rate=1e-3)
    with pytest.raises(ValueError, match="--optimizer=sgd: choose one of"):
        make_optimizer(name="sgd")
