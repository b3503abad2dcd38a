"""The readable truth: batch normalization in NumPy float64.

Every backend of this package is tested against these functions. They favour clarity over
speed: one named step per line, the shape of each intermediate in a comment, and the backward
pass mirroring the forward in reverse.

Example::

    >>> import numpy as np
    >>> from batchnorm import reference
    >>> x = np.random.default_rng(0).standard_normal((1, 2, 3, 3))
    >>> y, cache = reference.forward(x, np.ones(2), np.zeros(2), eps=1e-5)
    >>> dx, dweight, dbias = reference.backward(np.ones_like(y), cache)
    >>> dbias  # n = 9 values per channel, the seed notebook's grad_bias
    array([9., 9.])

Conventions (written once here, and once for tensors in ``batchnorm._conventions``):

* training normalises with the *biased* variance ``sum((x - mean)^2) / n``;
* ``running_var`` stores the *unbiased* one, ``var * n / (n - 1)``;
* ``momentum`` is the weight of the new batch (torch's 0.1), ``None`` means a cumulative
  average with factor ``1 / num_batches_tracked``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = [
    "Cache",
    "forward",
    "backward",
    "forward_eval",
    "backward_eval",
    "update_running_stats",
    "momentum_factor",
]


def _channel_axes(x: np.ndarray) -> tuple[int, ...]:
    """Every axis but the channel axis 1: the axes the statistics reduce over."""
    return (0, *range(2, x.ndim))


def _per_channel(v: np.ndarray, ndim: int) -> np.ndarray:
    """Reshape a (C,) vector so that it broadcasts against (N, C, *spatial)."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


class Cache(NamedTuple):
    """What backward needs from forward. ``xhat`` is kept rather than recomputed: the
    reference spends memory for readability; the kernels recompute it from x instead."""

    xhat: np.ndarray  # (N, C, *spatial)
    invstd: np.ndarray  # (C,)
    weight: np.ndarray  # (C,)
    training: bool


def forward(
    x: np.ndarray, weight: np.ndarray | None, bias: np.ndarray | None, eps: float = 1e-5
) -> tuple[np.ndarray, Cache]:
    """Training-mode forward: normalise with the batch's own statistics.

    Returns ``(y, cache)``; ``cache`` also carries what the running-statistics update needs
    through :func:`batch_statistics`.
    """
    x = np.asarray(x, dtype=np.float64)  # (N, C, *spatial)
    C = x.shape[1]
    axes = _channel_axes(x)
    w = np.ones(C) if weight is None else np.asarray(weight, np.float64)  # (C,)
    b = np.zeros(C) if bias is None else np.asarray(bias, np.float64)  # (C,)
    n = x.size // C  # values per channel

    mean = x.sum(axis=axes) / n  # (C,)
    xmu = x - _per_channel(mean, x.ndim)  # (N, C, *spatial)
    var = (xmu**2).sum(axis=axes) / n  # (C,) biased: divides by n, not n - 1
    invstd = _invstd(var, eps)  # (C,)
    xhat = xmu * _per_channel(invstd, x.ndim)  # (N, C, *spatial)
    y = xhat * _per_channel(w, x.ndim) + _per_channel(b, x.ndim)  # (N, C, *spatial)
    return y, Cache(xhat=xhat, invstd=invstd, weight=w, training=True)


def backward(dy: np.ndarray, cache: Cache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward of :func:`forward` (or of :func:`forward_eval`, whose cache says so).

    Returns ``(dx, dweight, dbias)``.
    """
    dy = np.asarray(dy, dtype=np.float64)  # (N, C, *spatial)
    xhat, invstd, w, training = cache
    ndim = dy.ndim
    axes = _channel_axes(dy)
    n = dy.size // dy.shape[1]

    dbias = dy.sum(axis=axes)  # (C,)  sum_dy
    dweight = (dy * xhat).sum(axis=axes)  # (C,)  sum_dy_xhat
    dxhat = dy * _per_channel(w, ndim)  # (N, C, *spatial)
    if not training:
        # eval: mean and invstd are constants (the running buffers)
        return dxhat * _per_channel(invstd, ndim), dweight, dbias
    # training: mean and var depend on x. Step by step, in reverse of forward:
    #   xhat = xmu * invstd, invstd = (var + eps)^-1/2, var = sum(xmu^2)/n, xmu = x - mean
    # collapses to dx = w * invstd / n * (n * dy - sum_dy - xhat * sum_dy_xhat).
    dx = _per_channel(w * invstd / n, ndim) * (
        n * dy - _per_channel(dbias, ndim) - xhat * _per_channel(dweight, ndim)
    )  # (N, C, *spatial)
    return dx, dweight, dbias


def forward_eval(
    x: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
    eps: float = 1e-5,
) -> tuple[np.ndarray, Cache]:
    """Eval-mode forward: normalise with the running buffers, which are constants."""
    x = np.asarray(x, dtype=np.float64)  # (N, C, *spatial)
    C = x.shape[1]
    w = np.ones(C) if weight is None else np.asarray(weight, np.float64)  # (C,)
    b = np.zeros(C) if bias is None else np.asarray(bias, np.float64)  # (C,)
    invstd = _invstd(np.asarray(running_var, np.float64), eps)  # (C,)
    xhat = (x - _per_channel(np.asarray(running_mean, np.float64), x.ndim)) * _per_channel(
        invstd, x.ndim
    )  # (N, C, *spatial)
    y = xhat * _per_channel(w, x.ndim) + _per_channel(b, x.ndim)
    return y, Cache(xhat=xhat, invstd=invstd, weight=w, training=False)


def backward_eval(dy: np.ndarray, cache: Cache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward of :func:`forward_eval`; the same as :func:`backward` with an eval cache."""
    return backward(dy, cache)


def batch_statistics(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """``(mean, var, n)`` of a batch: per channel, var biased."""
    x = np.asarray(x, dtype=np.float64)
    axes = _channel_axes(x)
    n = x.size // x.shape[1]
    mean = x.mean(axis=axes)
    var = ((x - _per_channel(mean, x.ndim)) ** 2).mean(axis=axes)
    return mean, var, n


def momentum_factor(momentum: float | None, num_batches_tracked: int) -> float:
    """The weight of the new batch: ``momentum``, or ``1 / num_batches_tracked`` (already
    incremented for this batch) when ``momentum`` is None, a cumulative average."""
    return 1.0 / num_batches_tracked if momentum is None else float(momentum)


def update_running_stats(
    running_mean: np.ndarray,
    running_var: np.ndarray,
    num_batches_tracked: int,
    x: np.ndarray,
    momentum: float | None = 0.1,
) -> tuple[np.ndarray, np.ndarray, int]:
    """One training step's update of the running buffers from the batch ``x``.

    Returns new ``(running_mean, running_var, num_batches_tracked)``; the inputs are not
    modified. ``running_var`` takes the *unbiased* variance ``var * n / (n - 1)``.
    """
    num_batches_tracked = num_batches_tracked + 1
    if x.size == 0:  # an empty batch counts, but carries no statistics
        return (
            np.array(running_mean, np.float64),
            np.array(running_var, np.float64),
            (num_batches_tracked),
        )
    mean, var, n = batch_statistics(x)
    f = momentum_factor(momentum, num_batches_tracked)
    var_unbiased = var * n / (n - 1)
    new_mean = (1 - f) * np.asarray(running_mean, np.float64) + f * mean
    new_var = (1 - f) * np.asarray(running_var, np.float64) + f * var_unbiased
    return new_mean, new_var, num_batches_tracked


def _invstd(var: np.ndarray, eps: float) -> np.ndarray:
    """``1 / sqrt(var + eps)``, and 0 where ``var + eps == 0`` (torch's convention)."""
    denom = np.sqrt(var + eps)
    with np.errstate(divide="ignore"):
        return np.where(denom == 0, 0.0, 1.0 / np.where(denom == 0, 1.0, denom))
