"""The sweep: a two-point run in CI, round-robin timing with loads recorded, skipped and unsupported
points, and JAX's activation offload peer (same gradients as in memory where the backend runs it)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigjax.bench import memory, peers, sweep
from bigjax.bench.report import write_sweep
from bigjax.bench.sweep import SweepConfig, run_sweep
from bigjax.models.resnet import ResNet
from bigjax.models.resnet_paths import InMemory


def _two_point_sweep(tmp_path, configs, compiled_memory):
    cfg = SweepConfig(depth=18, sides=(32, 48), configs=configs, budget=24 * 2**20, warmup=1, reps=2,
                      compiled_memory=compiled_memory)
    seen = []
    result = run_sweep(cfg, progress=False, after_side=lambda part: seen.append(len(part.points)))
    points = result.points
    assert seen == [len(configs), 2 * len(configs)]  # partial results after each side
    assert [(p.config, p.side, p.status) for p in points] == [
        (c, s, "ok") for s in (32, 48) for c in configs]
    assert all(p.mean_s > 0 and p.std_s >= 0 for p in points)
    assert all(p.device_peak_bytes for p in points if compiled_memory or p.config.startswith("big"))
    assert [load.side for load in result.loads] == [32, 48]
    assert all(len(load.start) == 3 and len(load.end) == 3 for load in result.loads)
    text = write_sweep(result, tmp_path, "test")
    assert "| inmemory |" in text and "32² s" in text and "Load average" in text
    assert "| 48² | 1.00 (" in text  # time / in-memory time, with the host peak
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert len(saved["points"]) == 2 * len(configs) and saved["fits"]["big2"] is None  # 2 points
    assert [load["side"] for load in saved["loads"]] == [32, 48]
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_a_two_point_sweep_runs_and_writes_table_json_and_plot(tmp_path):
    _two_point_sweep(tmp_path, ("inmemory", "big2"), compiled_memory=False)


@pytest.mark.slow
def test_every_sweep_configuration_runs(tmp_path):
    _two_point_sweep(tmp_path, sweep.CONFIGS, compiled_memory=True)


def test_timed_iterations_go_round_robin_with_a_rotating_start(monkeypatch):
    order = []

    def fake_setup(name, cfg, x):
        return (lambda: order.append(name) or 0.0), None
    monkeypatch.setattr(sweep, "_setup", fake_setup)
    cfg = SweepConfig(sides=(8,), configs=("inmemory", "big0", "big4"), warmup=1, reps=3)
    points, load = sweep.measure_side(8, cfg)
    assert order == ["inmemory", "big0", "big4",  # set-up and warm-up, one configuration at a time
                     "inmemory", "big0", "big4", "big0", "big4", "inmemory", "big4", "inmemory", "big0"]
    assert [p.status for p in points] == ["ok"] * 3 and load.side == 8


def test_an_out_of_memory_ends_only_its_configuration(monkeypatch):
    calls = {"big0": 0}

    def fake_setup(name, cfg, x):
        def iteration():
            if name == "big0":
                calls["big0"] += 1
                if calls["big0"] == 2:  # the first timed iteration
                    raise MemoryError("host RAM exhausted")
            return 0.0
        return iteration, None
    monkeypatch.setattr(sweep, "_setup", fake_setup)
    cfg = SweepConfig(sides=(8,), configs=("inmemory", "big0"), warmup=1, reps=2)
    points, _ = sweep.measure_side(8, cfg)
    assert [(p.status, p.note) for p in points] == [("ok", ""), ("oom", "host RAM exhausted")]
    assert calls["big0"] == 2


def test_a_point_that_cannot_fit_the_host_is_skipped_before_it_is_built(monkeypatch):
    monkeypatch.setattr(sweep, "_setup", lambda *a: pytest.fail("a skipped point was set up"))
    cfg = SweepConfig(depth=18, sides=(10**6,), configs=("inmemory", "big4"))
    points = run_sweep(cfg, progress=False).points
    assert [p.status for p in points] == ["skipped"] * 2
    assert all(p.note.startswith("predicted ") and "GiB of host memory" in p.note for p in points)


def test_a_tiny_host_limit_skips_a_jitted_point_by_its_compiled_memory(monkeypatch):
    # the architecture's count fits (32² x 600 B ~ 0.6 MB < 0.6 x 4 MB); XLA's memory analysis does not
    cfg = SweepConfig(depth=18, sides=(32,), configs=("inmemory",), host_limit_bytes=4 * 2**20,
                      warmup=1, reps=1)
    (point,), _ = sweep.measure_side(32, cfg)
    assert point.status == "skipped" and point.note.startswith("predicted ")
    assert point.device_peak_bytes > 0.6 * 4 * 2**20


def test_the_prediction_scales_the_last_sides_measured_rise_by_the_area():
    cfg = SweepConfig(depth=18, host_limit_bytes=10 * 2**30)
    last = sweep.Point("big4", 100, "ok", host_step_bytes=2**30)
    assert sweep._predicted("big4", 200, cfg, {"big4": last}) == 4 * 2**30
    assert sweep._predicted("big4", 200, cfg, {}) == memory.predicted_host_bytes(18, 200)
    assert sweep._too_big(4 * 2**30, cfg) is None
    assert sweep._too_big(7 * 2**30, cfg).startswith("predicted 7.00 GiB of host memory")


def test_warm_up_goes_on_while_an_iteration_compiles_and_results_are_not_kept(monkeypatch):
    calls = []
    grow = jax.jit(lambda v: v + 1)

    def fake_setup(name, cfg, x):
        def iteration():
            calls.append(len(calls))
            grow(jnp.zeros((min(len(calls), 3), 5)))  # new shapes (compiles) in the first 3 calls
            return 0.0
        return iteration, None
    monkeypatch.setattr(sweep, "_setup", fake_setup)
    cfg = SweepConfig(sides=(8,), configs=("big0",), warmup=1, reps=2)
    (point,), _ = sweep.measure_side(8, cfg)
    assert len(calls) == 4 + 2 and point.status == "ok"  # 3 compiling + 1 quiet warm-up, 2 timed
    assert point.host_step_bytes is not None and point.host_step_bytes >= 0


def test_fewer_reps_above_a_side():
    cfg = SweepConfig(reps=3, fewer_reps=(1024, 2))
    assert [cfg.reps_at(s) for s in (512, 1024, 1448)] == [3, 3, 2]


def test_offload_is_recorded_unsupported_where_the_backend_cannot_compile_it(monkeypatch):
    monkeypatch.setattr(peers, "offload_support", lambda: "XlaRuntimeError: no pinned_host here")
    cfg = SweepConfig(sides=(8,), configs=("offload",), warmup=1, reps=1)
    (point,), _ = sweep.measure_side(8, cfg)
    assert point.status == "unsupported"
    assert point.note == "not supported on this backend: XlaRuntimeError: no pinned_host here"


def test_this_backend_runs_the_offload_policy_and_its_program_moves_activations_to_host():
    assert peers.offload_support() is None  # CPU, jax 0.10.2: compiles and runs
    model = ResNet(18, rngs=nnx.Rngs(0))
    graph, state = nnx.split(model)
    x = jnp.zeros((1, 33, 33, 3))
    jaxpr = str(jax.make_jaxpr(jax.grad(
        lambda s: jnp.sum(peers.offload_forward(nnx.merge(graph, s), x))))(state))
    # every named activation goes to host memory in the forward pass and comes back for the backward
    assert jaxpr.count("devices=(MemorySpace.Host,)") >= 20
    assert jaxpr.count("devices=(MemorySpace.Host,)") == jaxpr.count("devices=(MemorySpace.Device,)")


def _grads(forward, model, x):
    return nnx.jit(nnx.grad(lambda m, x: jnp.mean(forward(m, x) ** 2), argnums=(0, 1)))(model, x)


def _assert_same_grads(got, ref):
    (gm, gx), (rm, rx) = got, ref
    got_leaves, ref_leaves = jax.tree.leaves(nnx.state(gm)), jax.tree.leaves(nnx.state(rm))
    assert len(got_leaves) == len(ref_leaves) > 0
    for g, r in zip(got_leaves, ref_leaves):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(r))) + 1e-8)
    np.testing.assert_allclose(gx, rx, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(rx))))
    assert float(jnp.max(jnp.abs(rx))) > 0


def test_a_block_under_the_offload_policy_gives_the_in_memory_gradients():
    block = ResNet(18, rngs=nnx.Rngs(3)).layer2[0]  # stride 2 with a projection shortcut
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 11, 9, 64)), jnp.float32)
    offloaded = nnx.remat(lambda b, h: b(peers.Named, h, True), policy=peers.OFFLOAD_POLICY)
    _assert_same_grads(_grads(offloaded, block, x),
                       _grads(lambda b, h: b(InMemory, h, True), block, x))


@pytest.mark.slow
@pytest.mark.parametrize("forward", [peers.offload_forward, peers.remat_forward],
                         ids=["offload", "checkpoint"])
def test_a_peer_gives_the_in_memory_gradients_of_the_whole_resnet(forward):
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 37, 29, 3)), jnp.float32)
    _assert_same_grads(_grads(forward, ResNet(18, rngs=nnx.Rngs(3)), x),
                       _grads(lambda m, x: m(x, train=True), ResNet(18, rngs=nnx.Rngs(3)), x))


def test_sweep_quick_is_three_sides_of_three_configurations_one_rep():
    """``--sweep --quick`` (timed in docs/benchmarks.md): its sides and configurations, one rep;
    explicit --sides still win (the README row's test runs the sweep at tiny sides)."""
    from experiments.benchmark import QUICK_CONFIGS, QUICK_SIDES, parse
    cfg, out = parse(["--sweep", "--quick"])
    assert (cfg.sides, cfg.configs, cfg.reps, out) == (QUICK_SIDES, QUICK_CONFIGS, 1, "runs/sweep")
    assert set(QUICK_CONFIGS) <= set(sweep.CONFIGS) and len(QUICK_SIDES) >= 3  # a power-law fit
    cfg, _ = parse(["--sweep", "--quick", "--sides=32,48"])
    assert cfg.sides == (32, 48) and cfg.configs == QUICK_CONFIGS and cfg.reps == 1
