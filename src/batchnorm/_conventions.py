"""The conventions of torch's batch norm, written once for tensors.

Every backend and every module of the package goes through these helpers, so the biased /
unbiased variance, the momentum rule and the eps placement live in exactly one place
(``batchnorm.reference`` mirrors them in NumPy float64).
"""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated and kept in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def invstd_from_var(var: Tensor, eps: float) -> Tensor:
    """``1 / sqrt(var + eps)``; 0 where ``var + eps == 0``, as torch does."""
    denom = torch.sqrt(var + eps)
    return torch.where(denom == 0, torch.zeros_like(denom), 1.0 / denom)


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


@torch.no_grad()
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
    var_unbiased = var * (count / (count - 1))
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
