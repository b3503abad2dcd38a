"""The general ``torch.autograd.Function``: every batch norm of this package that a
backend's direct path does not take (for the numba backend, ``numba_cpu._DirectBatchNormFunction``
takes contiguous and channels-last float32/float64 tensors) runs through it.

Forward and backward call a backend (``batchnorm.backends``) on the canonical (A, C, B) view;
the module never knows which kernel ran. Double backward (``create_graph=True``) recomputes
the forward with differentiable plain torch ops and differentiates that: exact, and it keeps
the backends free of second-order code.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from ._conventions import acc_dtype, invstd_from_var
from ._layout import Layout, canonical, like_canonical


def run_forward(
    x: Tensor,  # (N, C, *spatial)
    weight: Tensor | None,  # (C,)
    bias: Tensor | None,  # (C,)
    residual: Tensor | None,  # (N, C, *spatial)
    mean_in: Tensor | None,  # (C,) eval only
    invstd_in: Tensor | None,  # (C,) eval only
    training: bool,
    eps: float,
    backend: ModuleType,
    relu: bool,
):
    """The forward computation, without autograd: ``(y, mean, invstd, var, x3, y3, layout)``.

    ``mean``/``invstd`` are what normalised x (the batch's, or ``mean_in``/``invstd_in`` in
    eval); ``var`` is the batch's biased variance, None in eval. Inference under
    ``torch.no_grad`` calls this directly and skips the Function's overhead.
    """
    x3, layout = canonical(x)  # (A, C, B)
    res3 = None if residual is None else like_canonical(residual, layout)
    acc = acc_dtype(x.dtype)
    if x.numel() == 0:
        C = x.shape[1]
        y3 = torch.empty_like(x3)
        mean = torch.zeros(C, dtype=acc, device=x.device)
        var = torch.zeros(C, dtype=acc, device=x.device)
        invstd = mean
    elif training:
        y3, mean, var, invstd = backend.forward_train(x3, weight, bias, eps, res3, relu)
    else:
        y3 = backend.normalize(x3, mean_in, invstd_in, weight, bias, res3, relu)
        mean, invstd = mean_in, invstd_in
        var = None
    return layout.from_canonical(y3), mean, invstd, var, x3, y3, layout


class BatchNormFunction(torch.autograd.Function):
    """``y = act(xhat * w + b [+ residual])`` with xhat from batch statistics (``training``)
    or from the given ``mean``/``invstd`` (eval: the running buffers).

    Returns ``(y, mean, var)``; mean and var (biased) are the batch statistics used, for the
    running-statistics update, and carry no gradient.
    """

    @staticmethod
    def forward(
        ctx,
        x: Tensor,  # (N, C, *spatial)
        weight: Tensor | None,  # (C,)
        bias: Tensor | None,  # (C,)
        residual: Tensor | None,  # (N, C, *spatial)
        mean_in: Tensor | None,  # (C,) eval only: running_mean in the accumulation dtype
        invstd_in: Tensor | None,  # (C,) eval only: 1 / sqrt(running_var + eps)
        training: bool,
        eps: float,
        backend: ModuleType,
        relu: bool,
        running_var: Tensor | None = None,  # eval only: saved, never read (see below)
    ) -> tuple[Tensor, Tensor, Tensor]:
        y, mean, invstd, var, x3, y3, layout = run_forward(
            x, weight, bias, residual, mean_in, invstd_in, training, eps, backend, relu
        )
        ctx.layout = layout
        ctx.training = training
        ctx.eps = eps
        ctx.backend = backend
        ctx.relu = relu
        y3_mask = y3 if relu else None
        # (in eval, running_var is saved, as torch does, so that changing it in place before
        # the backward raises: invstd was computed from it; mean_in is the running mean itself)
        ctx.save_for_backward(x, x3, weight, bias, residual, mean, invstd, y3_mask, running_var)
        if training:
            out_mean, out_var = mean, var
        else:  # nothing for the running-statistics update
            out_mean = out_var = torch.empty(0, dtype=mean.dtype, device=x.device)
        ctx.mark_non_differentiable(out_mean, out_var)
        # y is a view of y3 (the canonical layout); autograd forbids in-place changes to a view
        # created inside a Function (nn.ReLU(inplace=True) after a batch norm, as in ResNets).
        # detach() drops the view relation without a copy and keeps the version counter, so an
        # in-place change to y is still caught if y3 was saved (the fused relu's mask).
        return y.detach(), out_mean, out_var

    @staticmethod
    def backward(ctx, dy: Tensor, _dmean: Tensor | None, _dvar: Tensor | None):
        x, x3, weight, bias, residual, mean, invstd, y3_mask = ctx.saved_tensors[:8]
        need_dx, need_dw, need_db, need_dres = ctx.needs_input_grad[:4]
        nones = (None,) * 7  # mean_in, invstd_in, training, eps, backend, relu, running_var
        if dy is None:
            return (None, None, None, None, *nones)
        if torch.is_grad_enabled():  # create_graph=True: differentiable recomputation
            grads = double_backward(ctx, dy, x, weight, bias, residual, mean, invstd)
            return (*grads, *nones)

        layout: Layout = ctx.layout
        dx = dweight = dbias = dres = None
        if x.numel() == 0:
            dx = torch.zeros_like(x) if need_dx else None
            dweight = torch.zeros_like(weight) if need_dw else None
            dbias = torch.zeros_like(bias) if need_db else None
            dres = torch.zeros_like(residual) if need_dres else None
            return (dx, dweight, dbias, dres, *nones)

        dy3 = like_canonical(dy, layout)  # (A, C, B)
        if ctx.relu and need_dres:
            # the residual's gradient is dy through the relu: materialise it once, with
            # relu's own backward (one pass; torch.where(y > 0, dy, 0) took 5-10x as long
            # on (32, 64, 56, 56) float32 and made the fused block slower than unfused)
            dy3 = torch.ops.aten.threshold_backward(dy3, y3_mask, 0)
            y3_mask = None
        dx3, sum_dy, sum_dy_xhat = ctx.backend.backward(
            dy3, x3, mean, invstd, weight, ctx.training, need_dx, y3_mask
        )
        if need_dx:
            dx = layout.from_canonical(dx3)
        if need_dw:
            dweight = sum_dy_xhat.to(weight.dtype)
        if need_db:
            dbias = sum_dy.to(bias.dtype)
        if need_dres:
            dres = layout.from_canonical(dy3).to(residual.dtype)
        return (dx, dweight, dbias, dres, *nones)


def differentiable_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(mean, biased var)`` per channel in the accumulation dtype, differentiable; zeros
    for an empty batch (the statistics the kernels take then). The mean is ``torch.mean``'s
    (``var_mean``'s is NaN for a channel holding an infinity, where torch's is the
    infinity); the variance ``torch.var``'s, which keeps no full-size tensor for backward
    under autograd (a second pass over ``x - mean`` would, for double backward and
    ``torch.func.grad``), at the precision of Welford's update (README, statistics)."""
    xa = x.to(acc_dtype(x.dtype))
    if xa.numel() == 0:
        zeros = xa.new_zeros(x.shape[1])
        return zeros, zeros
    dims = (0, *range(2, x.dim()))
    return xa.mean(dim=dims), torch.var(xa, dim=dims, correction=0)


def differentiable_forward(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    residual: Tensor | None,
    training: bool,
    eps: float,
    mean: Tensor | None,
    invstd: Tensor | None,
    relu: bool,
) -> Tensor:
    """Batch norm in plain differentiable torch ops, in the accumulation dtype (returned in
    x's), with the batch's statistics (``training``) or the given ``mean`` and ``invstd``.

    For double backward, and for forward-mode AD and torch.func transforms (``functional``);
    the conventions are the same as every backend's.
    """
    acc = acc_dtype(x.dtype)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    xa = x.to(acc)
    if training:
        mean, var = differentiable_stats(x)
        invstd = invstd_from_var(var, eps)  # torch ops for a graph, a tangent or a wrapper
    y = (xa - mean.view(shape)) * invstd.view(shape)
    if weight is not None:
        y = y * weight.to(acc).view(shape)
    if bias is not None:
        y = y + bias.to(acc).view(shape)
    if residual is not None:
        y = y + residual.to(acc)
    if relu:
        y = torch.relu(y)
    return y.to(x.dtype)


def double_backward(ctx, dy, x, weight, bias, residual, mean, invstd):
    inputs = [x, weight, bias, residual]
    wanted = [t for t, need in zip(inputs, ctx.needs_input_grad[:4]) if need]
    with torch.enable_grad():
        y = differentiable_forward(
            x, weight, bias, residual, ctx.training, ctx.eps, mean, invstd, ctx.relu
        )
        grads = iter(torch.autograd.grad(y, wanted, dy, create_graph=True, allow_unused=True))
    return tuple(next(grads) if need else None for need in ctx.needs_input_grad[:4])
