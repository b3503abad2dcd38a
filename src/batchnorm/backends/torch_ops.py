"""The portable backend: plain torch tensor ops, on any device.

No torch batch-norm op runs here; only reductions (``mean``, ``sum``) and
elementwise arithmetic. Every function takes the canonical ``(A, C, B)`` view
(see ``batchnorm._layout``); per-channel vectors are ``(C,)`` in the accumulation dtype
(float32, or float64 for float64 input).

Memory traffic (float32, per element): forward-train reads x three times (the mean, the
deviations' squares, which it also writes and reads back, then the normalisation) and
writes y once; backward reads dy and x twice and writes dx once. The numba backend fuses
these; this one is the readable, device-independent baseline.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._conventions import acc_dtype, invstd_from_var

name = "torch"
_DIMS = (0, 2)  # every axis of (A, C, B) but C


def supports(x: Tensor) -> bool:
    return True


def _col(v: Tensor) -> Tensor:
    """(C,) -> (1, C, 1), to broadcast against (A, C, B)."""
    return v.view(1, -1, 1)


def batch_stats(x3: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel ``(mean, var)`` of x3 (A, C, B); var biased. Accumulates in float32 at least.

    Two passes, as torch's CPU kernel and the numba backend: the mean, then the variance over
    the deviations from it. ``torch.var_mean`` (Welford) lost digits in proportion to
    |mean| / std (float64 data 1e7 standard deviations from zero: running_var 1e-9 off
    against 1e-16), gave NaN for the mean of a channel holding an infinity (torch's module:
    the infinity), and took 14.6 ms against 0.15-0.3 for ``mean`` on a (32, 256, 784)
    float32 tensor, 2 threads. ``mean`` accumulates float32 in float32: a channel whose sum
    passes 3.4e38 (|x| near 3.4e38 / n) gets an infinite mean where torch's module stays
    finite (README, differences)."""
    xa = x3.to(acc_dtype(x3.dtype))
    mean = xa.mean(dim=_DIMS)  # (C,)
    var = (xa - _col(mean)).square_().mean(dim=_DIMS)  # (C,)
    return mean, var


def normalize(
    x3: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual3: Tensor | None = None,
    relu: bool = False,
) -> Tensor:
    """``y = (x - mean) * invstd * w + b`` (+ residual, then relu), in x's dtype. (A, C, B)."""
    acc = acc_dtype(x3.dtype)
    scale = invstd if weight is None else invstd * weight.to(acc)  # (C,)
    shift = -mean * scale  # (C,)
    if bias is not None:
        shift = shift + bias.to(acc)
    y = x3.to(acc) * _col(scale) + _col(shift)  # (A, C, B)
    if residual3 is not None:
        y = y + residual3.to(acc)
    if relu:
        y = torch.relu(y)
    return y.to(x3.dtype)


def forward_train(
    x3: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    residual3: Tensor | None = None,
    relu: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y3, mean, var, invstd)``: batch statistics, then normalise."""
    mean, var = batch_stats(x3)
    invstd = invstd_from_var(var, eps)
    y3 = normalize(x3, mean, invstd, weight, bias, residual3, relu)
    return y3, mean, var, invstd


def _masked(dy3: Tensor, y3_mask: Tensor | None) -> Tensor:
    """dy through a relu: zero where the output was clipped."""
    if y3_mask is None:
        return dy3
    return torch.ops.aten.threshold_backward(dy3, y3_mask, 0)  # one pass; where() takes three


def grad_sums(
    dy3: Tensor,
    x3: Tensor,
    mean: Tensor,
    invstd: Tensor,
    y3_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(sum_dy, sum_dy_xhat)`` per channel."""
    acc = acc_dtype(x3.dtype)
    dya = _masked(dy3, y3_mask).to(acc)
    sum_dy = dya.sum(dim=_DIMS)  # (C,)
    sum_dy_xmu = (dya * (x3.to(acc) - _col(mean))).sum(dim=_DIMS)  # (C,)
    return sum_dy, sum_dy_xmu * invstd


def grad_input(
    dy3: Tensor,
    x3: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    sum_dy: Tensor,
    sum_dy_xhat: Tensor,
    count: int,
    training: bool,
    y3_mask: Tensor | None = None,
) -> Tensor:
    """dx (A, C, B) in x's dtype.

    training: ``w * invstd * (dy - sum_dy / n - xhat * sum_dy_xhat / n)``;
    eval: ``w * invstd * dy``. ``count`` is n, the values per channel over the whole batch
    (over every process, for SyncBatchNorm).
    """
    acc = acc_dtype(x3.dtype)
    dya = _masked(dy3, y3_mask).to(acc)
    scale = invstd if weight is None else invstd * weight.to(acc)  # (C,)
    if not training:
        return (dya * _col(scale)).to(x3.dtype)
    xhat = (x3.to(acc) - _col(mean)) * _col(invstd)  # (A, C, B)
    dx = (dya - _col(sum_dy / count) - xhat * _col(sum_dy_xhat / count)) * _col(scale)
    return dx.to(x3.dtype)


def backward(
    dy3: Tensor,
    x3: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    training: bool,
    need_dx: bool,
    y3_mask: Tensor | None = None,
) -> tuple[Tensor | None, Tensor, Tensor]:
    """``(dx3 or None, sum_dy, sum_dy_xhat)``; dweight = sum_dy_xhat, dbias = sum_dy."""
    sum_dy, sum_dy_xhat = grad_sums(dy3, x3, mean, invstd, y3_mask)
    dx3 = None
    if need_dx:
        count = x3.shape[0] * x3.shape[2]
        dx3 = grad_input(
            dy3, x3, mean, invstd, weight, sum_dy, sum_dy_xhat, count, training, y3_mask
        )
    return dx3, sum_dy, sum_dy_xhat
