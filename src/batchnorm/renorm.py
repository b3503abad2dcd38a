"""Batch Renormalization (Ioffe, 2017): ``BatchRenorm1d/2d/3d``.

Example::

    >>> import torch, batchnorm
    >>> bn = batchnorm.BatchRenorm2d(16, r_max=3.0, d_max=5.0)
    >>> y = bn(torch.randn(4, 16, 8, 8))           # training: renormalised batch statistics
    >>> y_eval = bn.eval()(torch.randn(4, 16, 8, 8))  # eval: exactly BatchNorm2d's eval

In training, with ``sigma = sqrt(running_var + eps)`` and the batch's ``sigma_B =
sqrt(var + eps)`` (``var`` biased, the one the batch is normalised with)::

    r = clip(sigma_B / sigma, 1 / r_max, r_max)              # (C,)
    d = clip((mean - running_mean) / sigma, -d_max, d_max)   # (C,)
    y = w * (xhat * r + d) + b

``r`` and ``d`` are constants in backward (the paper's stop-gradient), so ``y`` is plain batch
norm with weight ``w * r`` and bias ``w * d + b``: autograd through those two per-channel
products gives exactly the paper's gradients while every pass over the data runs in the one
batch-norm Function. ``r`` and ``d`` use the running buffers *before* this batch's update; the
buffers are then updated as BatchNorm's are (torch's convention: ``momentum`` is the weight
of the new batch, ``running_var`` stores the unbiased variance; the paper's moving sigma is
replaced by ``sqrt(running_var + eps)``).

``r_max=1, d_max=0`` is BatchNorm exactly. The paper starts there and relaxes the limits
(to 3 and 5) over training; pass callables for that ramp: ``r_max(step)``, ``d_max(step)``
are called with ``step = int(num_batches_tracked)`` before this batch's increment (0 on the
first training step).

Without running buffers (``track_running_stats=False``) there is nothing to renormalise
towards: r = 1 and d = 0, batch norm on batch statistics.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
from torch import Tensor

from . import backends
from ._conventions import acc_dtype
from ._layout import canonical
from .functional import _eager, _is_compiling, _validate, batch_norm
from .modules import _OurBatchNorm

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d"]

Limit = float | Callable[[int], float]


class _BatchRenorm(_OurBatchNorm):
    """Shared forward of BatchRenorm1d/2d/3d; subclasses differ only in the dims they take."""

    def __init__(
        self,
        num_features: int,
        r_max: Limit = 3.0,
        d_max: Limit = 5.0,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
        backend: str = "auto",
        activation: str | None = None,
    ) -> None:
        if not callable(r_max):
            _check_r_max(r_max)
        if not callable(d_max):
            _check_d_max(d_max)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            bias=bias, backend=backend, activation=activation,
        )  # fmt: skip
        self.r_max = r_max
        self.d_max = d_max

    def limits(self) -> tuple[float, float]:
        """``(r_max, d_max)`` for the next training step, callables evaluated at
        ``int(num_batches_tracked)``; validated."""
        step = 0 if self.num_batches_tracked is None else int(self.num_batches_tracked)
        r_max = self.r_max(step) if callable(self.r_max) else self.r_max
        d_max = self.d_max(step) if callable(self.d_max) else self.d_max
        return _check_r_max(r_max, step), _check_d_max(d_max, step)

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        """``y = act(w * (xhat * r + d) + b [+ residual])`` in training; BatchNorm otherwise."""
        renormalise = self.training and self.track_running_stats and self.running_mean is not None
        if not renormalise:
            return super().forward(input, residual)

        # Validate everything before computing r and d, so that a bad call raises before
        # a buffer moves, with the same messages as BatchNorm's.
        self._check_input_dim(input)
        r_max, d_max = self.limits()
        _validate(
            input, self.running_mean, self.running_var, self.weight, self.bias, True,
            self.momentum, self.eps, self.num_batches_tracked, residual, self.activation,
        )  # fmt: skip
        # (under torch.compile, eagerly: dynamo would trace into the numba dispatcher)
        r_d = _eager(self._r_d) if _is_compiling() else self._r_d
        r, d = r_d(input, r_max, d_max)  # (C,), (C,) constants
        weight = r if self.weight is None else self.weight * r
        bias = d if self.weight is None else self.weight * d
        if self.bias is not None:
            bias = bias + self.bias
        return batch_norm(
            input,
            self.running_mean,
            self.running_var,
            weight,
            bias,
            True,
            self.momentum,
            self.eps,
            num_batches_tracked=self.num_batches_tracked,
            residual=residual,
            activation=self.activation,
            backend=self.backend,
        )

    @torch.no_grad()
    def _r_d(self, input: Tensor, r_max: float, d_max: float) -> tuple[Tensor, Tensor]:
        """The paper's r and d from the batch statistics and the current running buffers.

        This reads x once more than BatchNorm: the statistics are needed before the
        normalising pass, which recomputes them inside the one Function.
        """
        acc = acc_dtype(input.dtype)
        C = input.shape[1]
        if input.numel() == 0:  # no statistics: nothing to renormalise
            ones = torch.ones(C, dtype=acc, device=input.device)
            return ones, torch.zeros_like(ones)
        x3, _ = canonical(input.detach())  # (A, C, B)
        # the backend for x3, not input: under torch.func's grad or jvp, x3 is wrapped even
        # when input (closed over) is not, and has no storage for the kernels
        mean, var = backends.select(self.backend, x3).batch_stats(x3)  # (C,), (C,) biased
        sigma = torch.sqrt(self.running_var.to(acc) + self.eps)  # (C,)
        sigma_batch = torch.sqrt(var + self.eps)  # (C,)
        r = (sigma_batch / sigma).clamp(1.0 / r_max, r_max)
        d = ((mean - self.running_mean.to(acc)) / sigma).clamp(-d_max, d_max)
        return r, d

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r_max={self.r_max!r}, d_max={self.d_max!r}"


def _check_limit(name: str, value, lowest: float, step: int | None = None) -> float:
    """``r_max`` (>= 1) or ``d_max`` (>= 0) as a float; at ``lowest`` it is plain batch norm."""
    where = "" if step is None else f" (returned by the {name} callable at step {step})"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{name} must be a float >= {lowest:g} or a callable of the step, got "
            f"{type(value).__name__}{where}"
        )
    if math.isnan(value) or value < lowest:
        raise ValueError(
            f"{name} must be >= {lowest:g} ({lowest:g} is plain batch norm), got {value}{where}"
        )
    return float(value)


def _check_r_max(value, step: int | None = None) -> float:
    return _check_limit("r_max", value, 1.0, step)


def _check_d_max(value, step: int | None = None) -> float:
    return _check_limit("d_max", value, 0.0, step)


class BatchRenorm1d(_BatchRenorm):
    """Batch renormalization over a 2D ``(N, C)`` or 3D ``(N, C, L)`` input.

    Example::

        >>> import torch, batchnorm
        >>> ramp = lambda step: min(1.0 + step / 1000, 3.0)  # the paper's warm-up of r_max
        >>> bn = batchnorm.BatchRenorm1d(8, r_max=ramp, d_max=5.0)
        >>> bn(torch.randn(32, 8)).shape
        torch.Size([32, 8])

    Args:
        num_features: C.
        r_max: the limit of ``r`` to ``[1 / r_max, r_max]``, >= 1, or a callable of the step
            (``int(num_batches_tracked)``). Default 3.0.
        d_max: the limit of ``d`` to ``[-d_max, d_max]``, >= 0, or a callable. Default 5.0.
        eps, momentum, affine, track_running_stats, device, dtype, bias, backend,
            activation: as :class:`batchnorm.BatchNorm1d`.

    Eval mode is BatchNorm1d's eval: ``r`` and ``d`` apply in training only. See the module
    docstring for the formulas.
    """

    _dims = (2, 3)


class BatchRenorm2d(_BatchRenorm):
    """Batch renormalization over a 4D ``(N, C, H, W)`` input; see :class:`BatchRenorm1d`.

    Example::

        >>> import torch, batchnorm
        >>> batchnorm.BatchRenorm2d(3)(torch.randn(2, 3, 4, 4)).shape
        torch.Size([2, 3, 4, 4])
    """

    _dims = (4,)


class BatchRenorm3d(_BatchRenorm):
    """Batch renormalization over a 5D ``(N, C, D, H, W)`` input; see :class:`BatchRenorm1d`.

    Example::

        >>> import torch, batchnorm
        >>> batchnorm.BatchRenorm3d(3)(torch.randn(2, 3, 2, 4, 4)).shape
        torch.Size([2, 3, 2, 4, 4])
    """

    _dims = (5,)
