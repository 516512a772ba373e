"""The compiled-memory report of a ViT block: the streamed block's kernels stay under the budget while
the plain block kernel grows with the sequence (a tiny ViT, compiled only)."""

import pytest

from bigjax.models.vit_memory import block_memory

TINY = dict(embed_dim=32, depth=1, num_heads=2, patch_size=4, img_size=16)


@pytest.mark.slow
def test_streamed_kernels_are_bounded_by_the_budget_the_plain_one_is_not():
    budget = 2**20
    rows = [block_memory("vit_base_patch16_224", side, "float32", budget, **TINY) for side in (16, 96)]
    assert rows[0]["tokens"] == 1 + 16 and rows[1]["tokens"] == 1 + 24 ** 2
    assert rows[1]["plain"] > 4 * budget > 4 * rows[0]["plain"]  # (L, L) scores per head
    for kind in ("qkv", "out", "attention"):
        size, nbytes = rows[1][kind]
        assert size < rows[1]["tokens"] and nbytes <= budget, kind  # partitions or blocks of the sequence
