"""The conventions of torch's batch norm, written once for tensors.

Every backend and every module of the package goes through these helpers, so the biased /
unbiased variance, the momentum rule and the eps placement live in exactly one place
(``batchnorm.reference`` mirrors them in NumPy float64).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.autograd.forward_ad as _fwad
from torch import Tensor
from torch._C._functorch import is_functorch_wrapped_tensor as functorch_wrapped
from torch.autograd.graph import increment_version

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)
_NUMPY_DTYPES = (torch.float32, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated and kept in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def invstd_from_var(var: Tensor, eps: float) -> Tensor:
    """``1 / sqrt(var + eps)``, as torch computes it in both modes.

    (torch's training kernel would return 0 where ``var + eps == 0``, but training requires
    ``eps > 0``, so that never happens; in eval a zero ``running_var`` with ``eps=0`` gives inf,
    as in torch.) On CPU it runs in NumPy: the same IEEE sqrt and division, without a torch
    dispatch per op. (Eval on the numba backend's direct path computes it inside its one
    kernel call instead, with the same float ops: ``_invstd_from_running``.)
    """
    if _numpy_ok(var):
        with np.errstate(divide="ignore"):  # inf, as torch, for running_var + eps == 0
            return torch.from_numpy(1.0 / np.sqrt(var.numpy() + eps))
    return 1.0 / torch.sqrt(var + eps)


def _numpy_ok(*tensors: Tensor) -> bool:
    """True when every tensor can be viewed as a NumPy array without a copy or a graph (a
    torch.func wrapper, e.g. vmapped running buffers, has no storage to view; a forward-mode
    tangent would be dropped)."""
    return all(
        t.device.type == "cpu" and t.dtype in _NUMPY_DTYPES and not t.requires_grad
        and not functorch_wrapped(t)
        and not has_tangent(t)
        for t in tensors
    )  # fmt: skip


def has_tangent(t: object) -> bool:
    """Whether t is a tensor carrying a forward-mode AD tangent (only inside a dual level)."""
    return (
        _fwad._current_level >= 0
        and isinstance(t, Tensor)
        and _fwad.unpack_dual(t).tangent is not None
    )


def momentum_factor(momentum: float | None, num_batches_tracked: Tensor | None) -> float:
    """The weight of the new batch in the running averages.

    ``momentum`` (torch's convention: 0.1 means 10% new), or ``1 / num_batches_tracked``
    when ``momentum`` is None (a cumulative average). ``num_batches_tracked`` has already been
    incremented for the current batch.
    """
    if momentum is not None:
        return float(momentum)
    if num_batches_tracked is None:
        raise ValueError(
            "momentum=None (a cumulative average) needs num_batches_tracked; "
            "pass num_batches_tracked= or a float momentum"
        )
    return 1.0 / float(num_batches_tracked)


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    count: int,
    factor: float,
) -> None:
    """In place: ``running = (1 - f) * running + f * batch``, with the *unbiased* variance
    ``var * count / (count - 1)`` going into ``running_var`` while the output was normalised
    with the biased ``var`` (the 9/8 of the seed notebook for 9 values per channel)."""
    if count == 0:  # an empty batch carries no statistics
        return
    unbias = count / (count - 1)
    if _numpy_ok(running_mean, running_var, mean, var):
        # CPU: the same arithmetic in NumPy, a few microseconds less per call; bump the
        # version counters as torch's in-place ops would, so autograd still sees the change
        rm, rv = running_mean.numpy(), running_var.numpy()
        rm *= 1 - factor
        rm += factor * mean.numpy()
        var_unbiased = var.numpy() * unbias
        rv *= 1 - factor
        rv += factor * var_unbiased
        increment_version(running_mean)
        increment_version(running_var)
        return
    with torch.no_grad():
        var_unbiased = var * unbias
        running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
        running_var.mul_(1 - factor).add_(var_unbiased.to(running_var.dtype), alpha=factor)


def verify_batch_size(shape: torch.Size) -> None:
    """torch's check, with torch's message: training needs more than one value per channel."""
    size_prods = shape[0]
    for s in shape[2:]:
        size_prods *= s
    if size_prods == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {shape}"
        )
