"""The parameter initialisations of the official PyTorch MIL code, as flax layers.

- `torch_linear` / `torch_conv`: PyTorch's defaults for `nn.Linear` and `nn.Conv{1,2}d`
  (`reset_parameters`: `kaiming_uniform_(weight, a=sqrt(5))` and a uniform bias), i.e. weights and
  biases both U(-1/sqrt(fan_in), 1/sqrt(fan_in)), weight std 1/sqrt(3 fan_in); fan_in is
  in_features, or in_channels / groups x the kernel's size for a convolution. Used by every head
  whose official code leaves the defaults (AttentionDeepMIL, DTFD-MIL, TransMIL and the
  nystrom-attention module it imports).
- `xavier_linear`: CLAM's `initialize_weights` (`xavier_normal_` weight, zero bias), which the GMA
  code re-applies to every `nn.Linear`. torch's xavier_normal_ is an untruncated normal of std
  sqrt(2 / (fan_in + fan_out)); flax's `xavier_normal` is truncated, so it is not used.

References:
    torch/nn/modules/linear.py and conv.py (`reset_parameters`); torch/nn/init.py
    (`xavier_normal_`); https://github.com/mahmoodlab/CLAM (utils/utils.py `initialize_weights`).
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

# kaiming_uniform(a=sqrt(5)): gain^2 = 2 / (1 + 5) = 1/3, so bound = sqrt(3 * (1/3) / fan_in).
TORCH_KERNEL = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
XAVIER_NORMAL = nnx.initializers.variance_scaling(1.0, "fan_avg", "normal")


def torch_bias(fan_in: int):
    """PyTorch's default bias initialiser: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_linear(in_features: int, out_features: int, *, rngs: nnx.Rngs,
                 use_bias: bool = True) -> nnx.Linear:
    """`nn.Linear(in_features, out_features, bias=use_bias)` with PyTorch's default init."""
    return nnx.Linear(in_features, out_features, use_bias=use_bias, kernel_init=TORCH_KERNEL,
                      bias_init=torch_bias(in_features), rngs=rngs)


def xavier_linear(in_features: int, out_features: int, *, rngs: nnx.Rngs) -> nnx.Linear:
    """`nn.Linear` re-initialised as CLAM's `initialize_weights`: xavier_normal_ weight, zero bias."""
    return nnx.Linear(in_features, out_features, kernel_init=XAVIER_NORMAL,
                      bias_init=nnx.initializers.zeros_init(), rngs=rngs)


def torch_conv(in_channels: int, out_channels: int, kernel_size: tuple[int, ...], *,
               rngs: nnx.Rngs, groups: int = 1, use_bias: bool = True, **kwargs) -> nnx.Conv:
    """`nn.Conv{1,2}d(..., groups=groups, bias=use_bias)` with PyTorch's default init (kwargs: padding)."""
    fan_in = in_channels // groups * math.prod(kernel_size)
    return nnx.Conv(in_channels, out_channels, kernel_size=kernel_size, feature_group_count=groups,
                    use_bias=use_bias, kernel_init=TORCH_KERNEL, bias_init=torch_bias(fan_in),
                    rngs=rngs, **kwargs)
