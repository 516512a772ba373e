"""flax NNX modules holding a conv's or a BatchNorm's parameters, runnable big or in memory.

The modules hold parameters only. Called with an ``Execution``, ``BigConv`` and ``BigBatchNorm`` run the
partitioned ops (``big_conv2d``, ``big_batch_norm``) on host activations with that execution's devices
and budget; their ``plain`` methods are the ordinary in-memory layers (jittable), so a model can run
some layers big and the rest as a jitted tail with one set of parameters.
BatchNorm follows torch: momentum 0.1, eps 1e-5, biased variance for normalising and the unbiased one
for the running average.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from bigjax.layers.batchnorm import big_batch_norm, big_batch_norm_inference, fold_batch_norm
from bigjax.layers.conv import big_conv2d, big_conv2d_stats, conv2d
from bigjax.layers.execution import Execution
from bigjax.layers.plan import ConvGeometry

__all__ = ["BigConv", "BigBatchNorm"]


class BigConv(nnx.Module):
    """A 2-D convolution (HWIO kernel, torch's He-normal fan-out init) with a partitioned forward."""

    def __init__(self, in_features: int, out_features: int, kernel_size, *, stride=1, padding=0,
                 dilation=1, use_bias: bool = False, rngs: nnx.Rngs):
        self.geom = ConvGeometry.make(kernel_size, stride, padding, dilation)
        kh, kw = self.geom.kernel
        std = (2.0 / (out_features * kh * kw)) ** 0.5
        self.kernel = nnx.Param(std * jax.random.normal(rngs.params(), (kh, kw, in_features,
                                                                        out_features)))
        self.bias = nnx.Param(jnp.zeros((out_features,))) if use_bias else None

    def _kwargs(self, execution: Execution) -> dict:
        g = self.geom
        return dict(stride=g.stride, padding=g.padding, dilation=g.dilation, execution=execution)

    def __call__(self, x, *, execution: Execution):
        """Partitioned conv of a host activation; result in host memory."""
        bias = None if self.bias is None else self.bias[...]
        return big_conv2d(x, self.kernel[...], bias, **self._kwargs(execution))

    def with_stats(self, x, pre_scale=None, pre_shift=None, *, execution: Execution):
        """Fused path: ``conv(relu(x*pre_scale + pre_shift))`` and its per-channel mean, variance."""
        if self.bias is not None:
            raise ValueError("the fused conv+statistics path is for bias-free convs followed by BN")
        return big_conv2d_stats(x, self.kernel[...], pre_scale=pre_scale, pre_shift=pre_shift,
                                **self._kwargs(execution))

    def plain(self, x):
        """In-memory conv on the compute device (jittable)."""
        y = conv2d(x, self.kernel[...], self.geom)
        return y if self.bias is None else y + self.bias[...]


@functools.partial(jax.jit, static_argnames=("momentum", "count"))
def _running(run_mean, run_var, mean, var, *, momentum, count):
    # one jitted call: run eagerly under jax.grad by the Big path, once per layer
    mean, var = jax.lax.stop_gradient((mean, var))
    unbiased = var * (count / max(count - 1, 1))
    return (1 - momentum) * run_mean + momentum * mean, (1 - momentum) * run_var + momentum * unbiased


class BigBatchNorm(nnx.Module):
    """BatchNorm over NHWC channels with running statistics, partitioned (two passes) or in memory."""

    def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: float = 0.1):
        self.scale = nnx.Param(jnp.ones((num_features,)))
        self.bias = nnx.Param(jnp.zeros((num_features,)))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,)))
        self.var = nnx.BatchStat(jnp.ones((num_features,)))
        self.eps, self.momentum = eps, momentum

    def update_running(self, mean, var, count: int) -> None:
        """Running averages with momentum; the variance is made unbiased (x M/(M-1)), as torch."""
        self.mean[...], self.var[...] = _running(self.mean[...], self.var[...], mean, var,
                                                 momentum=self.momentum, count=count)

    def _update_running_on(self, execution: Execution, mean, var, count: int) -> None:
        """``update_running`` with the running statistics first moved to the compute device."""
        self.mean[...], self.var[...] = map(execution.to_compute, (self.mean[...], self.var[...]))
        self.update_running(mean, var, count)

    def folded(self, batch_mean, batch_var, count: int, *, train: bool, execution: Execution):
        """(a, b) with ``BN(x) = x*a + b``: batch statistics (updating the running ones) or running."""
        scale, bias = execution.to_compute(self.scale[...]), execution.to_compute(self.bias[...])
        if train:
            self._update_running_on(execution, batch_mean, batch_var, count)
            return fold_batch_norm(scale, bias, batch_mean, batch_var, self.eps)
        mean, var = execution.to_compute(self.mean[...]), execution.to_compute(self.var[...])
        return fold_batch_norm(scale, bias, mean, var, self.eps)

    def __call__(self, x, *, train: bool, execution: Execution):
        """Partitioned BatchNorm of a host activation; result in host memory."""
        if not train:
            return big_batch_norm_inference(x, self.scale[...], self.bias[...], self.mean[...],
                                            self.var[...], eps=self.eps, execution=execution)
        y, mean, var = big_batch_norm(x, self.scale[...], self.bias[...], eps=self.eps,
                                      execution=execution)
        self._update_running_on(execution, mean, var, x.size // x.shape[-1])
        return y

    def plain(self, x, *, train: bool):
        """In-memory BatchNorm on the compute device (jittable)."""
        if train:
            mean, var = jnp.mean(x, axis=(0, 1, 2)), jnp.var(x, axis=(0, 1, 2))
            self.update_running(mean, var, x.size // x.shape[-1])
        else:
            mean, var = self.mean[...], self.var[...]
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
