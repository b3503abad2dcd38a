"""Ghost batch norm (Hoffer, Hubara and Soudry, 2017): ``GhostBatchNorm1d/2d/3d``.

Example::

    >>> import torch, batchnorm
    >>> bn = batchnorm.GhostBatchNorm2d(16, virtual_batch_size=32)
    >>> y = bn(torch.randn(100, 16, 4, 4))  # 4 virtual batches: 32, 32, 32 and 4 samples
    >>> int(bn.num_batches_tracked)          # one running-statistics update per virtual batch
    4

In training, the batch is split along N into virtual batches of ``virtual_batch_size`` samples
(the last one smaller when N is not a multiple), and each is normalised with its own
statistics, as if it had been a batch of its own: that is the whole method, it keeps the
noise of small-batch statistics while the optimiser sees large batches.

Running statistics: each virtual batch updates the running buffers once, in order, exactly
as a BatchNorm call on that virtual batch would (momentum is the weight of the new virtual
batch; ``running_var`` takes its unbiased variance; ``num_batches_tracked`` counts virtual
batches, so ``momentum=None`` is the cumulative average over virtual batches, each of equal
weight, the smaller last one included).

Eval mode is BatchNorm's eval: the running buffers, or, without them
(``track_running_stats=False``), the statistics of the whole batch.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from ._conventions import verify_batch_size
from .functional import _validate, batch_norm
from .modules import _OurBatchNorm

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d"]


class _GhostBatchNorm(_OurBatchNorm):
    """Shared forward of GhostBatchNorm1d/2d/3d; subclasses differ only in the dims they take."""

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int,
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
        if isinstance(virtual_batch_size, bool) or not isinstance(
            virtual_batch_size, numbers.Integral
        ):
            raise TypeError(
                f"virtual_batch_size must be a positive int (samples per virtual batch), "
                f"got {type(virtual_batch_size).__name__}"
            )
        if virtual_batch_size < 1:
            raise ValueError(f"virtual_batch_size must be >= 1, got {virtual_batch_size}")
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            bias=bias, backend=backend, activation=activation,
        )  # fmt: skip
        self.virtual_batch_size = int(virtual_batch_size)

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        """Training: batch norm per virtual batch, concatenated along N. Eval: BatchNorm's."""
        if not self.training:
            return super().forward(input, residual)

        # Validate the whole call, every virtual batch included, before the first one moves
        # the running buffers.
        self._check_input_dim(input)
        track = self.track_running_stats
        running_mean = self.running_mean if track else None
        running_var = self.running_var if track else None
        num_batches_tracked = self.num_batches_tracked if track else None
        _validate(
            input, running_mean, running_var, self.weight, self.bias, True, self.momentum,
            self.eps, num_batches_tracked, residual, self.activation,
        )  # fmt: skip
        N, v = input.shape[0], self.virtual_batch_size
        if N > 0:
            _verify_virtual_batch(input.shape, min(N, v), v)
            if N % v:
                _verify_virtual_batch(input.shape, N % v, v)

        xs = input.split(v)  # views along N
        residuals = [None] * len(xs) if residual is None else residual.split(v)
        ys = [
            batch_norm(
                x,
                running_mean,
                running_var,
                self.weight,
                self.bias,
                True,
                self.momentum,
                self.eps,
                num_batches_tracked=num_batches_tracked,
                residual=z,
                activation=self.activation,
                backend=self.backend,
            )
            for x, z in zip(xs, residuals)
        ]
        # one copy to put the virtual batches back together; cat keeps channels_last
        return ys[0] if len(ys) == 1 else torch.cat(ys, dim=0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"


def _verify_virtual_batch(shape: torch.Size, size: int, v: int) -> None:
    try:
        verify_batch_size(torch.Size((size, *shape[1:])))
    except ValueError as e:
        raise ValueError(
            f"{e} (a virtual batch of {size} sample(s): input of {shape[0]} samples split "
            f"into virtual batches of {v}); choose a virtual_batch_size that leaves no virtual "
            f"batch of 1 sample, or drop that sample"
        ) from None


class GhostBatchNorm1d(_GhostBatchNorm):
    """Ghost batch norm over a 2D ``(N, C)`` or 3D ``(N, C, L)`` input.

    Example::

        >>> import torch, batchnorm
        >>> bn = batchnorm.GhostBatchNorm1d(8, virtual_batch_size=16)
        >>> bn(torch.randn(64, 8)).shape
        torch.Size([64, 8])

    Args:
        num_features: C.
        virtual_batch_size: samples (along N) per virtual batch; the last one may be smaller.
        eps, momentum, affine, track_running_stats, device, dtype, bias, backend,
            activation: as :class:`batchnorm.BatchNorm1d`.

    Training normalises each virtual batch with its own statistics and updates the running
    buffers once per virtual batch; eval is BatchNorm1d's eval. See the module docstring.
    """

    _dims = (2, 3)


class GhostBatchNorm2d(_GhostBatchNorm):
    """Ghost batch norm over a 4D ``(N, C, H, W)`` input; see :class:`GhostBatchNorm1d`.

    Example::

        >>> import torch, batchnorm
        >>> batchnorm.GhostBatchNorm2d(3, 4)(torch.randn(10, 3, 5, 5)).shape
        torch.Size([10, 3, 5, 5])
    """

    _dims = (4,)


class GhostBatchNorm3d(_GhostBatchNorm):
    """Ghost batch norm over a 5D ``(N, C, D, H, W)`` input; see :class:`GhostBatchNorm1d`.

    Example::

        >>> import torch, batchnorm
        >>> batchnorm.GhostBatchNorm3d(3, 2)(torch.randn(5, 3, 2, 3, 3)).shape
        torch.Size([5, 3, 2, 3, 3])
    """

    _dims = (5,)
