"""The fused CPU backend: numba kernels, one pass over memory where the math allows.

Example::

    >>> import torch
    >>> from batchnorm.backends import numba_cpu
    >>> x3 = torch.randn(4, 3, 10)  # canonical (A, C, B) view of a (4, 3, 10) input
    >>> y3, mean, var, invstd = numba_cpu.forward_train(x3, None, None, 1e-5)
    >>> torch.allclose(y3.mean(dim=(0, 2)), torch.zeros(3), atol=1e-6)
    True

Same protocol, signatures and return conventions as ``backends/torch_ops.py`` (see
``batchnorm.backends``). Memory traffic per element (float32): NCHW forward-train one read
and one write (the statistics and the normalisation of a block of channels run back to back
while it is in L2, or in L3 for some big tensors), backward two reads and one write;
channels-last forward-train two reads and one write, backward four reads and one write; eval
one read and one write. The kernels live in ``_numba_kernels``.

* dtypes: float32 and float64 run natively. float16 and bfloat16 (which numba cannot type) are
  converted to float32 with torch, run in float32, and the outputs converted back: float32
  accumulation and float32 statistics, at the cost of the conversion traffic.
* Threads: the parallel kernels run on ``min(torch.get_num_threads(), NUMBA_NUM_THREADS)``
  numba threads, so ``torch.set_num_threads`` sets both. numba's OpenMP layer binds to the
  same libgomp as torch (whichever copy was loaded first): one team of worker threads for
  both. Tensors under ``PARALLEL_MIN`` elements run serially.
* Two routes to the same kernels and bytes: the protocol's functions on canonical NumPy
  views (the general path: any strides, half types), and the direct paths (``eval_direct``,
  ``train_direct``, with ``_DirectBatchNormFunction`` when a graph is recorded): one kernel
  call each way on NCHW-contiguous or channels-last float32/float64 tensors, by address,
  without views or conversions, for the per-call cost of small layers.
* Results are bitwise identical whatever the thread count, the state of numba's disk cache
  and the CPU model: no fast-math, sums in a fixed order (see ``_numba_kernels``).
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from .. import _conventions as conventions
from .._conventions import HALF_DTYPES, acc_dtype, invstd_from_var, momentum_factor
from .._function import double_backward
from .._layout import CHANNELS_LAST_FORMAT
from . import _numba_kernels as K

name = "numba"

# Below this many elements a parallel launch costs more than it saves: run on one thread.
# Depends on the size only, never on the thread count, so results stay deterministic.
PARALLEL_MIN = 1 << 16

_NATIVE = (torch.float32, torch.float64)
_EMPTY = {torch.float32: np.empty(0, np.float32), torch.float64: np.empty(0, np.float64)}
_NP_SCALAR = {torch.float32: np.float32, torch.float64: np.float64}
_ZERO = {dt: f(0.0) for dt, f in _NP_SCALAR.items()}  # the one-call kernels' dtype witness


def supports(x: Tensor) -> bool:
    return x.is_cpu and (x.dtype in _NATIVE or x.dtype in HALF_DTYPES)


_pool_started = False
_numba_threads = numba.get_num_threads  # numba's ctypes getter itself once the pool runs


def _start_pool() -> None:
    """Start numba's thread pool, keeping torch's thread count.

    Numba's default threading layer here is OpenMP, and its pool's OpenMP symbols bind to
    the libgomp torch has loaded (or torch's to the system copy numba loaded first: one
    runtime either way, see the README's "Threads"). So starting numba's pool sets the
    runtime's thread count to NUMBA_NUM_THREADS, which is what torch.get_num_threads()
    reads: it is restored. (``NUMBA_THREADING_LAYER=workqueue`` trades speed on a quiet
    machine for steadiness on a crowded one: see the README.)
    """
    global _pool_started, _numba_threads
    before = torch.get_num_threads()
    numba.get_num_threads()  # launches the pool
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)
    # the calling thread's count, read without numba.get_num_threads()'s launch check: 4 us
    # instead of 15 right after a big tensor has streamed through the caches (private to
    # numba, so only if it is there)
    from numba.np.ufunc import parallel

    getter = getattr(parallel, "_get_num_threads", None)
    if callable(getter):
        _numba_threads = getter
    _pool_started = True


def _threads_for(numel: int) -> int:
    """The thread count of the parallel kernel, numba's pool sized to torch's thread count; 0
    (false) for the serial kernel. Kernels that take it size work items with it, never
    results."""
    if numel < PARALLEL_MIN:
        return 0
    if not _pool_started:
        _start_pool()
    want = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if _numba_threads() != want:  # (numba's count is per calling thread)
        numba.set_num_threads(want)
    return want


def _arr(t: Tensor | None, acc: torch.dtype) -> np.ndarray:
    """A zero-copy flat NumPy view of ``t`` in ``acc`` (half types are converted: numba has no
    float16/bfloat16), or an empty array standing for "absent". Cheap checks first: this
    runs several times per call, and tiny tensors are all overhead (``numpy(force=True)``
    detaches in C++, cheaper than ``detach().numpy()``)."""
    if t is None:
        return _EMPTY[acc]
    if t.dtype != acc:
        t = t.to(acc)
    if not t.is_contiguous():
        t = t.contiguous()
    if t.dim() == 1:
        return t.numpy(force=True)
    return t.numpy(force=True).reshape(-1)


def _forward(x3, weight, bias, eps, residual3, relu, mean, invstd, stats):
    """Shared driver of normalize / forward_train. Returns (y3, mean, var, invstd); mean,
    var and invstd only with ``stats`` (None otherwise: normalize returns y3 alone)."""
    dtype = x3.dtype
    A, C, B = x3.shape
    acc = acc_dtype(dtype)
    x = _arr(x3, acc)  # (A * C * B,)
    y3 = torch.empty((A, C, B), dtype=acc)
    if stats:
        mean = torch.empty(C, dtype=acc)
        var = torch.empty(C, dtype=acc)
        invstd = torch.empty(C, dtype=acc)
        mean_np, var_np, invstd_np = mean.numpy(), var.numpy(), invstd.numpy()
    else:
        mean_np, var_np, invstd_np = _arr(mean, acc), _EMPTY[acc], _arr(invstd, acc)
        mean = var = invstd = None
    if x.size > 0:
        y = y3.numpy().reshape(-1)
        res = _arr(residual3, acc)
        w = _arr(weight, acc)
        b = _arr(bias, acc)
        relu = bool(relu)
        par = _threads_for(x.size)
        if stats:
            eps_t = _NP_SCALAR[acc](eps)
            if B > 1:
                kernel = K.nchw_fwd_par if par else K.nchw_fwd_ser
                kernel(x, y, res, A, C, B, mean_np, var_np, invstd_np, w, b, eps_t, True,
                       True, relu, par)  # fmt: skip
            else:
                kernel = K.cl_fwd_par if par else K.cl_fwd_ser
                kernel(x, y, res, A, C, mean_np, var_np, invstd_np, w, b, eps_t, True, True,
                       relu, par)  # fmt: skip
        elif B > 1:  # NCHW runs: stream in memory order
            kernel = K.nchw_eval_par if par else K.nchw_eval_ser
            kernel(x, y, res, C, B, mean_np, invstd_np, w, b, relu)
        else:
            kernel = K.cl_fwd_par if par else K.cl_fwd_ser
            kernel(x, y, res, A, C, mean_np, var_np, invstd_np, w, b, _NP_SCALAR[acc](0.0),
                   False, True, relu, par)  # fmt: skip
    elif stats:  # an empty batch: no values, statistics as of var = 0
        mean.zero_()
        var.zero_()
        invstd.copy_(invstd_from_var(var, eps))
    if acc != dtype:
        y3 = y3.to(dtype)
    return y3, mean, var, invstd


def update_running_stats(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    count: int,
    factor: float,
) -> None:
    """``_conventions.update_running_stats`` in one numba call (``K.update_running``: the same
    bytes as its NumPy path, a few microseconds less per training call) when all four are CPU
    tensors (this backend's precondition) of one native dtype outside any graph; otherwise the
    conventions' own code. (Plain checks, no generator: this runs on every training call.)"""
    dtype = running_mean.dtype
    if (
        count < 2
        or dtype not in _NATIVE
        or not running_var.dtype == mean.dtype == var.dtype == dtype
        or running_mean.requires_grad
        or running_var.requires_grad
        or mean.requires_grad
        or var.requires_grad
    ):
        return conventions.update_running_stats(running_mean, running_var, mean, var, count, factor)
    K.update_running(
        running_mean.numpy(), running_var.numpy(), mean.numpy(), var.numpy(), float(factor),
        count / (count - 1),
    )  # fmt: skip
    increment_version(running_mean)
    increment_version(running_var)


def batch_stats(x3: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel ``(mean, var)`` of x3 (A, C, B); var biased; one read of x."""
    _, mean, var, _ = _stats_only(x3)
    return mean, var


def _stats_only(x3: Tensor):
    A, C, B = x3.shape
    acc = acc_dtype(x3.dtype)
    x = _arr(x3, acc)
    mean = torch.zeros(C, dtype=acc)
    var = torch.zeros(C, dtype=acc)
    invstd = torch.zeros(C, dtype=acc)
    if x.size > 0:
        empty = _EMPTY[acc]
        args = (x, empty, empty, A, C)
        tail = (mean.numpy(), var.numpy(), invstd.numpy(), empty, empty, _NP_SCALAR[acc](0.0))
        par = _threads_for(x.size)
        if B > 1:
            (K.nchw_fwd_par if par else K.nchw_fwd_ser)(*args, B, *tail, True, False, False,
                                                        par)  # fmt: skip
        else:
            (K.cl_fwd_par if par else K.cl_fwd_ser)(*args, *tail, True, False, False, par)
    return None, mean, var, invstd


def _address(t: Tensor | None) -> int:
    """``t``'s data address for the one-call kernels (0: absent)."""
    return 0 if t is None else t.data_ptr()


_PLAIN = (Tensor, torch.nn.Parameter)
_STRIDED = torch.strided
_grad_enabled = torch.is_grad_enabled
_TENSOR_DISPATCH = Tensor.__torch_dispatch__


def _has_storage(t: Tensor) -> bool:
    """Whether t's values sit at ``t.data_ptr()``: plain tensors and Parameters, and
    subclasses that do not override ``__torch_dispatch__`` (wrapper subclasses such as
    ``TwoTensor`` have no storage of their own: address 0)."""
    if type(t) in _PLAIN:
        return True
    return getattr(type(t), "__torch_dispatch__", None) is _TENSOR_DISPATCH and t.data_ptr() != 0


def _addressable(*tensors) -> bool:
    """Whether every tensor given (None: absent) has storage of its own."""
    for t in tensors:
        if t is not None and not _has_storage(t):
            return False
    return True


def _plan(x: Tensor, read, written=(), residual: Tensor | None = None) -> tuple | None:
    """For the one-call paths: ``(A, C, B, fmt)``, x's memory format and its A * C * B values
    in memory order (NCHW runs, or rows of C), or None when x is empty or not a
    float32/float64 tensor, NCHW-contiguous or channels-last, or a tensor in ``read`` or
    ``written`` is not contiguous of x's dtype, the residual not in x's format and dtype, one
    of them is a negative view (its bytes are not its values), or one in ``written`` (updated
    in place) requires grad, or one has no storage of its own (``_has_storage``). The kernels
    then read and write them by address (see ``_numba_kernels._at``). Parameters that require
    grad are fine in ``read``: the kernels record no graph, the autograd Function
    (``_DirectBatchNormFunction``) does."""
    n = x.numel()
    if n == 0 or x.dtype not in _NATIVE or x.is_neg() or not _has_storage(x):
        return None
    for t in (*read, *written):
        if t is not None and (
            t.dtype != x.dtype or not t.is_contiguous() or t.is_neg() or not _has_storage(t)
        ):
            return None
    for t in written:
        if t is not None and t.requires_grad:
            return None
    plan = _memory_plan(x, x.shape, n)
    if plan is None:
        return None
    if residual is not None and (
        residual.dtype != x.dtype or not residual.is_contiguous(memory_format=plan[3])
        or residual.is_neg() or not _has_storage(residual)
    ):  # fmt: skip
        return None
    return plan


def _memory_plan(x: Tensor, shape, n: int) -> tuple | None:
    """``(A, C, B, fmt)`` of a non-empty x of ``shape`` and n values: NCHW runs (or (N, C)
    rows) if contiguous, rows of C if channels-last, else None. (Checked in this order: a
    tensor both contiguous and channels-last, C = 1, is taken as NCHW, as the general path
    takes it.)"""
    N, C = shape[0], shape[1]
    if x.is_contiguous():
        return N, C, n // (N * C), torch.contiguous_format
    fmt = CHANNELS_LAST_FORMAT.get(len(shape))
    if fmt is None or not x.is_contiguous(memory_format=fmt):
        return None
    return n // C, C, 1, fmt


def _unbias(count: int) -> float:
    """``n / (n - 1)``, the factor from the biased to the unbiased variance (training
    validates n > 1; 0.0 stands in otherwise, where it is never used)."""
    return count / (count - 1) if count > 1 else 0.0


def _new(x: Tensor, fmt) -> Tensor:
    """A new plain tensor like x in memory format ``fmt``. (empty_like costs half of
    torch.empty on tiny tensors; a subclass of Tensor gets torch.empty: a plain tensor, as
    the general path returns.)"""
    if type(x) is Tensor:
        return torch.empty_like(x, memory_format=fmt)
    return torch.empty(x.shape, dtype=x.dtype, memory_format=fmt)


def _forward_call(x, weight, bias, residual, running_mean, running_var, plan, training, eps,
                  relu, factor, st) -> Tensor:  # fmt: skip
    """y from one kernel call: training (batch statistics; the running buffers, if given,
    updated with ``factor``) or eval (from the running buffers); the statistics used go to
    ``st`` (3 * C: mean, var, invstd) if it is given."""
    A, C, B, fmt = plan
    y = _new(x, fmt)
    par = _threads_for(A * C * B)
    head = (x.data_ptr(), y.data_ptr(), _address(residual))
    tail = (A, C, B, float(eps), bool(relu))
    pst, z = _address(st), _ZERO[x.dtype]
    if training:
        kernel = (K.train_runs_par if par else K.train_runs_ser) if B > 1 else (
            K.train_rows_par if par else K.train_rows_ser)  # fmt: skip
        kernel(*head, _address(weight), _address(bias), _address(running_mean),
               _address(running_var), *tail, float(factor), _unbias(A * B), par, pst,
               z)  # fmt: skip
    else:
        if B > 1:
            kernel = K.eval_runs_par if par else K.eval_runs_ser
        else:
            kernel = K.eval_rows_par if par else K.eval_rows_ser
        kernel(*head, running_mean.data_ptr(), running_var.data_ptr(), _address(weight),
               _address(bias), *tail, par, pst, z)  # fmt: skip
    return y


def _stored(t: Tensor | None, shape, dtype: torch.dtype, fmt) -> Tensor | None:
    """``t`` as the kernels read it by address: of ``shape`` and ``dtype``, contiguous in
    ``fmt``, not a negative view; copied if it is not (saved-tensor
    hooks may hand back another layout or dtype than the one saved). Another shape raises:
    the kernels would read or write past its end."""
    if t is None:
        return t
    if t.shape != shape:
        raise RuntimeError(
            f"batch_norm backward: a saved tensor came back with shape {tuple(t.shape)}, "
            f"expected {tuple(shape)} (a saved_tensors_hooks unpack that changes shapes?)"
        )
    if t.dtype == dtype and t.is_contiguous(memory_format=fmt) and not t.is_neg():
        return t
    return t.resolve_neg().to(dtype).contiguous(memory_format=fmt)


class _DirectBatchNormFunction(torch.autograd.Function):
    """The autograd Function of the direct paths: one kernel call forward (``_forward_call``)
    and one backward (``K.bwd_*``), on the user's tensors as they are stored, without the
    canonical views and NumPy conversions of the general path (``_function``), whose
    arithmetic and bytes it gives. Double backward is the general path's.

    ``st`` (3 * C, x's dtype) receives the statistics used: mean, var, invstd in training,
    mean and invstd in eval (var's third is not written). Training leaves the running buffers
    alone (the caller updates them from ``st`` once the Function
    has returned, so a call that fails moves nothing); eval reads them, and saves them, so
    that an in-place change before the backward raises, as torch's does."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var, st, plan, training,
                eps, relu):  # fmt: skip
        y = _forward_call(x, weight, bias, residual, running_mean, running_var, plan, training,
                          eps, relu, 0.0, st)  # fmt: skip
        ctx.plan, ctx.training, ctx.eps, ctx.relu = plan, training, eps, relu
        ctx.shape, ctx.dtype = x.shape, x.dtype
        saved = (x, weight, bias, residual, y if relu else None, st)
        ctx.save_for_backward(*saved, running_mean, running_var)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, residual, y, st = ctx.saved_tensors[:6]
        A, C, B, fmt = ctx.plan
        need_dx, need_dw, need_db, need_dres = ctx.needs_input_grad[:4]
        nones = (None,) * 7  # running_mean ... relu
        create_graph = torch.is_grad_enabled()
        if create_graph or not _addressable(dy, x, y, st, weight):
            # double backward, or a tensor with no address to read (a wrapper subclass from a
            # saved-tensor hook or the loss): the general path's recomputation, any tensor type
            mean, invstd = st[:C], st[2 * C :]
            grads = double_backward(ctx, dy, x, weight, bias, residual, mean, invstd)
            if not create_graph:
                grads = [None if g is None else g.detach() for g in grads]
            return (*grads, *nones)
        dtype, flat, shape = ctx.dtype, torch.contiguous_format, ctx.shape
        x, y, dy = _stored(x, shape, dtype, fmt), _stored(y, shape, dtype, fmt), _stored(
            dy, shape, dtype, fmt)  # fmt: skip
        st, weight = _stored(st, (3 * C,), dtype, flat), _stored(weight, (C,), dtype, flat)
        mask, dres = y, None
        if need_dres:  # the residual's gradient: dy through the relu, materialised once
            dres = dy if y is None else torch.ops.aten.threshold_backward(dy, y, 0)
            dres = _stored(dres, shape, dtype, fmt)
            dy, mask = dres, None
        dx = _new(x, fmt) if need_dx else None
        sum_dy, sum_dy_xhat = torch.empty(C, dtype=dtype), torch.empty(C, dtype=dtype)
        par = _threads_for(A * C * B)
        if B > 1:
            kernel = K.bwd_runs_par if par else K.bwd_runs_ser
        else:
            kernel = K.bwd_rows_par if par else K.bwd_rows_ser
        kernel(dy.data_ptr(), x.data_ptr(), _address(mask), _address(dx), st.data_ptr(),
               _address(weight), sum_dy.data_ptr(), sum_dy_xhat.data_ptr(), A, C, B,
               float(A * B), need_dx, ctx.training, par, _ZERO[dtype])  # fmt: skip
        return (dx, sum_dy_xhat if need_dw else None, sum_dy if need_db else None, dres, *nones)


def eval_direct(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    relu: bool,
    residual: Tensor | None = None,
    grad: bool = False,
) -> Tensor | None:
    """Eval from the running buffers in one kernel call (``grad``: through
    ``_DirectBatchNormFunction``, one kernel call backward too), or None.

    No canonical view, no separate ``invstd`` (``K.eval_*`` compute it as ``invstd_from_var``
    does), the same kernels and bytes as ``normalize``. Every Python layer costs, and more so
    right after a big tensor has streamed through the caches (a layer that takes 2 us warm was
    seen to take 15-50 us then), so this path keeps few: the kernels take addresses, not NumPy
    views. Applies to float32/float64 tensors, NCHW-contiguous or channels-last, with
    contiguous buffers of x's dtype (see ``_plan``; the caller has validated shapes and
    dtypes); returns None otherwise, and the general path runs.
    """
    plan = _plan(x, (running_mean, running_var, weight, bias), (), residual)
    if plan is None:
        return None
    if grad:
        st = torch.empty(3 * plan[1], dtype=x.dtype)
        return _DirectBatchNormFunction.apply(x, weight, bias, residual, running_mean,
                                              running_var, st, plan, False, eps, relu)  # fmt: skip
    return _forward_call(x, weight, bias, residual, running_mean, running_var, plan, False, eps,
                         relu, 0.0, None)  # fmt: skip


def train_direct(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    relu: bool,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float | None,
    num_batches_tracked: Tensor | None,
    residual: Tensor | None = None,
    grad: bool = False,
) -> Tensor | None:
    """Training forward in one kernel call (``grad``: through ``_DirectBatchNormFunction``,
    then a second small one for the running buffers), or None: batch statistics,
    normalisation and, with running buffers, their update. The
    same kernels and bytes as ``forward_train`` then ``update_running_stats``, minus their
    Python layers (see ``eval_direct``). Side effects in the general path's order: a call
    that raises moves nothing. Without a graph, ``num_batches_tracked`` is bumped and the
    momentum factor taken (``momentum_factor``) before the one kernel call that also updates
    the buffers, so a bump that fails leaves them untouched; with a graph, the buffers move
    after the Function has returned (``K.update_running_at``), as in the general path. None
    (nothing touched) when the general path must run."""
    plan = _plan(x, (weight, bias), (running_mean, running_var), residual)
    if plan is None:
        return None
    A, C, B, _ = plan
    update = running_mean is not None
    if grad:
        st = torch.empty(3 * C, dtype=x.dtype)  # mean, var, invstd
        y = _DirectBatchNormFunction.apply(x, weight, bias, residual, None, None, st, plan, True,
                                           eps, relu)  # fmt: skip
    factor = 0.0
    if update:
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        factor = momentum_factor(momentum, num_batches_tracked)
    if grad:
        if update:
            K.update_running_at(running_mean.data_ptr(), running_var.data_ptr(), st.data_ptr(),
                                C, float(factor), _unbias(A * B), _ZERO[x.dtype])  # fmt: skip
    else:
        y = _forward_call(x, weight, bias, residual, running_mean, running_var, plan, True, eps,
                          relu, factor, None)  # fmt: skip
    if update:
        increment_version(running_mean)
        increment_version(running_var)
    return y


def lane(x, running_mean, running_var, weight, bias, training, momentum, eps,
         num_batches_tracked, activation) -> Tensor | None:  # fmt: skip
    """``batch_norm``'s express lane: the whole call without a graph (eval, or training with
    or without running buffers) in one kernel call, or None, having touched nothing.

    Takes only calls that ``functional._validate`` accepts and the direct paths take:
    plain dense (strided) tensors (or Parameters) on the CPU, float32/float64, x NCHW-contiguous or
    channels-last and not empty, the others contiguous, of shape (C,) and x's dtype, none a
    negative view; no residual (the caller checks), no graph to record, running buffers that
    do not require grad, a float eps (> 0 in training, >= 0 in eval), a float, int or None
    momentum (None with ``num_batches_tracked`` when buffers are updated), more than one
    value per channel in training. Everything else returns None and goes through
    ``batch_norm``'s validation and paths, which raise or compute as before; the bytes and
    side effects are ``eval_direct`` / ``train_direct``'s (the same ``_forward_call``).

    Why a lane: every Python layer and attribute read costs, more so right after a big
    tensor has streamed through the caches. (8, 32, 3, 3), per call: eval 7.4 -> 5.6 us,
    forward-train 9.3 -> 6.9 us warm (``batchnorm bench``); eval 63-66 -> 55-58 us right
    after a 64 MiB copy (torch's call 45-50).
    """
    if type(x) not in _PLAIN or type(eps) is not float or (
        activation is not None and activation != "relu"):  # fmt: skip
        return None
    dtype = x.dtype
    z = _ZERO.get(dtype)  # (None: not float32 or float64)
    if z is None or x.layout is not _STRIDED or not x.is_cpu or x.is_neg():
        return None
    shape = x.shape
    if len(shape) < 2:
        return None
    C = shape[1]
    n = x.numel()
    grad = _grad_enabled()
    if n == 0 or (grad and x.requires_grad):
        return None
    for t in (weight, bias):
        if t is not None and (
            type(t) not in _PLAIN or t.layout is not _STRIDED or t.dtype != dtype
            or t.shape != (C,) or not t.is_cpu or not t.is_contiguous() or t.is_neg()
            or (grad and t.requires_grad)
        ):  # fmt: skip
            return None
    if running_mean is None or running_var is None:
        if running_mean is not running_var or not training:
            return None  # (one buffer without the other, or eval without buffers: raises)
        update = False
    else:
        for t in (running_mean, running_var):
            if (type(t) not in _PLAIN or t.layout is not _STRIDED or t.dtype != dtype
                    or t.shape != (C,) or not t.is_cpu or not t.is_contiguous() or t.is_neg()
                    or t.requires_grad):  # fmt: skip
                return None
        update = training
    nbt = num_batches_tracked
    if nbt is not None and (type(nbt) not in _PLAIN or nbt.numel() != 1):
        return None
    if momentum is None:
        if update and (nbt is None or nbt.item() == -1):
            return None  # (validation raises: no counter, or a factor of 1 / 0)
    elif type(momentum) is not float and (type(momentum) is not int or abs(momentum) > 1 << 53):
        return None
    if training:
        if not eps > 0.0 or n == C:  # (n == C: one value per channel)
            return None
    elif not eps >= 0.0:
        return None
    plan = _memory_plan(x, shape, n)
    if plan is None:
        return None
    relu = activation is not None
    if not update:
        return _forward_call(x, weight, bias, None, running_mean, running_var, plan, training,
                             eps, relu, 0.0, None)  # fmt: skip
    if nbt is not None:
        nbt.add_(1)
    factor = momentum_factor(momentum, nbt)
    y = _forward_call(x, weight, bias, None, running_mean, running_var, plan, True, eps, relu,
                      factor, None)  # fmt: skip
    increment_version(running_mean)
    increment_version(running_var)
    return y


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
    y, _, _, _ = _forward(x3, weight, bias, 0.0, residual3, relu, mean, invstd, False)
    return y


def forward_train(
    x3: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    residual3: Tensor | None = None,
    relu: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y3, mean, var, invstd)``: batch statistics and normalisation, fused per channel."""
    return _forward(x3, weight, bias, eps, residual3, relu, None, None, True)


def _backward(dy3, x3, mean, invstd, weight, sum_dy, sum_dy_xhat, count, training, y3_mask,
              sums, do_dx):  # fmt: skip
    """Shared driver of grad_sums / grad_input / backward: (dx3 or None, sum_dy, sum_dy_xhat);
    the sums are new tensors with ``sums``, else the given ones (as NumPy views)."""
    dtype = x3.dtype
    A, C, B = x3.shape
    acc = acc_dtype(dtype)
    x = _arr(x3, acc)
    if sums:
        sum_dy = torch.zeros(C, dtype=acc)
        sum_dy_xhat = torch.zeros(C, dtype=acc)
        sum_dy_np, sum_dy_xhat_np = sum_dy.numpy(), sum_dy_xhat.numpy()
    else:
        sum_dy_np, sum_dy_xhat_np = _arr(sum_dy, acc), _arr(sum_dy_xhat, acc)
    dx3 = torch.empty((A, C, B), dtype=acc) if do_dx else None
    if x.size > 0:
        dy = _arr(dy3, acc)
        mask = _arr(y3_mask, acc)
        dx = dx3.numpy().reshape(-1) if do_dx else _EMPTY[acc]
        mean_np, invstd_np, w = _arr(mean, acc), _arr(invstd, acc), _arr(weight, acc)
        par = _threads_for(x.size)
        if B > 1:
            kernel = K.nchw_bwd_par if par else K.nchw_bwd_ser
            kernel(dy, x, mask, dx, A, C, B, mean_np, invstd_np, w, sum_dy_np, sum_dy_xhat_np,
                   float(count), sums, do_dx, bool(training), par)  # fmt: skip
        else:
            kernel = K.cl_bwd_par if par else K.cl_bwd_ser
            kernel(dy, x, mask, dx, A, C, mean_np, invstd_np, w, sum_dy_np, sum_dy_xhat_np,
                   float(count), sums, do_dx, bool(training), par)  # fmt: skip
    if dx3 is not None and acc != dtype:
        dx3 = dx3.to(dtype)
    return dx3, sum_dy, sum_dy_xhat


def grad_sums(
    dy3: Tensor,
    x3: Tensor,
    mean: Tensor,
    invstd: Tensor,
    y3_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(sum_dy, sum_dy_xhat)`` per channel; with ``y3_mask``, dy counts only where
    ``y3_mask <= 0`` fails (NaN counts, as in torch's relu backward)."""
    _, sum_dy, sum_dy_xhat = _backward(
        dy3, x3, mean, invstd, None, None, None, 1, True, y3_mask, True, False
    )
    return sum_dy, sum_dy_xhat


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
    """dx (A, C, B) in x's dtype, from the given sums; ``count`` is n over the whole batch."""
    dx, _, _ = _backward(
        dy3, x3, mean, invstd, weight, sum_dy, sum_dy_xhat, count, training, y3_mask,
        False, True,
    )  # fmt: skip
    return dx


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
    """``(dx3 or None, sum_dy, sum_dy_xhat)``: sums and dx fused per channel (2 reads, 1 write)."""
    count = x3.shape[0] * x3.shape[2]
    return _backward(
        dy3, x3, mean, invstd, weight, None, None, count, training, y3_mask, True, need_dx
    )
