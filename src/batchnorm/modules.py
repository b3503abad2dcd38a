"""``BatchNorm1d/2d/3d``: torch's modules, with this package's forward.

They subclass ``torch.nn.modules.batchnorm._BatchNorm``, so parameters, buffers, state_dict
keys, ``extra_repr``, ``reset_*``, pickling and every tool that finds batch norms by
``isinstance`` (``swa_utils.update_bn``, ``fuse_conv_bn_eval``, ``convert_sync_batchnorm``)
behave as with torch's. Only ``forward`` differs: it validates first, then runs
:func:`batchnorm.functional.batch_norm`.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import backends
from .functional import ACTIVATIONS, batch_norm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "convert"]


class _OurBatchNorm(_BatchNorm):
    """Shared forward of BatchNorm1d/2d/3d; subclasses differ only in the dims they take."""

    _dims: tuple[int, ...] = ()

    def __init__(
        self,
        num_features: int,
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
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias
        )
        self.backend = backends.check_name(backend)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation

    def _check_input_dim(self, input: Tensor) -> None:
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
        if input.dim() not in self._dims:
            expected = " or ".join(f"{d}D" for d in self._dims)
            raise ValueError(f"expected {expected} input (got {input.dim()}D input)")
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"expected input with {self.num_features} channels (num_features) in dim 1, "
                f"got shape {tuple(input.shape)} with {input.shape[1]} channels"
            )

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        """``y = act(bn(input) [+ residual])``: the residual is added before the activation
        (if any); both are fused into the same pass on the numba backend."""
        self._check_input_dim(input)
        # The same decisions as torch's _BatchNorm.forward, but num_batches_tracked is
        # bumped inside batch_norm, after validation. (Buffers and parameters are read from
        # their dicts: nn.Module.__getattr__ costs a microsecond each on tiny tensors.)
        buffers, params = self._buffers, self._parameters
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        if self.training:
            use_batch_stats = True
        else:
            use_batch_stats = running_mean is None and running_var is None
        track = not self.training or self.track_running_stats
        return batch_norm(
            input,
            running_mean if track else None,
            running_var if track else None,
            params["weight"],
            params["bias"],
            use_batch_stats,
            self.momentum,
            self.eps,
            num_batches_tracked=(
                buffers["num_batches_tracked"]
                if self.training and self.track_running_stats
                else None
            ),
            residual=residual,
            activation=self.activation,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if self.activation is not None:
            s += f", activation={self.activation!r}"
        return s

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("backend", "auto")
        self.__dict__.setdefault("activation", None)


class BatchNorm1d(_OurBatchNorm):
    r"""Batch norm over a 2D ``(N, C)`` or 3D ``(N, C, L)`` input; torch's BatchNorm1d.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    ``Var`` is biased in the output; ``running_var`` keeps the unbiased one.

    Args:
        num_features: C.
        eps: added to the variance inside the square root. Default 1e-5.
        momentum: weight of the new batch in the running averages (torch's convention;
            Keras's 0.99 is 0.01 here), or None for a cumulative average. Default 0.1.
        affine: learnable ``weight`` and ``bias``. Default True.
        track_running_stats: keep ``running_mean``/``running_var``/``num_batches_tracked``;
            without them, batch statistics are used in eval too. Default True.
        bias: (keyword) learnable bias when affine. Default True.
        backend: (keyword) "auto", "torch" or "numba". Default "auto".
        activation: (keyword) None or "relu", fused into the same pass. Default None.

    Shape: input ``(N, C)`` or ``(N, C, L)``; output the same, in the input's memory format.
    """

    _dims = (2, 3)


class BatchNorm2d(_OurBatchNorm):
    r"""Batch norm over a 4D ``(N, C, H, W)`` input; torch's BatchNorm2d.

    See :class:`BatchNorm1d` for the formula and arguments. Contiguous and channels_last
    inputs are both computed without a layout copy; the output keeps the input's format.
    """

    _dims = (4,)


class BatchNorm3d(_OurBatchNorm):
    r"""Batch norm over a 5D ``(N, C, D, H, W)`` input; torch's BatchNorm3d.

    See :class:`BatchNorm1d` for the formula and arguments.
    """

    _dims = (5,)


_TORCH_TO_OURS = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
}


def convert(module: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Replace every ``torch.nn.BatchNorm1d/2d/3d`` in ``module`` with this package's.

    Parameters and buffers are the same tensor objects (an optimizer built before keeps
    working), and each module's training mode is kept. A bare batch norm passed directly is
    converted and returned. Returns the (converted) module.

    Example::

        model = torchvision.models.resnet18()
        model = batchnorm.convert(model)
    """
    backends.check_name(backend)
    if type(module) in _TORCH_TO_OURS:
        return _convert_one(module, _TORCH_TO_OURS[type(module)], backend)
    for name, child in module.named_children():
        converted = convert(child, backend=backend)
        if converted is not child:
            setattr(module, name, converted)
    return module


def _convert_one(bn: _BatchNorm, cls: type[_OurBatchNorm], backend: str) -> _OurBatchNorm:
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    # take every attribute as it is (num_features, eps, momentum, affine, flags, hooks) ...
    new.__dict__.update({k: v for k, v in bn.__dict__.items() if not k.startswith("_")})
    # ... and the same Parameter and buffer objects
    for name, p in bn._parameters.items():
        new._parameters[name] = p
    for name, b in bn._buffers.items():
        new._buffers[name] = b
    new._non_persistent_buffers_set = set(bn._non_persistent_buffers_set)
    new.training = bn.training
    new.backend = backend
    new.activation = None
    return new
