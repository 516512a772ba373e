"""Architectures by name: the weights loader's errors."""

import pytest
from flax import nnx

from bigjax.errors import _classify
from bigjax.models import arch, vit


def test_a_missing_init_file_is_a_user_error(tmp_path):
    encoder = vit.build("vit_small_patch16_224", embed_dim=8, depth=1, num_heads=2, rngs=nnx.Rngs(0))
    with pytest.raises(FileNotFoundError, match="--init .*nope.safetensors: no such file") as err:
        arch.load(encoder, "vit_small_patch16_224", str(tmp_path / "nope.safetensors"))
    assert _classify(err.value, ("bigjax",))[1] == 2  # one line "error: ...", not a traceback
