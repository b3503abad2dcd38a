"""The numba backend's kernels against the float64 NumPy reference, kernel by kernel.

Every function of the backend protocol runs on the canonical (A, C, B) view of inputs in both
layouts (NCHW: B > 1; channels-last and (N, C): B == 1), over odd shapes (C=1, primes, N=1
with spatial > 1, N=0, a channel bigger than L2, tensors big enough for the parallel path),
in float32/float64 and the half types. Correctness only; speed lives in benchmarks/.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import batchnorm.functional as BF
from batchnorm import reference
from batchnorm._layout import canonical, like_canonical
from batchnorm.backends import numba_cpu as nb
from batchnorm.backends import select
from conftest import assert_close, make_input, module_pair, param_dtype, to_numpy

EPS = 1e-5

# (shape, channels_last). Sizes above numba_cpu.PARALLEL_MIN take the parallel kernels.
SHAPES = [
    ((7, 5), False),  # (N, C): channels interleaved
    ((4, 3, 10), False),  # BatchNorm1d (N, C, L)
    ((1, 3, 5, 7), False),  # N = 1, spatial > 1
    ((1, 3, 5, 7), True),
    ((3, 1, 4, 4), False),  # C = 1
    ((3, 1, 4, 4), True),
    ((2, 13, 3, 5, 2), False),  # 3d, primes
    ((2, 13, 3, 5, 2), True),
    ((3, 7, 61, 67), False),  # parallel path, B not a multiple of the vector width
    ((9, 37, 17, 19), True),  # parallel path, C prime
    ((2, 1031, 5, 7), True),  # C > 512: row blocks of CL_MIN_ROWS, a short last one
    ((67, 5, 3, 3), False),  # short runs, N prime > FLUSH_ROWS: four samples per step + 3
    ((131, 11, 7, 7), False),  # the same, parallel path
    ((4097, 3), False),  # (N, C) over several row blocks
]
BIG = [
    ((2, 2, 1024, 1100), False),  # one channel of 9 MB: bigger than L2, several chunks
    ((2, 1, 4096, 1100), False),  # one channel of 36 MB: bigger than L3 (32 MiB) too
    ((74, 64, 30, 30), False),  # x over 16 MiB, runs of 900: the next sample's runs prefetched
    ((4, 3, 512, 400), True),  # 2.4 M rows of 3 interleaved channels
]
EMPTY = [((0, 4, 3, 3), False), ((0, 4, 3, 3), True), ((0, 6), False)]
NATIVE = (torch.float32, torch.float64)
HALF = (torch.bfloat16, torch.float16)


def _params(C, dtype, seed=3):
    g = torch.Generator().manual_seed(seed)
    pd = param_dtype(dtype)
    weight = torch.rand(C, generator=g, dtype=pd) + 0.5
    bias = torch.randn(C, generator=g, dtype=pd)
    return weight, bias


def _np(t):
    return None if t is None else to_numpy(t)


def _count(shape):
    return int(np.prod(shape)) // shape[1] if shape[1] else 0


def _inputs(shape, channels_last, dtype, seed=0):
    x = make_input(shape, dtype=dtype, channels_last=channels_last, seed=seed)
    dy = make_input(shape, dtype=dtype, channels_last=channels_last, seed=seed + 1, offset=0.0)
    return x, dy


def _case_id(case):
    shape, cl = case
    return f"{'x'.join(map(str, shape))}{'-cl' if cl else ''}"


def test_auto_selects_numba_for_cpu():
    assert select("auto", torch.ones(2, 3)) is nb
    assert select("numba", torch.ones(2, 3, dtype=torch.bfloat16)) is nb


# half types convert to float32 around the same kernels: the small shapes cover that path
GRID = [(case, dtype) for case in SHAPES for dtype in NATIVE] + [
    (case, dtype) for case in SHAPES for dtype in HALF if np.prod(case[0]) < 50_000
]


def _grid_id(param):
    return _case_id(param[0]) + "-" + str(param[1]).removeprefix("torch.")


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("case_dtype", GRID, ids=_grid_id)
def test_forward_train_and_backward(case_dtype, affine):
    (shape, cl), dtype = case_dtype
    x, dy = _inputs(shape, cl, dtype)
    weight, bias = _params(shape[1], dtype) if affine else (None, None)
    x3, layout = canonical(x)
    # the layout under test is the one intended (C = 1 channels-last is also NCHW-contiguous)
    assert x3.shape[2] == 1 or not cl or shape[1] == 1

    y3, mean, var, invstd = nb.forward_train(x3, weight, bias, EPS)
    y_ref, cache = reference.forward(to_numpy(x), _np(weight), _np(bias), EPS)
    mean_ref, var_ref, n = reference.batch_statistics(to_numpy(x))
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert mean.dtype == var.dtype == invstd.dtype == acc
    assert y3.dtype == dtype and y3.is_contiguous() and y3.shape == x3.shape
    y = layout.from_canonical(y3)
    assert_close(y, torch.from_numpy(y_ref), dtype, "y", count=4)
    assert_close(mean, torch.from_numpy(mean_ref), acc, "mean", count=n)
    assert_close(var, torch.from_numpy(var_ref), acc, "var", count=n)
    assert_close(invstd, torch.from_numpy(cache.invstd), acc, "invstd", count=n)

    dy3 = like_canonical(dy, layout)
    dx3, sum_dy, sum_dy_xhat = nb.backward(dy3, x3, mean, invstd, weight, True, True)
    dx_ref, dw_ref, db_ref = reference.backward(to_numpy(dy), cache)
    assert dx3.dtype == dtype and dx3.shape == x3.shape
    assert_close(layout.from_canonical(dx3), torch.from_numpy(dx_ref), dtype, "dx", count=n)
    assert_close(sum_dy_xhat, torch.from_numpy(dw_ref), acc, "sum_dy_xhat", count=n)
    assert_close(sum_dy, torch.from_numpy(db_ref), acc, "sum_dy", count=n)

    no_dx, sum_dy2, sum_dy_xhat2 = nb.backward(dy3, x3, mean, invstd, weight, True, False)
    assert no_dx is None
    assert torch.equal(sum_dy2, sum_dy) and torch.equal(sum_dy_xhat2, sum_dy_xhat)


@pytest.mark.parametrize("dtype", NATIVE + HALF)
@pytest.mark.parametrize("case", SHAPES, ids=_case_id)
def test_eval_normalize_and_backward(case, dtype):
    shape, cl = case
    x, dy = _inputs(shape, cl, dtype)
    C = shape[1]
    weight, bias = _params(C, dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = torch.Generator().manual_seed(7)
    running_mean = torch.randn(C, generator=g, dtype=acc)
    running_var = torch.rand(C, generator=g, dtype=acc) + 0.5
    invstd = 1 / torch.sqrt(running_var + EPS)
    x3, layout = canonical(x)

    y3 = nb.normalize(x3, running_mean, invstd, weight, bias)
    y_ref, cache = reference.forward_eval(
        to_numpy(x), _np(running_mean), _np(running_var), _np(weight), _np(bias), EPS
    )
    assert_close(layout.from_canonical(y3), torch.from_numpy(y_ref), dtype, "y")

    dy3 = like_canonical(dy, layout)
    dx3, sum_dy, sum_dy_xhat = nb.backward(dy3, x3, running_mean, invstd, weight, False, True)
    dx_ref, dw_ref, db_ref = reference.backward_eval(to_numpy(dy), cache)
    n = _count(shape)
    assert_close(layout.from_canonical(dx3), torch.from_numpy(dx_ref), dtype, "dx")
    assert_close(sum_dy_xhat, torch.from_numpy(dw_ref), acc, "sum_dy_xhat", count=n)
    assert_close(sum_dy, torch.from_numpy(db_ref), acc, "sum_dy", count=n)


@pytest.mark.parametrize("dtype", NATIVE)
@pytest.mark.parametrize("case", SHAPES, ids=_case_id)
def test_split_functions_match_fused(case, dtype):
    """batch_stats and grad_sums/grad_input (SyncBatchNorm's pieces) give the same bytes as
    the fused kernels, which run the same per-channel code; normalize agrees to rounding."""
    shape, cl = case
    x, dy = _inputs(shape, cl, dtype)
    weight, bias = _params(shape[1], dtype)
    x3, layout = canonical(x)
    dy3 = like_canonical(dy, layout)
    y3, mean, var, invstd = nb.forward_train(x3, weight, bias, EPS)
    mean2, var2 = nb.batch_stats(x3)
    assert torch.equal(mean2, mean) and torch.equal(var2, var)
    # normalize streams in memory order (its own loop, so FMA contraction may differ in the
    # last bit from the fused kernel's)
    assert_close(nb.normalize(x3, mean, invstd, weight, bias), y3, dtype, "normalize vs fused")

    dx3, sum_dy, sum_dy_xhat = nb.backward(dy3, x3, mean, invstd, weight, True, True)
    s_dy, s_dy_xhat = nb.grad_sums(dy3, x3, mean, invstd)
    assert torch.equal(s_dy, sum_dy) and torch.equal(s_dy_xhat, sum_dy_xhat)
    count = _count(shape)
    dx3b = nb.grad_input(dy3, x3, mean, invstd, weight, s_dy, s_dy_xhat, count, True)
    assert torch.equal(dx3b, dx3)
    # a global count (SyncBatchNorm: more values on other ranks) changes dx as the formula says
    dx3c = nb.grad_input(dy3, x3, mean, invstd, weight, s_dy, s_dy_xhat, 2 * count, True)
    xhat = (x3.double() - mean.double().view(1, -1, 1)) * invstd.double().view(1, -1, 1)
    k = (weight.double() * invstd.double()).view(1, -1, 1)
    expect = k * (
        dy3.double()
        - (s_dy.double() / (2 * count)).view(1, -1, 1)
        - xhat * (s_dy_xhat.double() / (2 * count)).view(1, -1, 1)
    )
    assert_close(dx3c, expect, dtype, "dx with a global count", count=count)


@pytest.mark.parametrize("dtype", NATIVE + (torch.bfloat16,))
@pytest.mark.parametrize("case", SHAPES, ids=_case_id)
def test_fused_residual_relu(case, dtype):
    """y = relu(bn(x) + residual); backward counts dy only where y > 0 (y3_mask)."""
    shape, cl = case
    x, dy = _inputs(shape, cl, dtype)
    residual = make_input(shape, dtype=dtype, channels_last=cl, seed=5, offset=-0.3)
    weight, bias = _params(shape[1], dtype)
    x3, layout = canonical(x)
    res3 = like_canonical(residual, layout)
    dy3 = like_canonical(dy, layout)

    y3, mean, var, invstd = nb.forward_train(x3, weight, bias, EPS, res3, True)
    bn_ref, cache = reference.forward(to_numpy(x), _np(weight), _np(bias), EPS)
    pre = bn_ref + to_numpy(residual)
    y_ref = np.maximum(pre, 0)
    assert_close(layout.from_canonical(y3), torch.from_numpy(y_ref), dtype, "y", count=4)
    assert (y3 >= 0).all()
    y3_norelu, *_ = nb.forward_train(x3, weight, bias, EPS, res3, False)
    assert_close(layout.from_canonical(y3_norelu), torch.from_numpy(pre), dtype, "bn + res")

    dx3, sum_dy, sum_dy_xhat = nb.backward(dy3, x3, mean, invstd, weight, True, True, y3)
    # the reference's dy is zero where the kernel's output was clipped
    dy_masked = to_numpy(dy) * (to_numpy(layout.from_canonical(y3)) > 0)
    dx_ref, dw_ref, db_ref = reference.backward(dy_masked, cache)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    n = _count(shape)
    assert_close(layout.from_canonical(dx3), torch.from_numpy(dx_ref), dtype, "dx", count=n)
    assert_close(sum_dy_xhat, torch.from_numpy(dw_ref), acc, "sum_dy_xhat", count=n)
    assert_close(sum_dy, torch.from_numpy(db_ref), acc, "sum_dy", count=n)
    s_dy, s_dy_xhat = nb.grad_sums(dy3, x3, mean, invstd, y3)
    assert torch.equal(s_dy, sum_dy) and torch.equal(s_dy_xhat, sum_dy_xhat)

    y3_eval = nb.normalize(x3, mean, invstd, weight, bias, res3, True)
    assert_close(y3_eval, y3, dtype, "eval path with residual and relu")


@pytest.mark.parametrize("case", BIG, ids=_case_id)
def test_big_channels(case):
    """A channel (or block of rows) far bigger than the caches: many chunks merged."""
    shape, cl = case
    x, dy = _inputs(shape, cl, torch.float32)
    weight, bias = _params(shape[1], torch.float32)
    x3, layout = canonical(x)
    y3, mean, var, invstd = nb.forward_train(x3, weight, bias, EPS)
    y_ref, cache = reference.forward(to_numpy(x), _np(weight), _np(bias), EPS)
    mean_ref, var_ref, n = reference.batch_statistics(to_numpy(x))
    assert_close(layout.from_canonical(y3), torch.from_numpy(y_ref), torch.float32, "y", 4)
    torch.testing.assert_close(mean.double(), torch.from_numpy(mean_ref), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(var.double(), torch.from_numpy(var_ref), rtol=1e-6, atol=0)
    dx3, sum_dy, sum_dy_xhat = nb.backward(like_canonical(dy, layout), x3, mean, invstd, weight,
                                           True, True)  # fmt: skip
    dx_ref, dw_ref, db_ref = reference.backward(to_numpy(dy), cache)
    assert_close(layout.from_canonical(dx3), torch.from_numpy(dx_ref), torch.float32, "dx", n)
    # sums of n float32 terms: rtol 1e-5, plus sqrt(n) rounding steps or 2e-8 of the sum of
    # |terms| (eps / 3), whichever is more: x - mean rounded to float32 carries a bias that
    # adds up over millions of terms (2x1x4096x1100: sum_dy_xhat 0.085 off in 3038 where
    # sqrt(n) steps allow 0.03; torch's own is 0.081 off)
    dyn, axes = to_numpy(dy), (0, *range(2, x.dim()))
    for got, ref, terms, name in (
        (sum_dy, db_ref, dyn, "sum_dy"),
        (sum_dy_xhat, dw_ref, dyn * cache.xhat, "sum_dy_xhat"),
    ):
        atol = np.maximum(1e-5 * n**0.5, 2e-8 * np.abs(terms).sum(axis=axes))
        err = np.abs(got.double().numpy() - ref)
        assert (err <= atol + 1e-5 * np.abs(ref)).all(), (name, err, atol)  # rtol 1e-5 as ever
    # eval, and the fused residual + relu, on the same big tensors
    y3_eval = nb.normalize(x3, mean, invstd, weight, bias)
    y_ref3 = like_canonical(torch.from_numpy(y_ref).float(), layout)
    assert_close(y3_eval, y_ref3, torch.float32, "eval y", 4)
    res3 = like_canonical(dy, layout)
    y3_fused = nb.forward_train(x3, weight, bias, EPS, res3, True)[0]
    assert_close(y3_fused, torch.relu(y3 + res3), torch.float32, "relu(y + residual)", 4)


@pytest.mark.parametrize(
    "shape",
    [
        (74, 64, 30, 30),  # x over 16 MiB, runs of 900: the next sample's runs prefetched
        (16, 96, 9, 9),  # short runs: the tiled kernels
    ],
)
def test_blocking_does_not_change_the_bytes(shape):
    """Each channel's outputs are a fixed function of its own data: the whole tensor (big
    blocks) and a slice of three channels (small blocks, other kernels' block sizes) give the
    same bytes for those channels, forward and backward."""
    x, dy = _inputs(shape, False, torch.float32)
    weight, bias = _params(shape[1], torch.float32)

    def run(sl):
        x3 = x[:, sl].contiguous().view(shape[0], -1, shape[2] * shape[3])
        dy3 = dy[:, sl].contiguous().view_as(x3)
        y3, mean, var, invstd = nb.forward_train(x3, weight[sl], bias[sl], EPS)
        dx3, sum_dy, sum_dy_xhat = nb.backward(dy3, x3, mean, invstd, weight[sl], True, True)
        return [t.contiguous() for t in (y3, mean, var, dx3, sum_dy, sum_dy_xhat)]

    sl = slice(37, 40)
    whole = run(slice(None))
    part = run(sl)
    for name, a, b in zip(("y", "mean", "var", "dx", "sum_dy", "sum_dy_xhat"), whole, part):
        a = a[:, sl] if a.dim() == 3 else a[sl]
        assert torch.equal(a.contiguous(), b), name


@pytest.mark.parametrize("case", EMPTY, ids=_case_id)
def test_empty_batch(case):
    shape, cl = case
    x, dy = _inputs(shape, cl, torch.float32)
    weight, bias = _params(shape[1], torch.float32)
    x3, layout = canonical(x)
    y3, mean, var, invstd = nb.forward_train(x3, weight, bias, EPS)
    assert y3.shape == x3.shape and y3.numel() == 0
    assert torch.equal(mean, torch.zeros(shape[1])) and torch.equal(var, torch.zeros(shape[1]))
    dx3, sum_dy, sum_dy_xhat = nb.backward(like_canonical(dy, layout), x3, mean, invstd, weight,
                                           True, True)  # fmt: skip
    assert dx3.shape == x3.shape
    assert torch.equal(sum_dy, torch.zeros(shape[1]))
    assert torch.equal(sum_dy_xhat, torch.zeros(shape[1]))
    # and through the public API: empty output, buffers untouched
    rm, rv = torch.zeros(shape[1]), torch.ones(shape[1])
    y = BF.batch_norm(x, rm, rv, weight, bias, training=True, backend="numba")
    assert y.shape == x.shape
    assert torch.equal(rm, torch.zeros(shape[1])) and torch.equal(rv, torch.ones(shape[1]))


@pytest.mark.parametrize("channels_last", [False, True])
def test_offset_data_keeps_its_variance(channels_last):
    """x = 1e4 + 0.1 * randn: running_var within 1e-3 relative of float64 (E[x^2] - E[x]^2 in
    float32 would lose every digit)."""
    shape = (16, 4, 64, 64)
    g = torch.Generator().manual_seed(11)
    x = (1e4 + 0.1 * torch.randn(shape, generator=g, dtype=torch.float64)).float()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    rm, rv = torch.zeros(4), torch.ones(4)
    y = BF.batch_norm(x, rm, rv, training=True, momentum=1.0, backend="numba")
    xd = x.double()
    var_unbiased = xd.var(dim=(0, 2, 3), correction=1)
    torch.testing.assert_close(rv.double(), var_unbiased, rtol=1e-3, atol=0)
    torch.testing.assert_close(rm.double(), xd.mean(dim=(0, 2, 3)), rtol=1e-7, atol=0)
    # the normalised output has unit variance per channel, as in float64
    assert_close(y.double().var(dim=(0, 2, 3), correction=0), torch.ones(4, dtype=torch.float64),
                 torch.float32, "var(y)", count=4 * 64 * 64 * 16)  # fmt: skip


@pytest.mark.parametrize("backend", ["numba", "auto"])
def test_non_contiguous_input_is_copied(backend):
    """Strides that are neither NCHW nor channels-last: one copy, same numbers."""
    base = make_input((4, 6, 10, 8), seed=2)
    x = base[:, :, ::2, 1:]  # (4, 6, 5, 7), non-contiguous
    assert not x.is_contiguous()
    _train_step_against_reference(x, backend, dx_count=140)  # x itself: clone() would pack it


def _train_step_against_reference(x, backend, dx_count):
    """A training forward and backward of x (C = 6) against the float64 reference; the
    output."""
    weight, bias = _params(6, torch.float32)
    rm, rv = torch.zeros(6), torch.ones(6)
    xg = x.detach().requires_grad_(True)
    y = BF.batch_norm(xg, rm, rv, weight, bias, training=True, backend=backend)
    y_ref, cache = reference.forward(to_numpy(x), _np(weight), _np(bias), EPS)
    assert_close(y, torch.from_numpy(y_ref), torch.float32, "y", count=4)
    dy = make_input(x.shape, seed=9)
    (dx,) = torch.autograd.grad(y, xg, dy)
    dx_ref, _, _ = reference.backward(to_numpy(dy), cache)
    assert_close(dx, torch.from_numpy(dx_ref), torch.float32, "dx", count=dx_count)
    return y


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_ncl_stored_as_nlc_runs_channels_last_without_a_copy(backend):
    """An (N, C, L) view of an (N, L, C) tensor (a sequence model's transpose) is the
    channels-last layout of BatchNorm1d: the canonical (N * L, C, 1) view reads x's own
    storage, the output keeps x's strides, and values and dx match the reference."""
    base = make_input((4, 13, 6), seed=2)  # (N, L, C)
    x = base.transpose(1, 2)  # (N, C, L), strides (L * C, 1, C)
    x3, layout = canonical(x)
    assert layout.channels_last and x3.shape == (4 * 13, 6, 1)
    assert x3.data_ptr() == x.data_ptr()  # no copy
    y = _train_step_against_reference(x, backend, dx_count=52)
    assert y.stride() == x.stride()


def test_threads_follow_torch():
    """The numba pool is sized to torch.get_num_threads() on each parallel call."""
    import numba

    before = torch.get_num_threads()
    x3 = torch.randn(4, 8, 4096)  # above PARALLEL_MIN
    try:
        torch.set_num_threads(1)
        nb.forward_train(x3, None, None, EPS)
        assert numba.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    nb.forward_train(x3, None, None, EPS)
    assert numba.get_num_threads() == min(before, numba.config.NUMBA_NUM_THREADS)


def test_numba_threads_follow_torch_in_each_calling_thread():
    """numba's thread count is per calling thread: a call from a new thread sizes numba's pool
    there too."""
    import threading

    import numba

    x3 = torch.randn(4, 8, 4096)  # above PARALLEL_MIN
    seen = []

    def work():
        nb.forward_train(x3, None, None, EPS)
        seen.append((numba.get_num_threads(), torch.get_num_threads()))

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        nb.forward_train(x3, None, None, EPS)  # this thread first: numba's count here is 1
        t = threading.Thread(target=work)
        t.start()
        t.join()
    finally:
        torch.set_num_threads(before)
    ((numba_there, torch_there),) = seen
    assert numba_there == max(1, min(torch_there, numba.config.NUMBA_NUM_THREADS))


def test_numba_threads_are_put_back_after_someone_else_changes_them():
    """numba.set_num_threads from elsewhere (the user, another library) is undone at the next
    call: the kernels are told a thread count and numba must run that many."""
    import numba

    x3 = torch.randn(4, 8, 4096)  # above PARALLEL_MIN
    nb.forward_train(x3, None, None, EPS)
    want = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(1)
    nb.forward_train(x3, None, None, EPS)
    assert numba.get_num_threads() == want


# --- the run sums (sum_centred, sum_grad): the order their comment spells out ------------


def _run_sum_in_order(vals: np.ndarray) -> np.generic:
    """The run sums' documented order, replayed in NumPy in the same dtype: UNROLL vector
    accumulators of 64 bytes over full strips, the tail in order, a fixed fold."""
    from batchnorm.backends._numba_kernels import UNROLL

    width = 64 // vals.itemsize
    strip = UNROLL * width
    nvec = vals.size - vals.size % strip
    acc = np.zeros((UNROLL, width), vals.dtype)
    for i0 in range(0, nvec, strip):
        acc += vals[i0 : i0 + strip].reshape(UNROLL, width)
    tail = vals.dtype.type(0)
    for v in vals[nvec:]:
        tail = tail + v
    vecs = list(acc)
    while len(vecs) > 1:
        vecs = [vecs[i] + vecs[i + 1] for i in range(0, len(vecs), 2)]
    lanes = vecs[0]
    while lanes.size > 1:
        lanes = lanes[: lanes.size // 2] + lanes[lanes.size // 2 :]
    return lanes[0] + tail


@pytest.mark.parametrize("n", [0, 1, 7, 63, 64, 65, 127, 128, 129, 784, 2048, 4087])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_run_sums_are_the_documented_order_bit_for_bit(n, dtype):
    from numba import njit

    from batchnorm.backends._numba_kernels import sum_centred, sum_grad, sum_grad_masked

    rng = np.random.default_rng(n)
    x = (rng.standard_normal(n) * 3 + 1).astype(dtype)
    dy = rng.standard_normal(n).astype(dtype)
    mask = rng.standard_normal(n).astype(dtype)
    mask[::5] = np.nan  # NaN counts (NaN <= 0 is false), as in torch's relu backward
    m = dtype(0.75)
    got = njit(lambda dy, x, mask, m: sum_centred(x, m) + sum_grad(dy, x, m)
               + sum_grad_masked(dy, x, mask, m))(dy, x, mask, m)  # fmt: skip
    d = x - m
    g = np.where(mask <= 0, dtype(0), dy)
    want = [_run_sum_in_order(v) for v in (d, d * d, dy, dy * d, g, g * d)]
    assert [v.tobytes() for v in map(dtype, got)] == [v.tobytes() for v in want]
    # and the order is a good one: close to the float64 sums
    exact = [v.astype(np.float64).sum() for v in (d, d * d, dy, dy * d, g, g * d)]
    scale = [np.abs(v).astype(np.float64).sum() + 1 for v in (d, d * d, dy, dy * d, g, g * d)]
    tol = 1e-6 if dtype == np.float32 else 1e-14
    assert all(abs(float(a) - b) <= tol * s for a, b, s in zip(got, exact, scale))


@pytest.mark.parametrize("tiled", [False, True], ids=["run", "tile"])
@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 49, 196, 2051])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_affine_run_is_the_scalar_formula_bit_for_bit(n, dtype, tiled):
    """``affine_run`` (the vector loop written in LLVM IR) gives NumPy's ``x * s + t``
    (+ residual, then the relu) in the arrays' dtype, over [lo, lo + n) only, for every
    length (vector steps, then a scalar remainder); the relu keeps NaN and -0.0. With
    non-temporal stores (``nt``) too, from every start modulo 64 bytes (scalars up to the
    boundary, aligned vectors, scalars after). ``affine_tile``: s and t per element."""
    from numba import njit

    from batchnorm.backends._numba_kernels import affine_run, affine_tile, store_fence

    @njit
    def run(x, y, r, lo, n, s, t, relu, nt):
        affine_run(x, y, r, lo, n, s, t, relu, nt)
        store_fence()

    @njit
    def tile(x, y, r, lo, n, s, t, relu, nt):
        affine_tile(x, y, r, lo, n, s, t, relu, nt)
        store_fence()

    rng = np.random.default_rng(n)
    item = np.dtype(dtype).itemsize
    x = (rng.standard_normal(n + 80) * 3 + 1).astype(dtype)
    x[3::7] = np.nan
    x[4::11] = dtype(0.0)
    r = rng.standard_normal(n + 80).astype(dtype)
    s, t = dtype(-1.3), dtype(-0.0)  # x = 0 gives -0.0 (+ -0.0), which the relu keeps
    if tiled:
        s = (rng.standard_normal(n) * 2).astype(dtype)
        t = rng.standard_normal(n).astype(dtype)
        t[::5] = dtype(-0.0)
        run = tile
    for nt in (False, True):
        for lo in range(3, 3 + 64 // item) if nt else (3,):
            for res in (r, r[:0]):
                for relu in (False, True):
                    y = np.full(n + 80, 7.0, dtype)
                    run(x, y, res, lo, n, s, t, relu, nt)
                    want = (x[lo : lo + n] * s + t).astype(dtype)
                    if res.size:
                        want = want + res[lo : lo + n]
                    if relu:
                        want = np.where(want < 0, dtype(0), want)
                    assert y[lo : lo + n].tobytes() == want.tobytes()
                    assert (y[:lo] == 7).all() and (y[lo + n :] == 7).all()  # nothing else


@pytest.mark.parametrize("tiled", [False, True], ids=["run", "tile"])
@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 49, 196, 2051])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_grad_x_run_is_the_scalar_formula_bit_for_bit(n, dtype, tiled):
    """``grad_x_run`` (backward's dx over one run, in LLVM IR) gives NumPy's
    ``g * k_dy + x * k_x + k_0`` (g: 0 where mask <= 0, else dy, with a mask; ``g * k_dy``
    in eval) over [lo, lo + n) only, with cached or non-temporal stores, from every start
    modulo 64 bytes; an inf in x stays out of eval's dx. ``grad_x_tile``: the k per
    element."""
    from numba import njit

    from batchnorm.backends._numba_kernels import grad_x_run, grad_x_tile, store_fence

    @njit
    def run(dy, x, mask, dx, lo, n, k_dy, k_x, k_0, training, nt):
        grad_x_run(dy, x, mask, dx, lo, n, k_dy, k_x, k_0, training, nt)
        store_fence()

    @njit
    def tile(dy, x, mask, dx, lo, n, k_dy, k_x, k_0, training, nt):
        grad_x_tile(dy, x, mask, dx, lo, n, k_dy, k_x, k_0, training, nt)
        store_fence()

    rng = np.random.default_rng(n + 1)
    item = np.dtype(dtype).itemsize
    dy, x, mask = ((rng.standard_normal(n + 80) * 3).astype(dtype) for _ in range(3))
    x[5::13] = np.inf
    mask[6::9] = np.nan
    k_dy, k_x, k_0 = dtype(1.7), dtype(-0.3), dtype(0.25)
    if tiled:
        k_dy, k_x, k_0 = (rng.standard_normal(n).astype(dtype) for _ in range(3))
        run = tile
    for nt in (False, True):
        for lo in range(3, 3 + 64 // item) if nt else (3,):
            for m, training in ((mask, True), (mask, False), (mask[:0], True), (mask[:0], False)):
                dx = np.full(n + 80, 7.0, dtype)
                run(dy, x, m, dx, lo, n, k_dy, k_x, k_0, training, nt)
                g = dy[lo : lo + n]
                if m.size:
                    g = np.where(m[lo : lo + n] <= 0, dtype(0), g)
                if training:
                    want = (g * k_dy + x[lo : lo + n] * k_x + k_0).astype(dtype)
                else:  # x plays no part in eval, masked or not
                    want = (g * k_dy).astype(dtype)
                assert dx[lo : lo + n].tobytes() == want.tobytes()
                assert (dx[:lo] == 7).all() and (dx[lo + n :] == 7).all()


@pytest.mark.parametrize("k, L", [(1, 1), (1, 16), (2, 3), (3, 100), (4, 2048)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_aligned_scratch_starts_on_64_bytes(k, L, dtype):
    from numba import njit

    from batchnorm.backends._numba_kernels import _aligned

    make = njit(lambda k, L, like: _aligned(k, L, like.dtype))
    for _ in range(8):  # numba's own arrays start on 32 bytes: both cases come up
        a = make(k, L, np.empty(0, dtype))
        assert a.shape == (k, L) and a.dtype == dtype and a.flags.c_contiguous
        assert a.ctypes.data % 64 == 0
        if L * a.itemsize % 64 == 0:  # then every row is aligned too
            assert all(a[q].ctypes.data % 64 == 0 for q in range(k))


@pytest.mark.parametrize(
    "A, C, dtype",
    [(1000, 64, np.float32), (150, 2048, np.float32), (7, 3, np.float32), (999, 37, np.float64),
     (33000, 130, np.float32)],  # the last one over 16 MiB: second passes in memory order
)  # fmt: skip
def test_channels_last_kernels_do_not_depend_on_the_thread_count(A, C, dtype):
    """The channels-last kernels give each of ``threads`` one contiguous share of the row
    blocks; the partials merge in block order, so any count gives the same bytes: training
    with a residual and relu, eval, backward with a relu mask, dx alone."""
    from batchnorm.backends import _numba_kernels as K

    nb._threads_for(1 << 20)  # numba's pool is started before a parallel kernel runs
    rng = np.random.default_rng(C)
    x = (rng.standard_normal(A * C) * 2 + 3).astype(dtype)
    dy, res = (rng.standard_normal(A * C).astype(dtype) for _ in range(2))
    w, b = rng.random(C).astype(dtype) + 0.5, rng.standard_normal(C).astype(dtype)
    empty, eps = np.empty(0, dtype), dtype(EPS)
    outs = []
    for threads in (1, 2) if A * C > 1 << 22 else (1, 2, 3, 5):
        y, y_eval, dx, dx_only = (np.empty_like(x) for _ in range(4))
        mean, var, invstd = (np.empty(C, dtype) for _ in range(3))
        s_dy, s_dyx = np.empty(C), np.empty(C)
        K.cl_fwd_par(x, y, res, A, C, mean, var, invstd, w, b, eps, True, True, True, threads)
        K.cl_fwd_par(x, y_eval, empty, A, C, mean, var, invstd, w, b, eps, False, True, False,
                     threads)  # fmt: skip
        K.cl_bwd_par(dy, x, y, dx, A, C, mean, invstd, w, s_dy, s_dyx, float(A), True, True,
                     True, threads)  # fmt: skip
        K.cl_bwd_par(dy, x, empty, dx_only, A, C, mean, invstd, w, s_dy, s_dyx, float(A),
                     False, True, True, threads)  # fmt: skip
        outs.append([v.tobytes() for v in (y, y_eval, mean, var, invstd, dx, dx_only, s_dy, s_dyx)])
    assert all(o == outs[0] for o in outs[1:])


def _short_run_sum(rows: list) -> np.ndarray:
    """The short-run kernels' per-position order, replayed in NumPy: samples four at a time,
    ``(r0 + r1) + (r2 + r3)`` added to a float32 accumulator, flushed into float64 every
    FLUSH_ROWS samples; the last ``A % 4`` samples one at a time; a last flush."""
    from batchnorm.backends._numba_kernels import FLUSH_ROWS

    acc = np.zeros_like(rows[0])
    out = np.zeros(rows[0].size)
    a4 = len(rows) // 4 * 4
    for a in range(0, a4, 4):
        acc = acc + ((rows[a] + rows[a + 1]) + (rows[a + 2] + rows[a + 3]))
        if (a + 4) % FLUSH_ROWS == 0:
            out, acc = out + acc, np.zeros_like(acc)
    for a in range(a4, len(rows)):
        acc = acc + rows[a]
    return out + acc


@pytest.mark.parametrize("A", [3, 4, 67, 131])
def test_short_run_sums_are_the_documented_order_bit_for_bit(A):
    """Statistics and gradient sums of short runs (B < SMALL_B) follow ``_short_run_sum``
    per position, then add a channel's positions in order in float64: the flush schedule
    (float32 partials over at most FLUSH_ROWS samples) is pinned, not just the tolerance."""
    C, B = 5, 9
    g = torch.Generator().manual_seed(A)
    x3 = torch.randn(A, C, B, generator=g) * 0.1 + 1e3
    dy3 = torch.randn(A, C, B, generator=g)
    _, mean, var, invstd = nb.forward_train(x3, None, None, EPS)
    sum_dy, sum_dy_xhat = nb.grad_sums(dy3, x3, mean, invstd)

    def per_channel(rows):  # positions of a channel added in order, in float64
        total = np.zeros(C)
        for v in _short_run_sum(rows).reshape(C, B).T:
            total = total + v
        return total

    x, g_ = list(x3.numpy().reshape(A, -1)), list(dy3.numpy().reshape(A, -1))
    n = A * B
    shift = (per_channel(x) / n).astype(np.float32)
    d = [r - np.repeat(shift, B) for r in x]
    s1, s2 = per_channel(d), per_channel([v * v for v in d])
    want_mean = (shift.astype(np.float64) + s1 / n).astype(np.float32)
    want_var = np.maximum((s2 - s1 * s1 / n) / n, 0).astype(np.float32)
    assert mean.numpy().tobytes() == want_mean.tobytes()
    assert var.numpy().tobytes() == want_var.tobytes()
    m = np.repeat(mean.numpy(), B)
    want_dy = per_channel(g_).astype(np.float32)
    want_dyx = (per_channel([gr * (xr - m) for gr, xr in zip(g_, x)])
                * invstd.numpy().astype(np.float64)).astype(np.float32)  # fmt: skip
    assert sum_dy.numpy().tobytes() == want_dy.tobytes()
    assert sum_dy_xhat.numpy().tobytes() == want_dyx.tobytes()


def test_direct_paths_return_plain_tensors_for_subclasses():
    """A Parameter (or any Tensor subclass) as input: the one-call paths still return a plain
    Tensor, as the general path does, with the same bytes."""
    x = torch.nn.Parameter(make_input((4, 3, 5, 5), torch.float32, seed=1))
    rm, rv = torch.zeros(3), torch.ones(3)
    with torch.no_grad():
        y_eval = BF.batch_norm(x, rm, rv, training=False, backend="numba")
        y_train = BF.batch_norm(x, rm.clone(), rv.clone(), training=True, backend="numba")
    assert type(y_eval) is torch.Tensor and type(y_train) is torch.Tensor
    plain = x.detach().clone()
    with torch.no_grad():
        assert torch.equal(y_eval, BF.batch_norm(plain, rm, rv, training=False, backend="numba"))
        assert torch.equal(y_train, BF.batch_norm(plain, rm.clone(), rv.clone(), training=True,
                                                  backend="numba"))  # fmt: skip


# --- the direct paths (one kernel call each way): the general path's bytes ---------------

DIRECT = [
    ((7, 5), False),  # (N, C)
    ((4, 3, 10), False),  # (N, C, L): runs of 10, the tiled kernel
    ((2, 3, 70), False),  # runs of 70: the streaming kernel
    ((1, 3, 5, 7), False),  # N = 1
    ((1, 3, 5, 7), True),
    ((3, 1, 4, 4), True),  # C = 1
    ((2, 13, 3, 5, 2), False),  # 3d, primes
    ((2, 13, 3, 5, 2), True),
    ((8, 32, 3, 3), True),
    # over numba_cpu.PARALLEL_MIN: the parallel kernels
    ((3, 7, 61, 67), False),  # long runs
    ((300, 5, 7, 7), False),  # short runs: the tiled kernel
    ((9, 37, 17, 19), True),  # channels-last rows
    ((20000, 4), False),  # (N, C) rows
]


def _bytes(t):
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def _general_path(monkeypatch) -> None:
    """Make the public calls take the general path: the autograd.Function of ``_function`` on
    canonical views, the backend's split functions, no one-call kernels."""
    _no_lane(monkeypatch)
    monkeypatch.setattr(nb, "eval_direct", lambda *a: None)
    monkeypatch.setattr(nb, "train_direct", lambda *a: None)


def _no_lane(monkeypatch) -> None:
    """Make the public calls skip ``batch_norm``'s express lane (``numba_cpu.lane``)."""
    monkeypatch.setattr(nb, "lane", lambda *a: None)


def _on_both_paths(monkeypatch, run) -> list:
    """``[run()]`` on the direct path, then on the general path (``_general_path``)."""
    out = []
    for general in (False, True):
        with monkeypatch.context() as m:
            if general:
                _general_path(m)
            out.append(run())
    return out


def _spy(monkeypatch, *names) -> list:
    """Wrap these numba_cpu functions so that each call appends its name; returns the list."""
    calls = []
    for name in names:
        real = getattr(nb, name)
        monkeypatch.setattr(nb, name, lambda *a, real=real, name=name: calls.append(name)
                            or real(*a))  # fmt: skip
    return calls


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", NATIVE)
@pytest.mark.parametrize("case", DIRECT, ids=_case_id)
def test_eval_direct_gives_the_general_paths_bytes(case, dtype, affine, relu, monkeypatch):
    shape, cl = case
    C = shape[1]
    x = make_input(shape, dtype=dtype, channels_last=cl)
    g = torch.Generator().manual_seed(7)
    rm = torch.randn(C, generator=g, dtype=dtype)
    rv = torch.rand(C, generator=g, dtype=dtype) + 0.1
    weight, bias = _params(C, dtype) if affine else (None, None)
    eps = 1e-3
    if C > 1:  # running_var + eps == 0: torch's inf and nan, on both paths
        rv[0], eps = 0.0, 0.0
    act = "relu" if relu else None
    direct = nb.eval_direct(x, rm, rv, weight, bias, eps, relu)
    assert direct is not None
    with monkeypatch.context() as m:
        _general_path(m)
        general = BF.batch_norm(x, rm, rv, weight, bias, False, eps=eps, activation=act,
                                backend="numba")  # fmt: skip
    assert direct.shape == general.shape and direct.stride() == general.stride()
    assert _bytes(direct) == _bytes(general)
    # the public call without a gradient takes the express lane: the same bytes
    calls = _spy(monkeypatch, "lane", "eval_direct")
    public = BF.batch_norm(x, rm, rv, weight, bias, False, eps=eps, activation=act,
                           backend="numba")  # fmt: skip
    assert calls == ["lane"] and public.stride() == direct.stride()
    assert _bytes(public) == _bytes(direct)
    # and with the lane off, the direct path
    calls.clear()
    monkeypatch.setattr(nb, "eval_direct", lambda *a: calls.append(1) or direct)
    _no_lane(monkeypatch)
    public = BF.batch_norm(x, rm, rv, weight, bias, False, eps=eps, activation=act,
                           backend="numba")  # fmt: skip
    assert calls == [1] and public is direct


def test_eval_direct_declines_what_it_does_not_do():
    C = 3
    rm, rv = torch.zeros(C), torch.ones(C)
    assert nb.eval_direct(torch.randn(4, C, 5).bfloat16(), rm, rv, None, None, 1e-5, False) is None
    assert nb.eval_direct(torch.randn(4, C, 10)[:, :, ::2], rm, rv, None, None, 1e-5, False) is None
    assert nb.eval_direct(torch.randn(4, C, 5), rm, torch.ones(2 * C)[::2], None, None, 1e-5,
                          False) is None  # fmt: skip
    assert nb.eval_direct(torch.randn(0, C, 5), rm, rv, None, None, 1e-5, False) is None
    # and those still give torch's numbers through the general path
    x = torch.randn(4, C, 10)[:, :, ::2]
    want = torch.nn.functional.batch_norm(x, rm, rv, training=False)
    assert_close(BF.batch_norm(x, rm, rv, training=False, backend="numba"), want, torch.float32)


def test_direct_paths_read_values_not_bytes():
    """The one-call kernels read tensors by address: views with a storage offset are read from
    their first value, and negative views (whose bytes are minus their values) are declined and
    still give torch's numbers."""
    C = 3
    g = torch.Generator().manual_seed(3)
    base = torch.randn(5, C, 4, 4, generator=g) * 2 + 1
    params = torch.rand(4 * C, generator=g) + 0.5
    x, w, b, rv = base[1:], params[C : 2 * C], params[2 * C : 3 * C], params[3 * C :]
    rm = -params[:C]
    assert x.storage_offset() > 0 and w.storage_offset() > 0
    assert nb.eval_direct(x, rm, rv, w, b, 1e-5, False) is not None
    for args in (
        (torch._neg_view(x), rm, rv, w, b),
        (x, rm, torch._neg_view(rv), w, b),
        (x, rm, rv, torch._neg_view(w), b),
    ):
        assert nb.eval_direct(*args, 1e-5, False) is None
        assert nb.train_direct(args[0], *args[3:], 1e-5, False, *args[1:3], 0.1, None) is None
    for args in ((x, rm, rv, w, b), (torch._neg_view(x), rm, rv, torch._neg_view(w), b)):
        for training in (False, True):
            rmo, rvo, rmt, rvt = args[1].clone(), args[2].clone(), args[1].clone(), args[2].clone()
            ours = BF.batch_norm(args[0], rmo, rvo, *args[3:], training, backend="numba")
            want = torch.nn.functional.batch_norm(args[0], rmt, rvt, *args[3:], training)
            assert_close(ours, want, torch.float32)
            assert_close(rmo, rmt, torch.float32)
            assert_close(rvo, rvt, torch.float32)


@pytest.mark.parametrize("dtype", NATIVE)
@pytest.mark.parametrize("count", [2, 9, 1001])
@pytest.mark.parametrize("factor", [0.1, 1.0, 1 / 3, 0.0])
def test_running_update_gives_the_numpy_paths_bytes(dtype, count, factor):
    from batchnorm import _conventions

    g = torch.Generator().manual_seed(count)
    C = 37
    mean, var = torch.randn(C, generator=g, dtype=dtype), torch.rand(C, generator=g, dtype=dtype)
    rm0, rv0 = torch.randn(C, generator=g, dtype=dtype), torch.rand(C, generator=g, dtype=dtype)
    ours = (rm0.clone(), rv0.clone())
    theirs = (rm0.clone(), rv0.clone())
    versions = [t._version for t in ours]
    nb.update_running_stats(*ours, mean, var, count, factor)
    _conventions.update_running_stats(*theirs, mean, var, count, factor)
    assert [_bytes(t) for t in ours] == [_bytes(t) for t in theirs]
    assert [t._version for t in ours] == [v + 1 for v in versions]  # autograd sees the change
    # and both are the formula, against float64
    f, unbias = factor, count / (count - 1)
    want_rv = rv0.double() * (1 - f) + f * var.double() * unbias
    assert_close(ours[1], want_rv.to(dtype), dtype)


def test_running_update_falls_back_for_mixed_dtypes(monkeypatch):
    from batchnorm import _conventions

    calls = []
    monkeypatch.setattr(nb.K, "update_running", lambda *a: calls.append(a))
    bufs = [torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)]
    want = [t.clone() for t in bufs]
    stats = (torch.ones(3), torch.full((3,), 2.0))  # float32 statistics, float64 buffers
    nb.update_running_stats(*bufs, *stats, 4, 0.5)
    _conventions.update_running_stats(*want, *stats, 4, 0.5)
    assert not calls and [_bytes(t) for t in bufs] == [_bytes(t) for t in want]
    assert bufs[0].tolist() == [0.5] * 3


def test_training_calls_use_the_backends_running_update(monkeypatch):
    _general_path(monkeypatch)
    calls = _spy(monkeypatch, "update_running_stats")
    rm, rv = torch.zeros(4), torch.ones(4)
    x = make_input((6, 4, 5))
    BF.batch_norm(x.clone().requires_grad_(True), rm, rv, training=True, backend="numba")
    want_rm, want_rv = torch.zeros(4), torch.ones(4)
    torch.nn.functional.batch_norm(x, want_rm, want_rv, training=True)
    assert calls == ["update_running_stats"]
    assert_close(rm, want_rm, torch.float32)
    assert_close(rv, want_rv, torch.float32)


def test_running_update_on_strided_buffers():
    from batchnorm import _conventions

    g = torch.Generator().manual_seed(3)
    mean, var = torch.randn(5, generator=g), torch.rand(5, generator=g)
    ours = [torch.randn(10, generator=g)[::2], torch.rand(10, generator=g)[::2]]  # views
    want = [t.clone() for t in ours]
    nb.update_running_stats(*ours, mean, var, 7, 0.1)
    _conventions.update_running_stats(*want, mean, var, 7, 0.1)
    assert [_bytes(t) for t in ours] == [_bytes(t) for t in want]


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", NATIVE)
@pytest.mark.parametrize("case", DIRECT, ids=_case_id)
def test_train_direct_gives_the_general_paths_bytes(case, dtype, relu, momentum, monkeypatch):
    shape, cl = case
    C = shape[1]
    x = make_input(shape, dtype=dtype, channels_last=cl)
    weight, bias = _params(C, dtype)
    act = "relu" if relu else None

    def run(inp):
        g = torch.Generator().manual_seed(11)
        rm, rv = torch.randn(C, generator=g, dtype=dtype), torch.rand(C, generator=g, dtype=dtype)
        nbt = torch.tensor(4)
        y = BF.batch_norm(inp, rm, rv, weight, bias, True, momentum, 1e-5, activation=act,
                          num_batches_tracked=nbt, backend="numba")  # fmt: skip
        versions.append([t._version for t in (rm, rv, nbt)])  # autograd sees the same bumps
        return y.detach(), rm, rv, nbt

    versions = []

    calls = _spy(monkeypatch, "lane", "train_direct")
    lane = run(x)  # no graph: the express lane
    assert calls == ["lane"]
    with monkeypatch.context() as m:
        _no_lane(m)
        calls = _spy(m, "train_direct")
        direct = run(x)
        assert calls == ["train_direct"]
    with monkeypatch.context() as m:
        _general_path(m)
        general = run(x)
    for path in (lane, direct):
        assert path[0].stride() == general[0].stride()
        assert [_bytes(t) for t in path[:3]] == [_bytes(t) for t in general[:3]]
        assert int(path[3]) == int(general[3]) == 5
    assert versions[0] == versions[1] == versions[2]


def _strides(t):
    return [st for st, n in zip(t.stride(), t.shape) if n > 1]


def _grads(x, dy, training, relu, residual, wanted, general, monkeypatch):
    """(y, grads of the ``wanted`` leaves among x, weight, bias, residual, running buffers
    after the call) of one public call, on the direct or the general path."""
    C = x.shape[1]
    weight, bias = _params(C, x.dtype)
    leaves = [x.clone(), weight, bias, residual.clone() if residual is not None else None]
    for t, want in zip(leaves, wanted):
        if t is not None and want:
            t.requires_grad_(True)
    g = torch.Generator().manual_seed(5)
    rm = torch.randn(C, generator=g, dtype=x.dtype)
    rv = torch.rand(C, generator=g, dtype=x.dtype) + 0.2
    with monkeypatch.context() as m:
        if general:
            _general_path(m)
        calls = _spy(m, "train_direct", "eval_direct")
        y = BF.batch_norm(leaves[0], rm, rv, leaves[1], leaves[2], training, 0.1, 1e-5,
                          residual=leaves[3], activation="relu" if relu else None,
                          backend="numba")  # fmt: skip
        assert len(calls) == 1
    inputs = [t for t, want in zip(leaves, wanted) if t is not None and want]
    grads = torch.autograd.grad(y, inputs, dy)
    return [y.detach(), *grads, rm, rv]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", NATIVE)
@pytest.mark.parametrize("case", DIRECT, ids=_case_id)
def test_direct_function_gives_the_general_paths_gradients(case, dtype, training, monkeypatch):
    """With a graph to record, contiguous and channels-last inputs go through the one-call
    autograd Function (one kernel forward, one backward, on the stored tensors); its outputs,
    gradients and running buffers are the general Function's, byte for byte, with and without
    the fused relu and residual, for every subset of inputs that wants a gradient."""
    shape, cl = case
    x = make_input(shape, dtype=dtype, channels_last=cl)
    dy = make_input(shape, dtype=dtype, channels_last=cl, seed=2)
    residual = make_input(shape, dtype=dtype, channels_last=cl, seed=4)
    settings = [
        (False, None, (True, True, True, False)),
        (True, None, (True, False, True, False)),
        (True, residual, (True, True, True, True)),
        (False, residual, (False, True, False, True)),
        (True, None, (False, True, True, False)),  # weight and bias only: no dx
    ]
    for relu, res, wanted in settings:
        direct = _grads(x, dy, training, relu, res, wanted, False, monkeypatch)
        general = _grads(x, dy, training, relu, res, wanted, True, monkeypatch)
        for a, b in zip(direct, general):  # (a stride of a dim of size 1 is never used)
            assert _strides(a) == _strides(b) and _bytes(a) == _bytes(b)


def test_direct_function_takes_odd_gradients(monkeypatch):
    """dy in another memory format, an expanded dy (from ``sum()``), a negative view: the
    direct Function copies it to x's format first and gives the general path's bytes."""
    x = make_input((4, 5, 6, 3), channels_last=True)
    dy_cl = make_input((4, 5, 6, 3), channels_last=True, seed=6)
    for dy in (dy_cl.contiguous(), torch.ones(()).expand(4, 5, 6, 3), torch._neg_view(dy_cl)):

        def run(dy=dy):
            xg = x.clone().requires_grad_(True)
            y = BF.batch_norm(xg, None, None, training=True, activation="relu", backend="numba")
            return torch.autograd.grad(y, xg, dy)[0]

        out = _on_both_paths(monkeypatch, run)
        assert out[0].stride() == out[1].stride() and _bytes(out[0]) == _bytes(out[1])


def test_direct_function_double_backward_matches_torch():
    x = make_input((3, 4, 5, 5), dtype=torch.float64).requires_grad_(True)
    w, b = (t.requires_grad_(True) for t in _params(4, torch.float64))
    for training in (True, False):
        rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
        ours = BF.batch_norm(x, rm, rv, w, b, training, backend="numba")
        ref = torch.nn.functional.batch_norm(x, rm.clone(), rv.clone(), w, b, training)
        for y in (ours, ref):
            assert y.grad_fn is not None
        g_ours = torch.autograd.grad(ours.pow(3).sum(), (x, w), create_graph=True)
        g_ref = torch.autograd.grad(ref.pow(3).sum(), (x, w), create_graph=True)
        gg_ours = torch.autograd.grad(sum(g.pow(2).sum() for g in g_ours), (x, w, b))
        gg_ref = torch.autograd.grad(sum(g.pow(2).sum() for g in g_ref), (x, w, b))
        for a, r in zip((*g_ours, *gg_ours), (*g_ref, *gg_ref)):
            assert_close(a, r, torch.float64)


def test_train_direct_without_running_stats(monkeypatch):
    x = make_input((6, 4, 5))
    with monkeypatch.context() as m:
        calls = _spy(m, "lane", "train_direct")
        lane = BF.batch_norm(x, None, None, training=True, backend="numba")
        assert calls == ["lane"]
        _no_lane(m)
        calls = _spy(m, "train_direct")
        y = BF.batch_norm(x, None, None, training=True, backend="numba")
        assert calls == ["train_direct"]
    _general_path(monkeypatch)
    want = BF.batch_norm(x, None, None, training=True, backend="numba")
    assert _bytes(y) == _bytes(want) == _bytes(lane)


@pytest.mark.parametrize("lane", [True, False], ids=["lane", "direct"])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_modules_with_parameters_take_the_one_call_paths_without_grad(mode, lane, monkeypatch):
    import batchnorm

    if not lane:
        _no_lane(monkeypatch)
    calls = _spy(monkeypatch, *(["lane"] if lane else []), "train_direct", "eval_direct")
    ours, ref = batchnorm.BatchNorm2d(6, momentum=None), torch.nn.BatchNorm2d(6, momentum=None)
    ctx = torch.no_grad if mode == "no_grad" else torch.inference_mode
    with ctx():
        for step in range(3):
            x = make_input((4, 6, 5, 5), seed=step)
            assert_close(ours(x), ref(x), torch.float32)
        ours.eval(), ref.eval()
        x = make_input((4, 6, 5, 5), seed=9)
        assert_close(ours(x), ref(x), torch.float32)
    if lane:
        assert calls == ["lane"] * 4
    else:
        assert calls == ["train_direct"] * 3 + ["eval_direct"]
    for name in ("running_mean", "running_var"):
        assert_close(getattr(ours, name), getattr(ref, name), torch.float32)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 3


def test_a_failing_direct_call_leaves_the_running_buffers_as_torch_does():
    import batchnorm

    with torch.inference_mode():  # buffers that cannot be updated outside inference mode
        ours = batchnorm.BatchNorm2d(3, affine=False)
        ref = torch.nn.BatchNorm2d(3, affine=False)
    before = [t.clone() for t in (ours.running_mean, ours.running_var)]
    x = make_input((4, 3, 5, 5))
    for m in (ours, ref):  # the num_batches_tracked bump raises (after counting, in torch)
        with pytest.raises(RuntimeError, match="[Ii]nference"):
            m(x)
    assert [_bytes(t) for t in (ours.running_mean, ours.running_var)] == [_bytes(t) for t in before]
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)


@pytest.mark.parametrize(
    "pack",
    [lambda t: t.contiguous(), lambda t: t.half() if t.is_floating_point() else t],
    ids=["contiguous", "half"],
)
def test_direct_function_reads_what_saved_tensor_hooks_give_back(pack, monkeypatch):
    """Saved-tensor hooks may hand back another layout or dtype than the one saved; the direct
    backward reads by address, so it brings them back to x's: the general path's bytes when
    only the layout changed (both read the same values), its numbers to half precision when
    the hook rounds to half (the paths save different tensors)."""
    x = make_input((4, 3, 5, 5), channels_last=True)
    dy = make_input((4, 3, 5, 5), channels_last=True, seed=8)

    def run():
        xg = x.clone().requires_grad_(True)
        w = torch.rand(3, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = BF.batch_norm(xg, None, None, w, None, True, activation="relu", backend="numba")
        return torch.autograd.grad(y, (xg, w), dy)

    for a, b in zip(*_on_both_paths(monkeypatch, run)):
        assert a.dtype == b.dtype == torch.float32 and _strides(a) == _strides(b)
        if pack(torch.ones(1)).dtype == torch.float32:  # the layout changed: the same bytes
            assert _bytes(a) == _bytes(b)
        else:  # the two paths save different tensors, each rounded to half
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_direct_function_sides_effects_as_torch():
    """A call that fails inside the autograd Function (an inference tensor cannot be saved)
    moves no buffer; eval saves the running buffers, so changing them in place before the
    backward raises, as torch does."""
    with torch.inference_mode():
        x = make_input((4, 3, 5, 5))
    for fn in (BF.batch_norm, torch.nn.functional.batch_norm):
        rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(0)
        extra = {"num_batches_tracked": nbt} if fn is BF.batch_norm else {}
        with pytest.raises(RuntimeError, match="[Ii]nference"):
            fn(x, rm, rv, torch.ones(3, requires_grad=True), None, True, **extra)
        assert rm.tolist() == [0.0] * 3 and rv.tolist() == [1.0] * 3 and int(nbt) == 0
    x = make_input((4, 3, 5, 5)).requires_grad_(True)
    for fn in (BF.batch_norm, torch.nn.functional.batch_norm):
        rm, rv = torch.zeros(3), torch.ones(3)
        y = fn(x, rm, rv, None, None, False)
        rm.add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


def test_export_fails_with_torchs_message_not_a_recursion():
    """Non-strict torch.export traces with fake tensors, which our kernels cannot read: it
    fails with torch's error, not by batch_norm handing itself to itself."""
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), nb_module(4)).eval()
    with pytest.raises(Exception) as info:
        torch.export.export(m, (torch.randn(2, 3, 8, 8),), strict=False)
    assert not isinstance(info.value, RecursionError)


def nb_module(C):
    import batchnorm

    return batchnorm.BatchNorm2d(C)


def test_direct_function_rejects_saved_tensors_of_another_shape():
    """A saved-tensor hook that hands back a smaller tensor: a clear error, not a read or
    write past its end."""
    x = make_input((6, 4, 5, 5)).requires_grad_(True)

    def unpack(t):
        return t[:1].clone() if t.dim() == 4 else t

    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, unpack):
        y = BF.batch_norm(x, None, None, training=True, backend="numba")
    with pytest.raises(RuntimeError, match=r"came back with shape \(1, 4, 5, 5\)"):
        y.sum().backward()


def test_tensors_without_storage_of_their_own_are_not_read_by_address():
    """Wrapper subclasses (``__torch_dispatch__``, here torch's TwoTensor) have address 0:
    the direct paths decline them as input, parameter or buffer, and a gradient of that kind
    goes through the recomputation, with torch's numbers."""
    from torch.testing._internal.two_tensor import TwoTensor

    x = make_input((4, 3, 5, 5))
    rm, rv, w = torch.zeros(3), torch.ones(3), torch.rand(3) + 0.5
    two = lambda t: TwoTensor(t.clone(), t.clone())  # noqa: E731
    assert nb.eval_direct(two(x), rm, rv, w, None, 1e-5, False) is None
    assert nb.eval_direct(x, rm, two(rv), w, None, 1e-5, False) is None
    assert nb.train_direct(x, two(w), None, 1e-5, False, None, None, 0.1, None) is None
    assert nb.train_direct(x, w, None, 1e-5, False, two(rm), rv, 0.1, None) is None
    dy = make_input((4, 3, 5, 5), seed=3)
    xg = x.clone().requires_grad_(True)
    ours = torch.autograd.grad(BF.batch_norm(xg, None, None, w, None, True), xg, two(dy))[0]
    want = torch.autograd.grad(torch.nn.functional.batch_norm(xg, None, None, w, None, True),
                               xg, dy)[0]  # fmt: skip
    assert type(ours) is TwoTensor
    assert_close(ours.a, want, torch.float32)
    assert_close(ours.b, want, torch.float32)


@pytest.mark.parametrize("buffer", ["running_mean", "running_var"])
@pytest.mark.parametrize("path", ["direct", "general", "bfloat16"])
def test_eval_with_a_graph_notices_changed_running_buffers(path, buffer, monkeypatch):
    """As torch: eval saves the running buffers it normalised with, so changing one in place
    before the backward raises, on every path (bfloat16 input: the general path with float32
    buffers)."""
    if path == "general":
        _general_path(monkeypatch)
    dtype = torch.bfloat16 if path == "bfloat16" else torch.float32
    x = make_input((4, 3, 5, 5), dtype=dtype).requires_grad_(True)
    bufs = {"running_mean": torch.zeros(3), "running_var": torch.ones(3)}
    y = BF.batch_norm(x, bufs["running_mean"], bufs["running_var"], None, None, False,
                      backend="numba")  # fmt: skip
    bufs[buffer].add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.float().sum().backward()


# batch_norm's express lane (``numba_cpu.lane``) runs before validation, so it must take only
# calls that validation accepts, and give what the general path gives. Each draw builds one
# call, some arguments wrong or unusual; the lane either declines (None) having touched
# nothing, or returns the general path's bytes with the general path's side effects.
_LANE_SHAPES = [
    (5, 3),
    (4, 3, 6),
    (2, 3, 4, 5),
    (2, 3, 2, 3, 4),
    (2, 1, 3, 3),
    (1, 3, 1, 1),
    (1, 3),
    (0, 3, 2, 2),
    (3,),
]  # fmt: skip (the last three: odd ones)


def _lane_call(c):
    """(args, kwargs) of one batch_norm call built from the choices ``c``, fresh tensors."""
    g = torch.Generator().manual_seed(c["seed"])
    shape, dtype = c["shape"], c["dtype"]
    C = shape[1] if len(shape) > 1 else shape[0]
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) * 2 + 1
    if c["layout"] == "cl" and x.dim() in (4, 5):
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4
                         else torch.channels_last_3d)  # fmt: skip
    elif c["layout"] == "strided":
        x = torch.cat([x, x], dim=-1)[..., ::2]
    elif c["layout"] == "neg":
        x = torch._neg_view(-x)
    elif c["layout"] == "sparse":
        x = x.to_sparse()
    if c["x_grad"]:
        x.requires_grad_(True)
    pd = dtype if dtype in NATIVE else torch.float32

    def vec(kind, value):
        t = torch.full((C,), value, dtype=pd) + torch.rand(C, generator=g, dtype=pd)
        if kind == "shape":
            return torch.ones(C + 1, dtype=pd)
        if kind == "dtype":
            return t.to(torch.float64 if pd == torch.float32 else torch.float32)
        if kind == "strided":
            return torch.stack([t, t], 1)[:, 0]
        if kind == "grad":
            return t.requires_grad_(True)
        if kind == "neg":
            return torch._neg_view(-t)
        if kind == "sparse":
            return t.to_sparse()
        if kind == "parameter":
            return torch.nn.Parameter(t)
        if kind == "parameter_nograd":
            return torch.nn.Parameter(t, requires_grad=False)
        return t

    rm = rv = None
    if c["buffers"] != "none":
        rm, rv = vec(c["buffers"], -0.5), vec(c["buffers"], 0.5)
        if c["buffers"] == "one":
            rv = None
    w = b = None
    if c["affine"] != "none":
        w, b = vec(c["affine"], 0.5), vec(c["affine"], 0.0)
    nbt = {"none": None, "ok": torch.tensor(3), "two": torch.tensor([1, 2])}[c["nbt"]]
    args = (x, rm, rv, w, b, c["training"], c["momentum"], c["eps"])
    kwargs = {"num_batches_tracked": nbt, "activation": c["activation"], "backend": c["backend"]}
    return args, kwargs


def _lane_state(args, kwargs):
    """What a call may change, and what it must not: bytes and versions of the buffers and
    num_batches_tracked, and of x, weight and bias."""
    out = []
    for t in (args[1], args[2], kwargs["num_batches_tracked"], args[0], args[3], args[4]):
        if t is None or t.layout != torch.strided:
            out.append(None)
        else:
            flat = t.detach().reshape(-1).clone(memory_format=torch.contiguous_format)
            out.append((_bytes(flat), t._version))
    return out


_LANE_OK = {"dtype": torch.float32, "layout": "contiguous", "x_grad": False, "buffers": "ok",
            "affine": "ok", "nbt": "ok", "training": True, "momentum": 0.1, "eps": 1e-5,
            "activation": None, "backend": "auto", "grad_mode": True, "seed": 0}  # fmt: skip


def _check_lane(c):
    args, kwargs = _lane_call(c)
    fresh = _lane_state(args, kwargs)
    with torch.set_grad_enabled(c["grad_mode"]):
        y = nb.lane(*args, kwargs["num_batches_tracked"], kwargs["activation"])
    if y is None:
        assert _lane_state(args, kwargs) == fresh  # declined: nothing touched
        return None
    lane_state = _lane_state(args, kwargs)
    args, kwargs = _lane_call(c)
    with pytest.MonkeyPatch.context() as m, torch.set_grad_enabled(c["grad_mode"]):
        _general_path(m)
        want = BF.batch_norm(*args, **kwargs)  # must not raise
    assert not y.requires_grad and want.grad_fn is None
    assert y.shape == want.shape and y.stride() == want.stride() and y.dtype == want.dtype
    assert _bytes(y) == _bytes(want)
    assert lane_state == _lane_state(args, kwargs)
    return y


# (usual, unusual) values of each choice
_LANE_CHOICES = {
    "shape": (_LANE_SHAPES[:-3], _LANE_SHAPES[-3:]),
    "dtype": ([torch.float32, torch.float64], [torch.bfloat16, torch.float16]),
    "layout": (["contiguous", "cl"], ["strided", "neg", "sparse"]),
    "x_grad": ([False], [True]),
    "buffers": (
        ["ok", "parameter_nograd", "none"],
        ["one", "shape", "dtype", "strided", "grad", "neg"],
    ),  # fmt: skip
    "affine": (
        ["ok", "none", "parameter", "parameter_nograd"],
        ["shape", "dtype", "strided", "grad", "neg", "sparse"],
    ),  # fmt: skip
    "nbt": (["none", "ok"], ["two"]),
    "training": ([True, False], []),
    "momentum": ([0.1, None, 1, 0], [True, "0.1"]),
    "eps": ([1e-5, 0.0], [-1.0, 1, float("nan")]),
    "activation": ([None, "relu"], ["gelu"]),
    "backend": (["auto", "numba"], []),
    "grad_mode": ([True, False], []),
}


@pytest.mark.parametrize("layout", ["contiguous", "cl"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_lane_on_each_unusual_argument(training, layout):
    """One argument at a time off a call the lane takes: it declines, or agrees with the
    general path (``_check_lane``)."""
    base = {**_LANE_OK, "shape": (2, 3, 4, 5), "training": training, "layout": layout}
    assert _check_lane(base) is not None
    for name, (usual, unusual) in _LANE_CHOICES.items():
        for value in [*usual, *unusual]:
            _check_lane({**base, name: value})
            if name != "x_grad":
                _check_lane({**base, name: value, "grad_mode": False})


def test_lane_takes_the_common_calls():
    """The lane is not a no-op: every common call without a graph goes through it."""
    for shape in [(5, 3), (4, 3, 6), (2, 3, 4, 5), (2, 3, 2, 3, 4), (1, 3, 1, 1), (2, 1, 3, 3)]:
        for layout in ("contiguous", "cl"):
            for overrides in ({}, {"training": False}, {"dtype": torch.float64},
                              {"affine": "none", "buffers": "none", "nbt": "none"},
                              {"activation": "relu"}, {"momentum": None}, {"momentum": 1},
                              {"affine": "parameter", "grad_mode": False},
                              {"affine": "parameter_nograd"}, {"backend": "numba"},
                              {"x_grad": True, "grad_mode": False}):  # fmt: skip
                c = {**_LANE_OK, "shape": shape, "layout": layout, **overrides}
                if shape == (1, 3, 1, 1):  # one value per channel: training raises
                    if c["buffers"] == "none":
                        continue  # (and eval needs the buffers)
                    c["training"] = False
                assert _check_lane(c) is not None, c


def _mostly(usual, unusual):
    """Values from ``usual`` about 9 times in 10 (so that whole calls the lane takes come up
    often), else from ``unusual``."""
    return st.sampled_from(list(usual) * (9 * len(unusual)) + list(unusual) * len(usual))


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    shape=_mostly(_LANE_SHAPES[:-3], _LANE_SHAPES[-3:]),
    dtype=_mostly(_LANE_CHOICES["dtype"][0], _LANE_CHOICES["dtype"][1]),
    layout=_mostly(_LANE_CHOICES["layout"][0], _LANE_CHOICES["layout"][1]),
    x_grad=st.booleans(),
    buffers=_mostly(_LANE_CHOICES["buffers"][0], _LANE_CHOICES["buffers"][1]),
    affine=_mostly(_LANE_CHOICES["affine"][0], _LANE_CHOICES["affine"][1]),
    nbt=_mostly(_LANE_CHOICES["nbt"][0], _LANE_CHOICES["nbt"][1]),
    training=st.booleans(),
    momentum=_mostly(_LANE_CHOICES["momentum"][0], _LANE_CHOICES["momentum"][1]),
    eps=_mostly(_LANE_CHOICES["eps"][0], _LANE_CHOICES["eps"][1]),
    activation=_mostly([None, "relu"], ["gelu"]),
    backend=st.sampled_from(["auto", "numba"]),
    grad_mode=st.booleans(),
    seed=st.integers(0, 3),
)
def test_lane_accepts_only_what_validation_accepts_and_gives_the_general_paths_bytes(**c):
    _check_lane(c)


@pytest.mark.parametrize(
    "shape, channels_last",
    [((9, 32, 128, 128), False),  # channels over L2_BUDGET: the per-channel path
     ((9, 48, 97, 101), False),  # channel blocks; runs of 9797 values: heads and tails
     ((80, 1024, 7, 7), False),  # short runs: the tiled kernels, a sample's block at a time
     ((9, 32, 128, 128), True),
     ((9, 37, 101, 103), True)],  # tiles of 55 rows of 37: heads and tails
    ids=["nchw-channel", "nchw-block", "nchw-short", "cl", "cl-odd"],
)  # fmt: skip
def test_streaming_stores_give_the_cached_paths_bytes(shape, channels_last):
    """Outputs over ``STREAM_BYTES`` (NCHW eval: ``EVAL_STREAM_BYTES``) are written with
    non-temporal stores (x86 ``movnt``, 64-byte aligned, fenced per work item). Every output
    element is a fixed function of its inputs and of per-channel coefficients, so the first
    rows, recomputed as a small tensor (cached stores) from the big call's statistics, must
    give the big call's bytes: eval, forward-train's normalisation (residual and relu), and
    backward's dx (relu mask)."""
    from batchnorm.backends import _numba_kernels as K

    assert np.prod(shape) * 4 > (K.STREAM_BYTES if channels_last else K.EVAL_STREAM_BYTES)
    x, dy = _inputs(shape, channels_last, torch.float32)
    res = make_input(shape, channels_last=channels_last, seed=9, offset=0.0)
    w, b = _params(shape[1], torch.float32)
    x3, layout = canonical(x)
    dy3, res3 = like_canonical(dy, layout), like_canonical(res, layout)
    rows = x3.shape[0] // shape[0]  # one sample: NCHW (1, C, HW), channels-last (HW, C, 1)
    small = [t[:rows].clone() for t in (x3, dy3, res3)]
    assert small[0].numel() * 4 < K.STREAM_BYTES

    y3, mean, var, invstd = nb.forward_train(x3, w, b, EPS, res3, True)
    y_small = nb.normalize(small[0], mean, invstd, w, b, small[2], True)
    assert _bytes(y3[:rows]) == _bytes(y_small)

    invstd_rv = 1.0 / torch.sqrt(var + 0.5 + EPS)  # eval with other statistics
    y_eval = nb.normalize(x3, mean, invstd_rv, w, b)
    assert _bytes(y_eval[:rows]) == _bytes(nb.normalize(small[0], mean, invstd_rv, w, b))

    dx3, sum_dy, sum_dy_xhat = nb.backward(dy3, x3, mean, invstd, w, True, True, y3)
    count = x3.shape[0] * x3.shape[2]
    dx_small = nb.grad_input(small[1], small[0], mean, invstd, w, sum_dy, sum_dy_xhat, count,
                             True, y_small)  # fmt: skip
    assert _bytes(dx3[:rows]) == _bytes(dx_small)
    # and the big call is right: against the float64 reference
    y_ref, cache = reference.forward(to_numpy(x), _np(w), _np(b), EPS)
    y_ref = y_ref + to_numpy(res)
    assert_close(layout.from_canonical(y3), torch.from_numpy(np.maximum(y_ref, 0)), torch.float32)


# C: bands of four 64-byte vectors, single vectors after them, scalar channels, or a mix
@pytest.mark.parametrize("C", [1, 3, 16, 37, 64, 100, 130, 300])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind", ["grad", "centred"])
def test_rows4_intrinsics_are_the_numba_loops_bit_for_bit(C, dtype, kind):
    """``grad_sums_rows4`` and ``centred_sums_rows4`` (channels-last sums, four rows per step,
    in IR with bands of channels outermost) give the bytes of ``_add_grad_4`` and
    ``_add_centred_4`` called step after step."""
    from numba import njit

    from batchnorm.backends._numba_kernels import (
        _add_centred_4,
        _add_grad_4,
        _four,
        centred_sums_rows4,
        grad_sums_rows4,
    )

    @njit
    def plain(dy, x, m, s_dy, s_dx, lo, nsteps, C):
        for t in range(nsteps):
            r = lo + 4 * t * C
            xa, xb, xc, xd = _four(x, r, C, C)
            ga, gb, gc, gd = _four(dy, r, C, C)
            _add_grad_4(ga, gb, gc, gd, xa, xb, xc, xd, m, s_dy, s_dx)

    @njit
    def plain_centred(x, m, s1, s2, lo, nsteps, C):
        for t in range(nsteps):
            xa, xb, xc, xd = _four(x, lo + 4 * t * C, C, C)
            _add_centred_4(xa, xb, xc, xd, m, s1, s2)

    rng = np.random.default_rng(C)
    rows, lo = 4 * 9 + 3, 5
    dy, x = ((rng.standard_normal(rows * C + lo) * 3 + 1).astype(dtype) for _ in range(2))
    m = rng.standard_normal(C).astype(dtype)
    start = rng.standard_normal((2, C)).astype(dtype)
    if kind == "grad":
        run = njit(lambda *a: grad_sums_rows4(*a))
    else:
        run = njit(lambda dy, x, m, s1, s2, lo, n, C: centred_sums_rows4(x, m, s1, s2, lo, n, C))
        plain = njit(lambda dy, x, m, s1, s2, lo, n, C: plain_centred(x, m, s1, s2, lo, n, C))
    for nsteps in (0, 1, 9):
        want, got = start.copy(), start.copy()
        plain(dy, x, m, want[0], want[1], lo, nsteps, C)
        run(dy, x, m, got[0], got[1], lo, nsteps, C)
        assert got.tobytes() == want.tobytes()
        assert nsteps == 0 or not np.array_equal(got, start)


@pytest.mark.parametrize("general", [False, True], ids=["direct", "general"])
@pytest.mark.parametrize(
    "shape, channels_last",
    [
        ((2, 3, 4, 4), False),
        ((2, 3, 4, 4), True),
        ((5, 4, 7, 7), False),
        ((3, 5, 300), False),
        ((9, 16, 128, 128), False),
        ((9, 16, 128, 128), True),
    ],  # fmt: skip (last two: streamed)
)
def test_eval_backward_with_relu_keeps_x_out_of_dx(shape, channels_last, general, monkeypatch):
    """In eval, dx = dy * w * invstd through the relu's mask: an inf in x must not make dx NaN
    (x * 0 would), and NaN or -inf outputs pass no gradient, as torch's relu backward."""
    C = shape[1]
    x = make_input(shape, channels_last=channels_last)
    flat = x.view(-1) if not channels_last else x.permute(0, 2, 3, 1).reshape(-1)
    flat[0], flat[1], flat[2] = float("inf"), float("nan"), float("-inf")
    w, b = _params(C, torch.float32)
    rm, rv = torch.randn(C), torch.rand(C) + 0.5
    dy = make_input(shape, channels_last=channels_last, seed=3)
    if general:
        _general_path(monkeypatch)
    xg = x.clone().requires_grad_(True)
    y = BF.batch_norm(xg, rm, rv, w, b, False, activation="relu", backend="numba")
    (dx,) = torch.autograd.grad(y, xg, dy)
    xt = x.clone().requires_grad_(True)
    yt = torch.relu(torch.nn.functional.batch_norm(xt, rm, rv, w, b, False))
    (want,) = torch.autograd.grad(yt, xt, dy)
    assert torch.isfinite(dx).all()
    assert_close(dx, want, torch.float32)


def test_lane_is_only_for_the_numba_backend(monkeypatch):
    """``backend="torch"`` calls never reach the numba lane; "auto" and "numba" on the CPU do."""
    calls = _spy(monkeypatch, "lane")
    x = make_input((4, 3, 5, 5))
    rm, rv = torch.zeros(3), torch.ones(3)
    with torch.no_grad():
        for training in (True, False):
            BF.batch_norm(x, rm, rv, training=training, backend="torch")
        assert calls == []
        BF.batch_norm(x, rm, rv, training=False, backend="numba")
        BF.batch_norm(x, rm, rv, training=False)
    assert calls == ["lane", "lane"]


def test_streaming_intrinsics_emit_non_temporal_stores():
    """With ``nt`` the IR loops store through ``!nontemporal`` (``movnt`` on x86), and
    ``streaming`` switches them on over STREAM_BYTES. (What the kernels pass is covered by
    the byte tests above; the stores' kind has no visible effect but speed.)"""
    import platform

    from numba import njit

    from batchnorm.backends import _numba_kernels as K

    def f(x, y, t, nt):
        K.affine_run(x, y, x[:0], 0, x.size, x[0], x[1], False, nt)
        K.affine_tile(x, y, x[:0], 0, t.size, t, t, False, nt)
        K.grad_x_run(x, x, x[:0], y, 0, x.size, x[0], x[1], x[2], True, nt)
        K.grad_x_tile(x, x, x[:0], y, 0, t.size, t, t, t, True, nt)
        K.store_fence()

    fn = njit(f)
    x = np.ones(100, np.float32)
    fn(x, np.empty_like(x), x[:50], True)
    llvm = "".join(fn.inspect_llvm().values())
    assert llvm.count("!nontemporal") >= 4
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert "movnt" in "".join(fn.inspect_asm().values())
    checks = (
        (njit(lambda a: K.streaming(a)), K.STREAM_BYTES),
        (njit(lambda a: K.streaming_eval(a)), K.EVAL_STREAM_BYTES),
    )
    for streaming, limit in checks:
        big = limit // 4 + 1
        assert streaming(np.empty(big, np.float32))
        assert not streaming(np.empty(big - 1, np.float32))


def test_prefetch_asks_for_each_line_and_changes_nothing():
    """``prefetch`` emits ``llvm.prefetch`` (``prefetcht0`` on x86) once per 64-byte line of
    the range, reads nothing a program could see, and a range past the array's end (the last
    sample's "next" runs are never asked for, but the intrinsic does not check) does not
    fault."""
    import platform

    from numba import errors, njit

    from batchnorm.backends import _numba_kernels as K

    fn = njit(lambda x, lo, n: K.prefetch(x, lo, n))
    x = np.arange(1000, dtype=np.float32)
    before = x.copy()
    fn(x, 0, x.size)
    fn(x, 990, 5000)  # 20 KB past the end
    fn(x, 5, 0)
    fn(x, 0, -5)  # nothing
    assert x.tobytes() == before.tobytes()
    assert "llvm.prefetch" in "".join(fn.inspect_llvm().values())
    with pytest.raises(errors.TypingError):  # strides would be ignored: refused
        fn(np.arange(2000.0, dtype=np.float32)[::2], 0, 10)
    # the NCHW first passes use it (runs of SMALL_B to PREFETCH_MAX_B values)
    shape = (3, 4, 20, 20)
    assert K.SMALL_B <= 400 < K.PREFETCH_MAX_B
    x3 = make_input(shape).reshape(3, 4, 400)
    nb.forward_train(x3, None, None, EPS)
    dy3 = make_input(shape, seed=1).reshape(3, 4, 400)
    mean, invstd = x3.mean(dim=(0, 2)), torch.ones(4)
    nb.backward(dy3, x3, mean, invstd, None, True, True)
    if platform.machine().lower() in ("x86_64", "amd64"):
        assert "prefetcht0" in "".join(fn.inspect_asm().values())
        for kernel in (K.nchw_fwd_ser, K.nchw_bwd_ser):
            # compiled afresh: a kernel loaded from numba's disk cache has no assembly to show
            sig = kernel.signatures[0]
            fresh = numba.njit(kernel.py_func)
            fresh.compile(sig)
            assert "prefetcht0" in fresh.inspect_asm(sig)


_NON_FINITE_SHAPES = [
    ((8, 3), False), ((4, 3, 5, 4), False), ((4, 3, 5, 4), True), ((70, 3, 7, 7), False),
    ((64, 3, 30, 30), False), ((64, 3, 30, 30), True), ((2, 3, 300, 300), False),
    ((2, 3, 4, 5, 6), True),
]  # fmt: skip


@pytest.mark.parametrize(
    "value, where",
    [("nan", "first"), ("nan", "last"), ("inf", "first"), ("inf", "last"), ("-inf", "first"),
     ("-inf", "last"), ("inf and -inf", "first and last")],
)  # fmt: skip
@pytest.mark.parametrize("shape, channels_last", _NON_FINITE_SHAPES, ids=str)
@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_a_non_finite_value_makes_its_channel_nan_as_in_torch(shape, channels_last, value,
                                                              where, backend):  # fmt: skip
    """A NaN or an inf in a training channel: its output and running_var are NaN, as torch's
    (a NaN variance was once clamped to 0: running_var stayed finite, and a channels-last inf
    gave -inf outputs), and its running_mean is torch's: the infinity for one infinity (the
    shifted sums alone gave NaN), NaN for a NaN or both infinities. The shapes take every
    statistics path (rows, tiled short runs, blocks, one channel over L2). The other channels
    are untouched."""
    x = make_input(shape, channels_last=channels_last)
    first, last = [0] * len(shape), [s - 1 for s in shape]
    first[1] = last[1] = 1
    if where == "first and last":
        x[tuple(first)], x[tuple(last)] = float("inf"), float("-inf")
    else:
        x[tuple(first if where == "first" else last)] = float(value)
    ref, ours = module_pair(shape[1], len(shape), backend=backend)
    y_ref, y = ref(x), ours(x)
    assert y[:, 1].isnan().all() and y_ref[:, 1].isnan().all()
    assert ours.running_var[1].isnan() and ref.running_var[1].isnan()
    got, expected = ours.running_mean[1].item(), ref.running_mean[1].item()
    if value in ("nan", "inf and -inf"):
        assert got != got and expected != expected, (got, expected)
    else:
        assert got == expected == float(value), (got, expected)
    for c in (0, 2):
        assert_close(y[:, c], y_ref[:, c], torch.float32, "other channels")
        assert_close(ours.running_var[c], ref.running_var[c], torch.float32, "running_var")
        assert_close(ours.running_mean[c], ref.running_mean[c], torch.float32, "running_mean")


@pytest.mark.parametrize("shape", [(4, 3, 5, 4), (70, 3, 7, 7), (64, 3, 30, 30), (2, 3, 300, 300)],
                         ids=str)  # fmt: skip
def test_a_channel_whose_float32_sums_overflow_gets_float64_statistics(shape):
    """A constant channel of 1e37 (float32): the kernels' float32 partial sums overflow and
    their mean comes out NaN, so the channel's statistics are taken again in float64: torch's
    running buffers (NCHW: mean 1e36 after one step, var 0.9), on every NCHW statistics path
    (short-run tiles, blocks, one channel over L2). The outputs are not compared: float32
    cannot hold x * scale here (torch gives -inf, its channels-last path NaN)."""
    x = make_input(shape)
    x[:, 1] = 1e37
    ref, ours = module_pair(shape[1], len(shape), backend="numba")
    ref(x), ours(x)
    assert ref.running_mean[1].isfinite() and ref.running_var[1].item() == pytest.approx(0.9)
    assert_close(ours.running_mean, ref.running_mean, torch.float32, "running_mean")
    assert_close(ours.running_var, ref.running_var, torch.float32, "running_var")
