"""Stateless batch norm with torch's signature, computed by this package's own kernels.

Example::

    >>> import torch, batchnorm.functional as BF
    >>> x = torch.randn(8, 3, 5, 5)
    >>> rm, rv = torch.zeros(3), torch.ones(3)
    >>> y = BF.batch_norm(x, rm, rv, training=True, momentum=0.1, eps=1e-5)
    >>> torch.allclose(rv, 0.9 + 0.1 * x.var(dim=(0, 2, 3)))  # running_var is unbiased
    True
"""

from __future__ import annotations

import contextlib

import torch
import torch.autograd.forward_ad as _fwad
from torch import Tensor
from torch._C._functorch import peek_interpreter_stack as _functorch_active

from . import backends
from ._conventions import (
    FLOAT_DTYPES,
    HALF_DTYPES,
    acc_dtype,
    functorch_wrapped,
    has_tangent,
    invstd_from_var,
    momentum_factor,
    update_running_stats,
    verify_batch_size,
)
from ._function import BatchNormFunction, differentiable_forward, differentiable_stats, run_forward

__all__ = ["batch_norm", "ACTIVATIONS"]

# bound once: each attribute hop costs a few microseconds when the interpreter's data has just
# been flushed from the caches by a big tensor (dynamo recognises the function, not the name)
_is_compiling = torch.compiler.is_compiling

ACTIVATIONS = (None, "relu")

# The numba backend once a CPU call has found it importable: its ``lane`` takes the common
# calls without a graph in one kernel call, before validation (it accepts only what
# validation would, and declines the rest).
_lane = None


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    *,
    num_batches_tracked: Tensor | None = None,
    residual: Tensor | None = None,
    activation: str | None = None,
    backend: str = "auto",
) -> Tensor:
    """Batch normalization of ``input`` (N, C, *spatial) over every axis but C.

    The same signature and numbers as ``torch.nn.functional.batch_norm``:

    * ``training=True``: normalise with the batch's mean and *biased* variance; when the
      running buffers are given, update them in place with ``momentum`` and the *unbiased*
      variance ``var * n / (n - 1)``.
    * ``training=False``: normalise with ``running_mean`` / ``running_var``.

    Beyond torch (keyword-only):

    * ``num_batches_tracked``: an int64 scalar tensor, incremented in training; needed for
      ``momentum=None`` (a cumulative average, factor ``1 / num_batches_tracked``).
    * ``residual``, ``activation="relu"``: ``y = relu(bn(x) + residual)`` in one pass.
    * ``backend``: "auto" (fused numba kernels on CPU, plain torch ops elsewhere), "torch"
      or "numba".

    Input is validated before anything moves: a call that raises leaves the buffers and
    ``num_batches_tracked`` untouched.

    Under ``torch.compile`` this runs eagerly, between compiled graphs (dynamo traces Python,
    not numba kernels).
    """
    if _is_compiling():
        return _eager(_compiled)(input, running_mean, running_var, weight, bias, training,
                                 momentum, eps, num_batches_tracked, residual, activation,
                                 backend)  # fmt: skip
    if _transformed(input, running_mean, running_var, weight, bias, residual):
        return _composite(input, running_mean, running_var, weight, bias, training, momentum,
                          eps, num_batches_tracked, residual, activation)  # fmt: skip
    if residual is None and (backend == "auto" or backend == "numba"):
        lane = _lane if _lane is not None else _find_lane(input)
        if lane is not None:
            y = lane.lane(input, running_mean, running_var, weight, bias, training, momentum,
                          eps, num_batches_tracked, activation)  # fmt: skip
            if y is not None:
                return y
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                       num_batches_tracked, residual, activation, backend)  # fmt: skip


def _compiled(input, running_mean, running_var, weight, bias, training, momentum, eps,
              num_batches_tracked, residual, activation, backend) -> Tensor:  # fmt: skip
    """``batch_norm`` where torch.compile (or export) traced it, run eagerly: the transforms'
    check, then the general path. (Not ``batch_norm`` itself: under non-strict export,
    ``_is_compiling`` stays true there, and it would hand itself to itself.)"""
    args = (input, running_mean, running_var, weight, bias, training, momentum, eps,
            num_batches_tracked, residual, activation)  # fmt: skip
    if _transformed(input, running_mean, running_var, weight, bias, residual):
        return _composite(*args)
    return _batch_norm(*args, backend)


def _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                num_batches_tracked, residual, activation, backend) -> Tensor:  # fmt: skip
    _validate(
        input, running_mean, running_var, weight, bias, training, momentum, eps,
        num_batches_tracked, residual, activation,
    )  # fmt: skip
    kernel = backends.select(backend, input)
    use_batch_stats = training
    update = training and running_mean is not None
    relu = activation == "relu"
    needs_grad = torch.is_grad_enabled() and (
        input.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
        or (residual is not None and residual.requires_grad)
    )
    # a backend may do the whole call in one kernel (and the backward in one more), with the
    # general path's bytes
    y = _direct(kernel, input, running_mean, running_var, weight, bias, use_batch_stats,
                update, momentum, eps, num_batches_tracked, relu, residual, needs_grad)  # fmt: skip
    if y is not None:
        return y

    acc = acc_dtype(input.dtype)
    mean_in = invstd_in = None
    if not use_batch_stats:
        mean_in = _constant(running_mean, acc)
        invstd_in = invstd_from_var(_constant(running_var, acc), eps)
    if needs_grad:
        y, mean, var = BatchNormFunction.apply(
            input, weight, bias, residual, mean_in, invstd_in, use_batch_stats, eps, kernel, relu,
            None if use_batch_stats else running_var,
        )  # fmt: skip
    else:  # inference: the same computation without the autograd.Function's bookkeeping
        y, mean, _, var = run_forward(
            input, weight, bias, residual, mean_in, invstd_in, use_batch_stats, eps, kernel, relu
        )[:4]

    if update:
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)  # an int64 buffer: never part of a graph
        factor = momentum_factor(momentum, num_batches_tracked)
        count = input.numel() // input.shape[1] if input.shape[1] else 0
        update_stats = getattr(kernel, "update_running_stats", update_running_stats)
        update_stats(running_mean, running_var, mean, var, count, factor)
    return y


def _transformed(*tensors) -> bool:
    """Whether a torch.func transform runs or one of ``tensors`` carries a forward-mode
    tangent: calls the kernels cannot take (no storage to read, no jvp)."""
    return _functorch_active() is not None or (
        _fwad._current_level >= 0 and any(has_tangent(t) for t in tensors)  # (cheap test first)
    )


def _plain(t: Tensor) -> Tensor | None:
    """The plain tensor under a forward-AD dual and functorch wrappers (grad, jvp), or None
    under a vmap (one value per vmapped example)."""
    t = _fwad.unpack_dual(t).primal
    while functorch_wrapped(t):
        if torch._C._functorch.is_batchedtensor(t):
            return None
        t = torch._C._functorch.get_unwrapped(t)
    return t


def _next(num_batches_tracked: Tensor | None) -> Tensor | None:
    """num_batches_tracked + 1 (what ``momentum_factor`` reads), leaving the buffer alone."""
    return None if num_batches_tracked is None else _plain(num_batches_tracked) + 1


def _composite(input, running_mean, running_var, weight, bias, training, momentum, eps,
               num_batches_tracked, residual, activation) -> Tensor:  # fmt: skip
    """``batch_norm`` from differentiable torch ops only, for forward-mode AD and torch.func
    transforms: every tangent and batch dimension flows through them as torch's own ops see
    to. The same validation and formulas (biased variance to normalise, unbiased into
    ``running_var``), not the kernels' bytes; statistics in float32 at least."""
    _validate(
        input, running_mean, running_var, weight, bias, training, momentum, eps,
        num_batches_tracked, residual, activation,
    )  # fmt: skip
    acc = acc_dtype(input.dtype)
    if training:
        mean, var = differentiable_stats(input)
    else:
        mean, var = running_mean.to(acc), running_var.to(acc)
    invstd = invstd_from_var(var, eps)
    y = differentiable_forward(input, weight, bias, residual, False, eps, mean, invstd,
                               activation == "relu")  # fmt: skip
    if not training or running_mean is None:
        return y
    # the running buffers, updated in place as torch's batch_norm does under these transforms
    count = input.numel() // input.shape[1] if input.shape[1] else 0
    if functorch_wrapped(running_mean) or functorch_wrapped(running_var):
        # buffers vmapped along with x: updated per example, inside the transform
        m, v = _fwad.unpack_dual(mean).primal, _fwad.unpack_dual(var).primal
        scope = contextlib.nullcontext()
    else:
        m, v = _plain(mean), _plain(var)
        if m is None:
            raise RuntimeError(
                "batch_norm under vmap: the batch statistics differ per vmapped example but "
                "running_mean/running_var are single tensors updated in place; pass "
                "running_mean=running_var=None (or training=False), or vmap over the buffers too"
            )
        # plain tensors, with functorch's dispatch off (a grad transform refuses to mutate a
        # captured tensor; torch's own batch_norm updates them)
        scope = torch._C._DisableFuncTorch()
    with scope:  # the general path's arithmetic
        f = momentum_factor(momentum, _next(num_batches_tracked))
        update_running_stats(running_mean, running_var, m, v, count, f)
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
    return y


def _find_lane(x):
    """The numba backend for a CPU tensor if it imports (remembered in ``_lane``), else None.
    (Only for CPU tensors: a CUDA user never imports numba.)"""
    global _lane
    if isinstance(x, Tensor) and x.is_cpu and backends.numba_available():
        _lane = backends.load("numba")
    return _lane


def _eager(fn):
    """``fn`` excluded from torch.compile's tracing: a graph break, then fn runs eagerly.
    (torch._dynamo is imported here, when something is being compiled, not with this package:
    it costs 0.7 s to import.)"""
    import torch._dynamo

    return torch._dynamo.disable(fn, recursive=True)


def _direct(kernel, x, running_mean, running_var, weight, bias, use_batch_stats, update,
            momentum, eps, num_batches_tracked, relu, residual, grad) -> Tensor | None:  # fmt: skip
    """The backend's one-call path (``eval_direct`` / ``train_direct``), or None."""
    if not use_batch_stats:
        direct = getattr(kernel, "eval_direct", None)
        return None if direct is None else direct(x, running_mean, running_var, weight, bias,
                                                  eps, relu, residual, grad)  # fmt: skip
    direct = getattr(kernel, "train_direct", None)
    if direct is None:
        return None
    if not update:
        running_mean = running_var = num_batches_tracked = None
    return direct(x, weight, bias, eps, relu, running_mean, running_var, momentum,
                  num_batches_tracked, residual, grad)  # fmt: skip


def _constant(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t`` as a constant of ``dtype`` (no copy when it already is one)."""
    if t.dtype == dtype and not t.requires_grad:
        return t
    return t.detach().to(dtype)


def _validate(
    x, running_mean, running_var, weight, bias, training, momentum, eps,
    num_batches_tracked, residual, activation,
) -> None:  # fmt: skip
    """Raise TypeError/ValueError naming what was expected; never modifies anything."""
    if not isinstance(x, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"expected a floating-point input (float16, bfloat16, float32 or float64), "
            f"got {x.dtype}; convert it with input.float()"
        )
    if x.layout != torch.strided:
        raise TypeError(
            f"expected a dense (strided) input, got layout {x.layout}; convert it with "
            "input.to_dense()"
        )
    if x.dim() < 2:
        raise ValueError(
            f"expected input of shape (N, C, *spatial) with at least 2 dims (got {x.dim()}D input)"
        )
    C = x.shape[1]
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be tensors or both be None")
    if not training and running_mean is None:
        raise ValueError(
            "running_mean and running_var are required when training=False; "
            "pass the buffers or use training=True (batch statistics)"
        )
    device = x.device
    for name, t in (
        ("weight", weight),
        ("bias", bias),
        ("running_mean", running_mean),
        ("running_var", running_var),
    ):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
        if t.shape != (C,):
            raise ValueError(
                f"{name} should have shape ({C},) to match the input's {C} channels, "
                f"got {tuple(t.shape)}"
            )
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but the input is on {x.device}")
        if not (t.dtype == x.dtype or (x.dtype in HALF_DTYPES and t.dtype == torch.float32)):
            allowed = f"{x.dtype} or torch.float32" if x.dtype in HALF_DTYPES else str(x.dtype)
            raise TypeError(
                f"{name} has dtype {t.dtype} but the input is {x.dtype}: expected {allowed}; "
                f"convert the module with .to({x.dtype}) or the input with .to({t.dtype})"
            )
    if num_batches_tracked is not None:
        if not isinstance(num_batches_tracked, Tensor) or num_batches_tracked.numel() != 1:
            raise TypeError("num_batches_tracked must be a one-element int64 tensor or None")
    if momentum is None:
        if training and running_mean is not None:
            if num_batches_tracked is None:
                raise ValueError(
                    "momentum=None (a cumulative average) needs num_batches_tracked=; "
                    "pass it or give a float momentum"
                )
            if num_batches_tracked.item() == -1:  # the factor would be 1 / 0 after the bump
                raise ValueError(
                    "momentum=None divides by num_batches_tracked + 1, which is 0 here "
                    "(num_batches_tracked=-1)"
                )
    elif isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"momentum must be a float or None, got {type(momentum).__name__}")
    elif isinstance(momentum, int):
        try:
            float(momentum)
        except OverflowError:
            raise ValueError(f"momentum {momentum} is too large for a float") from None
    if not isinstance(eps, (int, float)) or isinstance(eps, bool):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    if training and eps <= 0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(f"residual must be a torch.Tensor, got {type(residual).__name__}")
        if residual.layout != torch.strided:
            raise TypeError(f"residual must be a dense (strided) tensor, got {residual.layout}")
        if residual.shape != x.shape:
            raise ValueError(
                f"residual should have the input's shape {tuple(x.shape)}, "
                f"got {tuple(residual.shape)}"
            )
        if residual.dtype != x.dtype or residual.device != x.device:
            raise TypeError(
                f"residual should be {x.dtype} on {x.device} like the input, "
                f"got {residual.dtype} on {residual.device}"
            )
    if training:
        verify_batch_size(x.shape)
