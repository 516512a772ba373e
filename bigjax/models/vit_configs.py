"""Named ViT configurations: timm's ViT-S/B/L/H/g and the pathology foundation models built on them.

Each entry carries what ``timm.create_model(name, num_classes=0, **kwargs)`` builds, read from timm's
``vision_transformer.py`` (model functions and ``_cfg`` defaults) and the model cards' ``timm_kwargs``,
plus the card's embedding rule and input normalisation. The pathology cards (read 2026-12-01):

* UNI (MahmoodLab/UNI): ``vit_large_patch16_224``, ``init_values=1e-5``, ``dynamic_img_size=True``; class
  token; ImageNet mean/std.
* UNI2-h (MahmoodLab/UNI2-h): ``vit_giant_patch14_224`` with depth 24, 24 heads, D 1536,
  ``mlp_ratio=2.66667*2``, ``SwiGLUPacked``/SiLU, 8 registers, ``no_embed_class``, ``init_values=1e-5``;
  class token; ImageNet mean/std.
* Virchow / Virchow2 (paige-ai): ``vit_huge_patch14_224``, ``mlp_ratio=5.3375``, ``SwiGLUPacked``/SiLU,
  ``init_values=1e-5``, ``global_pool=''`` (Virchow2: 4 registers, position rows for them kept); the
  embedding is ``concat(class token, mean of patch tokens)``, 2560 wide; ImageNet mean/std.
* Prov-GigaPath (prov-gigapath/prov-gigapath): ``vit_giant_patch14_dinov2`` at ``patch_size=16``,
  ``img_size=224`` (40 blocks, D 1536, SwiGLUPacked, LayerScale 1e-5); class token; ImageNet mean/std.
* H-optimus-0/1 (bioptimus): ``vit_giant_patch14_reg4_dinov2`` at 224 with ``init_values=1e-5``; class
  token; mean (0.707223, 0.578729, 0.703617), std (0.211883, 0.230117, 0.177517). (The hub config was
  not readable here; ``load_timm`` names any key whose shape disagrees.)
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ViTConfig", "CONFIGS", "ALIASES", "IMAGENET", "INCEPTION", "H_OPTIMUS"]

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
INCEPTION = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # timm's default for the augreg ImageNet ViTs
H_OPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))


@dataclass(frozen=True)
class ViTConfig:
    """One timm ``VisionTransformer`` (``num_classes=0``) and how its embedding is read.

    Attributes:
      mlp: "gelu" (timm ``Mlp``) or "swiglu" (``SwiGLUPacked``: fc1 to ``int(D*mlp_ratio)``, halves
        gated by SiLU, fc2 from half of it).
      pool: "token" (class token after the final norm), "avg" (timm ``global_pool='avg'``: mean of
        patch tokens, then ``fc_norm``) or "cls_mean" (Virchow: class token and patch mean, both after
        the final norm, concatenated).
      no_embed_class: the position embedding covers the patch grid only (prefix tokens get none).
      pos_antialias: the resize rule for other tile sizes (timm's ``resample_abs_pos_embed`` default).
      normalization: (mean, std) per RGB channel, applied to [0, 1] pixels before the model.
      dtype: the matmuls' dtype ("bfloat16" for mixed-precision fine-tuning, as torch AMP): parameters,
        the residual stream, LayerNorms and the softmax stay float32.
    """

    name: str = ""
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    init_values: float | None = None
    class_token: bool = True
    reg_tokens: int = 0
    no_embed_class: bool = False
    mlp: str = "gelu"
    pool: str = "token"
    pos_antialias: bool = True
    normalization: tuple = IMAGENET
    dtype: str = "float32"

    def __post_init__(self):
        if self.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"mlp must be 'gelu' or 'swiglu', got {self.mlp!r}")
        if self.pool not in ("token", "avg", "cls_mean"):
            raise ValueError(f"pool must be 'token', 'avg' or 'cls_mean', got {self.pool!r}")
        if self.pool != "avg" and not self.class_token:
            raise ValueError(f"pool {self.pool!r} reads the class token, but class_token=False")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of patch {self.patch_size}")

    @property
    def grid(self) -> tuple[int, int]:
        g = self.img_size // self.patch_size
        return g, g

    @property
    def num_prefix(self) -> int:
        return int(self.class_token) + self.reg_tokens

    @property
    def embedded_prefix(self) -> int:
        """Prefix tokens that have a row in ``pos_embed``."""
        return 0 if self.no_embed_class else self.num_prefix

    @property
    def pos_embed_len(self) -> int:
        return self.grid[0] * self.grid[1] + self.embedded_prefix


def _vit(name, **kw) -> tuple[str, ViTConfig]:
    return name, ViTConfig(name=name, **kw)


_S = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
_B = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
_L = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16)
_H = dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16)
_G_DINOV2 = dict(patch_size=14, embed_dim=1536, depth=40, num_heads=24, init_values=1e-5,
                 mlp_ratio=2.66667 * 2, mlp="swiglu")
_SWIGLU_H = dict(_H, mlp_ratio=5.3375, mlp="swiglu", init_values=1e-5, pool="cls_mean")

CONFIGS: dict[str, ViTConfig] = dict([
    _vit("vit_small_patch16_224", **_S, normalization=INCEPTION),
    _vit("vit_base_patch16_224", **_B, normalization=INCEPTION),
    _vit("vit_large_patch16_224", **_L, normalization=INCEPTION),
    _vit("vit_huge_patch14_224", **_H, normalization=INCEPTION),
    _vit("vit_giant_patch14_224", patch_size=14, embed_dim=1408, depth=40, num_heads=16,
         mlp_ratio=48 / 11, normalization=INCEPTION),
    _vit("vit_giant_patch14_dinov2", **_G_DINOV2, img_size=518),
    _vit("vit_giant_patch14_reg4_dinov2", **_G_DINOV2, img_size=518, reg_tokens=4,
         no_embed_class=True),
    _vit("uni", **_L, init_values=1e-5),
    _vit("uni2_h", **dict(_G_DINOV2, depth=24), reg_tokens=8, no_embed_class=True),
    _vit("virchow", **_SWIGLU_H),
    _vit("virchow2", **_SWIGLU_H, reg_tokens=4),
    _vit("prov_gigapath", **dict(_G_DINOV2, patch_size=16)),
    _vit("h_optimus_0", **_G_DINOV2, reg_tokens=4, no_embed_class=True, normalization=H_OPTIMUS),
    _vit("h_optimus_1", **_G_DINOV2, reg_tokens=4, no_embed_class=True, normalization=H_OPTIMUS),
])

# the short names of the run config (``--arch=vit_base_patch16``) → timm names
ALIASES = {"vit_small_patch16": "vit_small_patch16_224", "vit_base_patch16": "vit_base_patch16_224",
           "vit_large_patch16": "vit_large_patch16_224", "vit_huge_patch14": "vit_huge_patch14_224",
           "vit_giant_patch14": "vit_giant_patch14_dinov2"}
