"""Vision Transformer tile encoders in timm's layout, and the pathology foundation models built on it.

``ViT(config)`` is timm's ``VisionTransformer`` with ``num_classes=0``: a patch embedding (a conv with
stride = kernel = patch size), a class token and optional register tokens, a learned absolute position
embedding (resampled to other tile sizes with timm's rule, ``pos_embed.py``), pre-norm blocks
(LayerNorm, multi-head self-attention with a fused ``qkv`` projection, LayerScale, LayerNorm, a GELU MLP
or a packed SwiGLU, LayerScale) and a final LayerNorm; the embedding is the class token, the mean of
the patch tokens (timm's ``global_pool='avg'``, normalised by ``fc_norm``), or Virchow's concatenation
of both. Parameter names follow timm's state dict (``blocks.3.attn.qkv.weight``), so
``load_timm(model, "model.safetensors")`` reads a timm checkpoint without torch.

Layout. bigjax tiles are NHWC (``(N, H, W, 3)``, normalised with ``config.normalization``);
timm takes NCHW. To feed the same batch to both: ``x_nhwc = x_nchw.transpose(0, 2, 3, 1)``.
``model(x_nhwc, train=False)`` gives the ``(N, D)`` embedding timm's
``create_model(name, num_classes=0, **card_kwargs)(x_nchw)`` gives. ``train`` is accepted for the
encoder interface; the model has no dropout or stochastic depth (the cards' inference settings).

References: Dosovitskiy et al., "An Image is Worth 16x16 Words" (2021); Touvron et al., "Going deeper
with Image Transformers" (LayerScale, 2021); Shazeer, "GLU Variants Improve Transformer" (SwiGLU, 2020);
Darcet et al., "Vision Transformers Need Registers" (2024); timm ``models/vision_transformer.py``.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bigjax.models.vit_configs import ALIASES, CONFIGS, ViTConfig

__all__ = ["ViT", "ViTConfig", "CONFIGS", "build", "config_for", "load_timm", "resample_pos_embed",
           "resize_matrix", "embed_tokens", "pool_tokens", "timm_names"]

LN_EPS = 1e-6  # timm.layers.LayerNorm


def config_for(name: str, **overrides) -> ViTConfig:
    """The config named ``name`` (a key of ``CONFIGS`` or ``ALIASES``) with fields overridden."""
    key = ALIASES.get(name, name)
    if key not in CONFIGS:
        raise KeyError(f"unknown ViT {name!r}; known: {sorted(CONFIGS)} and {sorted(ALIASES)}")
    return replace(CONFIGS[key], **overrides)


def build(name: str, *, rngs: nnx.Rngs | None = None, **overrides) -> "ViT":
    """The ViT named ``name`` with config fields overridden, e.g. ``build("uni2_h")``,
    ``build("vit_base_patch16", img_size=256)`` or a tiny test model
    ``build("vit_small_patch16_224", embed_dim=8, depth=2, num_heads=2)``."""
    return ViT(config_for(name, **overrides), rngs=rngs)


class PatchEmbed(nnx.Module):
    """Non-overlapping ``p x p`` patches projected to ``D``: timm's ``Conv2d(3, D, p, stride=p)``."""

    def __init__(self, patch: int, dim: int, dtype, rngs: nnx.Rngs):
        self.patch = patch
        self.proj = nnx.Conv(3, dim, (patch, patch), strides=(patch, patch), padding="VALID",
                             dtype=dtype, rngs=rngs)

    def __call__(self, x):
        _, h, w, _ = x.shape
        p = self.patch
        if h % p or w % p:
            raise ValueError(f"tile {h}x{w} is not a multiple of the patch size {p}")
        return self.proj(x)  # (N, H/p, W/p, D); row-major tokens as timm's flatten(2)


class Attention(nnx.Module):
    """Multi-head self-attention with timm's fused ``qkv`` projection and output ``proj``."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool, dtype, rngs: nnx.Rngs):
        if dim % heads:
            raise ValueError(f"embed dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nnx.Linear(dim, 3 * dim, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.proj = nnx.Linear(dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        n, length, dim = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.heads, dim // self.heads)
        q, k, v = (qkv[:, :, i].transpose(0, 2, 1, 3) for i in range(3))  # (N, heads, L, hd)
        scores = jnp.einsum("nhqd,nhkd->nhqk", q, k) / math.sqrt(dim // self.heads)
        # softmax in float32 whatever the matmul dtype, as torch autocast does
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("nhqk,nhkd->nhqd", probs, v)
        return self.proj(out.transpose(0, 2, 1, 3).reshape(n, length, dim))


class Mlp(nnx.Module):
    """timm's ``Mlp`` (fc1, exact GELU, fc2) or ``SwiGLUPacked`` (fc1 to 2h, SiLU(a) * b, fc2 from h)."""

    def __init__(self, dim: int, hidden: int, swiglu: bool, dtype, rngs: nnx.Rngs):
        if swiglu and hidden % 2:
            raise ValueError(f"a packed SwiGLU needs an even hidden width, got {hidden}")
        self.swiglu = swiglu
        self.fc1 = nnx.Linear(dim, hidden, dtype=dtype, rngs=rngs)
        self.fc2 = nnx.Linear(hidden // 2 if swiglu else hidden, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        h = self.fc1(x)
        if self.swiglu:
            gate, value = jnp.split(h, 2, axis=-1)
            h = jax.nn.silu(gate) * value
        else:
            h = jax.nn.gelu(h, approximate=False)  # torch.nn.GELU is the erf form
        return self.fc2(h)


class LayerScale(nnx.Module):
    """Per-channel scale ``gamma`` on a residual branch (Touvron et al. 2021), timm's ``ls1``/``ls2``."""

    def __init__(self, dim: int, init: float):
        self.gamma = nnx.Param(jnp.full((dim,), init, jnp.float32))

    def __call__(self, x):
        return x * self.gamma[...]


class Block(nnx.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm1(x)))``, then ``x + ls2(mlp(norm2(x)))``."""

    def __init__(self, c: ViTConfig, rngs: nnx.Rngs):
        d, dtype = c.embed_dim, jnp.dtype(c.dtype)
        self.norm1 = nnx.LayerNorm(d, epsilon=LN_EPS, rngs=rngs)
        self.attn = Attention(d, c.num_heads, c.qkv_bias, dtype, rngs)
        self.ls1 = LayerScale(d, c.init_values) if c.init_values else None
        self.norm2 = nnx.LayerNorm(d, epsilon=LN_EPS, rngs=rngs)
        self.mlp = Mlp(d, int(d * c.mlp_ratio), c.mlp == "swiglu", dtype, rngs)
        self.ls2 = LayerScale(d, c.init_values) if c.init_values else None

    def __call__(self, x):
        x = x + _scaled(self.ls1, self.attn(self.norm1(x)))
        return x + _scaled(self.ls2, self.mlp(self.norm2(x)))


def _scaled(ls, x):
    return x if ls is None else ls(x)


class ViT(nnx.Module):
    """timm-layout Vision Transformer encoder: NHWC tiles in, ``(N, D)`` embedding out (see module doc).

    The model runs in three steps a streaming path can take apart: ``embed`` (patches, prefix tokens,
    position embedding) → ``blocks[i]`` → ``head`` (final norm and pooling).
    """

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs | None = None):
        rngs = rngs or nnx.Rngs(0)
        c = self.config = config
        d, init = c.embed_dim, nnx.initializers.normal(0.02)
        self.patch_embed = PatchEmbed(c.patch_size, d, jnp.dtype(c.dtype), rngs)
        self.cls_token = nnx.Param(init(rngs.params(), (1, 1, d))) if c.class_token else None
        self.reg_token = nnx.Param(init(rngs.params(), (1, c.reg_tokens, d))) if c.reg_tokens else None
        self.pos_embed = nnx.Param(init(rngs.params(), (1, c.pos_embed_len, d)))
        self.blocks = nnx.List([Block(c, rngs) for _ in range(c.depth)])
        final = nnx.LayerNorm(d, epsilon=LN_EPS, rngs=rngs)
        # timm moves the final norm after the pooling for global_pool='avg' (``fc_norm``)
        self.norm, self.fc_norm = (None, final) if c.pool == "avg" else (final, None)

    @property
    def embed_dim(self) -> int:
        c = self.config
        return 2 * c.embed_dim if c.pool == "cls_mean" else c.embed_dim

    def embed_parts(self):
        """The modules and tokens ``embed_tokens`` reads (what a streaming path moves to the device)."""
        return self.patch_embed, self.cls_token, self.reg_token, self.pos_embed

    def head_parts(self):
        return self.norm, self.fc_norm

    def embed(self, x):
        """Patch tokens plus position embedding, with the class and register tokens in front."""
        return embed_tokens(self.config, self.embed_parts(), x)

    def head(self, tokens):
        """Final norm and the card's embedding: class token, patch mean, or both (Virchow)."""
        return pool_tokens(self.config, self.head_parts(), tokens)

    def __call__(self, x, *, train: bool = False):
        tokens = self.embed(jnp.asarray(x, jnp.float32))
        for block in self.blocks:
            tokens = block(tokens)
        return self.head(tokens)


def embed_tokens(c: ViTConfig, parts, x):
    """timm's ``patch_embed`` + ``_pos_embed``: (N, H, W, 3) tiles → (N, prefix + gh*gw, D) tokens."""
    patch_embed, cls_token, reg_token, pos_embed = parts
    patches = patch_embed(x)
    n, gh, gw, d = patches.shape
    pos = resample_pos_embed(pos_embed[...], (gh, gw), c.grid, c.embedded_prefix,
                             antialias=c.pos_antialias)
    tokens = patches.reshape(n, gh * gw, d)
    prefix = [jnp.broadcast_to(t[...], (n, *t.shape[1:])) for t in (cls_token, reg_token)
              if t is not None]
    if c.no_embed_class:  # deit-3 / DINOv2-registers: the prefix tokens get no position
        return jnp.concatenate([*prefix, tokens + pos], axis=1)
    return jnp.concatenate([*prefix, tokens], axis=1) + pos


def pool_tokens(c: ViTConfig, parts, tokens):
    """timm's final ``norm`` + ``pool`` (+ ``fc_norm`` for 'avg'), or Virchow's class + patch mean."""
    norm, fc_norm = parts
    if c.pool == "avg":
        return fc_norm(jnp.mean(tokens[:, c.num_prefix:], axis=1))
    tokens = norm(tokens)
    if c.pool == "token":
        return tokens[:, 0]
    return jnp.concatenate([tokens[:, 0], jnp.mean(tokens[:, c.num_prefix:], axis=1)], axis=-1)


def resize_matrix(old: int, new: int, antialias: bool) -> np.ndarray:
    """The ``(new, old)`` matrix of PyTorch's 1-D bicubic resize, ``align_corners=False``.

    Without antialias: Keys' cubic convolution with ``A = -0.75`` at source ``(i + 0.5) * old/new - 0.5``,
    taps at ``floor - 1 .. floor + 2`` clamped to the border (``upsample_bicubic2d``). With antialias
    (``_upsample_bicubic2d_aa``, PIL's rule): ``A = -0.5``, the kernel widened by ``old/new`` when
    shrinking, taps limited to the image and the weights renormalised to sum to one.
    """
    scale = old / new
    m = np.zeros((new, old), np.float64)
    for i in range(new):
        if antialias:
            support = 2.0 * max(scale, 1.0)
            center, inv = scale * (i + 0.5), 1.0 / max(scale, 1.0)
            lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), old)
            w = np.array([_cubic((j - center + 0.5) * inv, -0.5) for j in range(lo, hi)])
            m[i, lo:hi] = w / w.sum()
        else:
            src = (i + 0.5) * scale - 0.5
            base = math.floor(src)
            for j in range(base - 1, base + 3):
                m[i, min(max(j, 0), old - 1)] += _cubic(src - j, -0.75)
    return m.astype(np.float32)


def _cubic(x: float, a: float) -> float:
    """Keys' cubic convolution kernel with parameter ``a`` (Keys 1981)."""
    x = abs(x)
    if x < 1:
        return ((a + 2) * x - (a + 3)) * x * x + 1
    if x < 2:
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return 0.0


def resample_pos_embed(pos_embed, new_grid, old_grid, num_prefix: int, *, antialias: bool = True):
    """timm's ``resample_abs_pos_embed``: bicubic resize of the position grid, prefix rows kept.

    Args:
      pos_embed: ``(1, num_prefix + gh*gw, D)``, rows of the patch grid in row-major order.
      new_grid, old_grid: ``(rows, cols)`` of the patch grid wanted and stored.
      num_prefix: leading rows that belong to class/register tokens (0 with ``no_embed_class``).
      antialias: timm's default (True) as its ``dynamic_img_size`` forward uses; its ``.npz`` import
        resizes with False.
    Returns the resized ``(1, num_prefix + new_rows*new_cols, D)``; differentiable in ``pos_embed``.
    """
    new_grid, old_grid = tuple(new_grid), tuple(old_grid)
    if num_prefix + old_grid[0] * old_grid[1] != pos_embed.shape[1]:
        raise ValueError(f"pos_embed has {pos_embed.shape[1]} rows, not {num_prefix} prefix + "
                         f"{old_grid[0]}x{old_grid[1]} grid")
    if new_grid == old_grid:
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    grid = grid.reshape(old_grid[0], old_grid[1], -1)
    rows = resize_matrix(old_grid[0], new_grid[0], antialias)
    cols = resize_matrix(old_grid[1], new_grid[1], antialias)
    grid = jnp.einsum("ah,bw,hwd->abd", rows, cols, grid, precision="highest")
    return jnp.concatenate([prefix, grid.reshape(1, -1, grid.shape[-1])], axis=1)


# flax leaf -> timm leaf
_TIMM_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "gamma": "gamma"}
_TOKENS = ("cls_token", "reg_token", "pos_embed")


def timm_names(model: ViT) -> dict[str, tuple]:
    """timm state-dict key → (NNX path, variable) for every parameter of ``model``."""
    names = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1] in _TOKENS:
            names[path[-1]] = (path, var)
        else:
            names[".".join(map(str, (*path[:-1], _TIMM_LEAF[path[-1]])))] = (path, var)
    return names


def load_timm(model: ViT, source: str | Path | Mapping[str, np.ndarray]) -> None:
    """Load a timm ViT state dict (``num_classes=0``) into ``model``, in place, without torch.

    Args:
      model: a ``ViT`` built with the checkpoint's config.
      source: a ``.safetensors`` file or a name → array mapping with timm's key names. Linear weights
        ``(out, in)`` are transposed to ``(in, out)``, the patch conv ``(D, 3, p, p)`` to HWIO.
        ``head.*`` (a classifier) is ignored.
    Raises:
      KeyError naming every unknown and missing key; ValueError naming every mis-shaped one.
    """
    tensors = _read_tensors(source)
    wanted = timm_names(model)
    where = str(source) if isinstance(source, (str, Path)) else "weights"
    unknown = sorted(k for k in tensors if k not in wanted and not k.startswith("head."))
    missing = sorted(k for k in wanted if k not in tensors)
    if unknown or missing:
        raise KeyError(f"{where}: for a {model.config.name or 'ViT'} with depth "
                       f"{model.config.depth}: unknown key(s) {unknown}; missing key(s) {missing}")
    converted = {k: _from_timm(tensors[k]) for k in wanted}
    wrong = [f"{k}: {tuple(tensors[k].shape)} (model wants {_to_timm_shape(var.shape)})"
             for k, (_, var) in wanted.items() if converted[k].shape != var.shape]
    if wrong:
        raise ValueError(f"{where}: mis-shaped key(s): " + "; ".join(wrong))
    nnx.update(model, nnx.from_flat_state(
        [(path, var.replace(jnp.asarray(converted[k]))) for k, (path, var) in wanted.items()]))


def _read_tensors(source) -> dict[str, np.ndarray]:
    if isinstance(source, (str, Path)):
        from safetensors.numpy import load_file
        return load_file(str(source))
    return dict(source)


def _from_timm(value) -> np.ndarray:
    value = np.asarray(value, np.float32)
    if value.ndim == 4:  # conv OIHW -> HWIO
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 2:  # linear (out, in) -> (in, out)
        return value.T
    return value


def _to_timm_shape(shape) -> tuple:
    shape = tuple(shape)
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return shape[::-1] if len(shape) == 2 else shape
