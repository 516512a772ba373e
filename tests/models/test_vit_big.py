"""The Big ViT (stages streaming partitions of tiles, tokens in host memory) equals the in-memory ViT:
embedding, parameter gradients and input gradients, with a budget that forces ragged partitions."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bigjax.layers.execution import Execution
from bigjax.models import vit_big
from bigjax.models.vit_big import tile_bytes

TINY = dict(embed_dim=12, depth=2, num_heads=3, patch_size=4, img_size=12, mlp="swiglu",
            mlp_ratio=2.66667 * 2, reg_tokens=2, no_embed_class=True, init_values=0.2)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def _budget(model, tiles, length):
    """A budget that holds ``tiles`` tiles of ``length`` tokens in a block stage (and its parameters)."""
    fixed = 3 * sum(x.size * 4 for x in jax.tree.leaves(nnx.state(model.blocks[0])))
    return fixed + tiles * tile_bytes("block", model.config, (length, model.config.embed_dim))


def test_big_vit_equals_in_memory_vit_with_gradients():
    big = vit_big.build_big("vit_base_patch16_224", **TINY, rngs=nnx.Rngs(3))
    twin = vit_big.in_memory_twin(big)
    seen = collections.Counter()

    def observer(event, fn, *args, **kwargs):
        seen[event] += 1
        return fn(*args, **kwargs)

    ex = Execution(_budget(big, 2, length=2 + 3 * 4), observer=observer)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 12, 16, 3)).astype(np.float32)  # 3x4 patches: the position grid resampled
    w = jnp.asarray(rng.normal(size=(5, big.embed_dim)).astype(np.float32))

    def loss(model, x, **kw):
        return jnp.sum(model(x, train=True, **kw) * w)

    with jax.transfer_guard("disallow"):  # every move of the streamed forward is explicit
        emb = big(jax.device_put(x, ex.host), train=False, execution=ex)
    assert emb.devices() == {ex.compute}
    assert _rel(emb, nnx.jit(lambda m, x: m(x))(twin, x)) < 1e-5
    assert seen["vit_forward"] >= 2 * 3 + 2  # each block in 3 partitions (2, 2, 1 tiles), embed, head
    seen.clear()
    (g_big, gx_big) = nnx.grad(lambda m, x: loss(m, x, execution=ex), argnums=(0, 1))(big, x)
    (g_ref, gx_ref) = nnx.jit(nnx.grad(loss, argnums=(0, 1)))(twin, x)
    assert seen["vit_backward"] > 0
    flat_big = dict(nnx.to_flat_state(g_big))
    flat_ref = dict(nnx.to_flat_state(g_ref))
    assert flat_big.keys() == flat_ref.keys()
    for path, ref in flat_ref.items():
        assert _rel(flat_big[path][...], ref[...]) < 1e-4, path
    assert _rel(gx_big, gx_ref) < 1e-4


def test_budget_below_one_tile_is_named():
    big = vit_big.build_big("vit_base_patch16_224", **TINY)
    with pytest.raises(ValueError, match=r"budget 2,000 B is below one tile of this ViT's embed stage"):
        big(np.zeros((2, 12, 12, 3), np.float32), execution=Execution(2000))
