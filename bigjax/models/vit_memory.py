"""Compiled device memory of one ViT block's backward on one tile: the plain BigViT block kernel
against the streamed-attention block's kernels under a partition budget.

    python -m bigjax.models.vit_memory --sides=224,1024,4096 --dtypes=float32,bfloat16

Nothing runs: each kernel is lowered for abstract shapes and compiled, and XLA's ``memory_analysis()``
gives its temp + argument + output bytes (on a CPU, XLA:CPU's plan; on a GPU, the device's). The
plain kernel (``vit_streamed.stage_backward`` of a BigViT block) holds a tile's whole sequence and its
(L, L) attention per head; the streamed block's kernels — the "qkv" and "out" token-wise stages at the token partitions
``token_bytes`` allows and the attention steps at the block ``attention_block`` allows — are bounded
by the budget whatever the sequence length. Sequences over ``--plain_up_to`` tokens skip the plain
kernel (its estimate, ``tile_bytes``, is printed instead).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

from bigjax.errors import ArgumentParser
from bigjax.layers import attention
from bigjax.layers.execution import DEFAULT_PARTITION_BYTES
from bigjax.models import vit, vit_big, vit_streamed

__all__ = ["block_memory"]


def _bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return m.temp_size_in_bytes + m.argument_size_in_bytes + m.output_size_in_bytes


def _stage_bytes(kind, parts, config, length, budget, dtype) -> tuple[int, int]:
    """(tokens per partition, compiled bytes) of a token-wise stage's backward kernel."""
    graphdef, state = nnx.split(parts)
    fixed = 3 * sum(leaf.size * 4 for leaf in jax.tree.leaves(state))
    tokens = min(length, (budget - fixed) // vit_streamed.token_bytes(kind, config))
    d, h = config.embed_dim, config.num_heads
    shape = {"x": jax.ShapeDtypeStruct((1, tokens, d), jnp.float32),
             "h": jax.ShapeDtypeStruct((1, h, tokens, d // h), dtype)}
    ins, outs = {"qkv": ("x", "hhh"), "out": ("xh", "x")}[kind]
    args = tuple(shape[a] for a in ins), tuple(shape[a] for a in outs)
    kernel = vit_streamed.stage_backward.lower(vit_streamed._run, graphdef, kind, h, state, state, *args)
    return tokens, _bytes(kernel.compile())


def _attention_bytes(config, length, budget, dtype) -> tuple[int, int]:
    """(block, compiled bytes) of the streamed attention's larger step, the backward's ``_kv_step``."""
    h, hd = config.num_heads, config.embed_dim // config.num_heads
    block = vit_streamed.attention_block((1, h, length, hd), budget)
    q = jax.ShapeDtypeStruct((1, h, block, hd), dtype)
    row = jax.ShapeDtypeStruct((1, h, block), jnp.float32)
    acc = jax.ShapeDtypeStruct((1, h, block, hd), jnp.float32)
    step = attention._kv_step.lower((acc, acc), q, q, q, q, row, row, scale=hd ** -0.5)
    return block, _bytes(step.compile())


def block_memory(name: str, side: int, dtype: str, budget: int, plain_up_to: int = 4097,
                 **overrides) -> dict:
    """Compiled bytes of one block's backward on one ``side``² tile of the ViT ``name`` (config
    fields overridden), as {"plain": bytes, "qkv"/"out": (tokens, bytes), "attention": (block, bytes)}."""
    model = nnx.eval_shape(lambda: vit.build(name, dtype=dtype, **overrides))
    c, block = model.config, model.blocks[0]
    length = c.num_prefix + (side // c.patch_size) ** 2
    row = {"side": side, "tokens": length, "dtype": dtype}
    if length <= plain_up_to:
        graphdef, state = nnx.split(block)
        t = jax.ShapeDtypeStruct((1, length, c.embed_dim), jnp.float32)
        row["plain"] = _bytes(vit_streamed.stage_backward.lower(vit_big._run, graphdef, "block", c, state, state, t, t)
                              .compile())
    else:
        row["plain_estimate"] = vit_big.tile_bytes("block", c, (length, c.embed_dim))
    cdt = jnp.dtype(dtype)
    row["qkv"] = _stage_bytes("qkv", (block.norm1, block.attn.qkv), c, length, budget, cdt)
    row["out"] = _stage_bytes("out", (block.attn.proj, block.ls1, block.norm2, block.mlp, block.ls2),
                              c, length, budget, cdt)
    row["attention"] = _attention_bytes(c, length, budget, cdt)
    return row


def main(argv=None) -> None:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vit_base_patch16_224")
    p.add_argument("--sides", default="224,1024")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--budget", type=int, default=DEFAULT_PARTITION_BYTES)
    p.add_argument("--plain_up_to", type=int, default=4097, help="longest sequence to compile plainly")
    a = p.parse_args(argv)
    for side in map(int, a.sides.split(",")):
        for dtype in a.dtypes.split(","):
            print(block_memory(a.arch, side, dtype, a.budget, a.plain_up_to), flush=True)


if __name__ == "__main__":
    main()
