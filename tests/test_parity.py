"""Our BatchNorm1d/2d/3d against torch's: outputs, every gradient, buffers, over steps and eval."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import batchnorm
from conftest import (
    BACKENDS,
    assert_close,
    grad_input_scale,
    make_input,
    module_pair,
    param_dtype,
)

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

SHAPES = [
    (2, 3),  # BatchNorm1d (N, C)
    (7, 5),
    (3, 4, 6),  # BatchNorm1d (N, C, L)
    (1, 3, 7),  # N = 1, L > 1
    (4, 3, 5, 5),
    (1, 2, 3, 3),  # the seed notebook's shape
    (2, 1, 7, 3),  # C = 1
    (5, 7, 11, 13),  # primes
    (2, 3, 2, 3, 4),  # BatchNorm3d
    (1, 2, 3, 1, 5),
]


def run_and_compare(ref, ours, shape, dtype, channels_last=False, steps=3, seed=0):
    """Train ``steps`` batches, then one eval pass, comparing everything at each step."""
    count = math.prod(shape) // shape[1]  # values per channel
    for step in range(steps):
        x = make_input(shape, dtype, channels_last, seed=seed + step)
        xr = x.clone().requires_grad_()
        xo = x.clone().requires_grad_()
        yr, yo = ref(xr), ours(xo)
        assert yo.dtype == yr.dtype and yo.shape == yr.shape
        if channels_last and x.dim() in (4, 5):
            fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
            assert yo.is_contiguous(memory_format=fmt), "output lost channels_last"
        assert_close(yo, yr, dtype, f"output step {step}")
        g = make_input(shape, dtype, seed=100 + step, offset=0.0, scale=1.0)
        yr.backward(g)
        yo.backward(g)
        scale = grad_input_scale(x, g, ours.weight, ours.eps)
        assert_close(xo.grad, xr.grad, dtype, f"grad_input step {step}", scale=scale)
        for name in ("weight", "bias"):
            pr, po = getattr(ref, name), getattr(ours, name)
            assert (pr is None) == (po is None)
            if pr is not None:
                # torch rounds half-input weight/bias gradients through the input dtype on
                # some paths (channels_last); ours stay float32 (test_half_against_reference)
                assert_close(po.grad, pr.grad, dtype, f"grad_{name} step {step}", count)
                pr.grad = po.grad = None
        for name in ("running_mean", "running_var"):
            br, bo = getattr(ref, name), getattr(ours, name)
            assert (br is None) == (bo is None)
            if br is not None:
                assert_close(bo, br, param_dtype(dtype), f"{name} step {step}")
        if ref.num_batches_tracked is not None:
            assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item()
            assert ours.num_batches_tracked.dtype == torch.int64
    ref.eval()
    ours.eval()
    x = make_input(shape, dtype, channels_last, seed=seed + 50)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yo = ref(xr), ours(xo)
    assert_close(yo, yr, dtype, "eval output")
    g = make_input(shape, dtype, seed=200, offset=0.0, scale=1.0)
    yr.backward(g)
    yo.backward(g)
    assert_close(xo.grad, xr.grad, dtype, "eval grad_input")
    if ref.weight is not None:
        assert_close(ours.weight.grad, ref.weight.grad, dtype, "eval grad_weight", count)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_parity_contiguous(shape, dtype, backend):
    ref, ours = module_pair(shape[1], len(shape), dtype, backend)
    run_and_compare(ref, ours, shape, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [s for s in SHAPES if len(s) >= 4], ids=str)
def test_parity_channels_last(shape, dtype, backend):
    ref, ours = module_pair(shape[1], len(shape), dtype, backend)
    run_and_compare(ref, ours, shape, dtype, channels_last=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("momentum", (0.1, 1.0, None, 0.37))
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"affine": False},
        {"bias": False},
        {"track_running_stats": False},
        {"affine": False, "track_running_stats": False},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default",
)
@pytest.mark.parametrize("shape", [(6, 4), (3, 5, 4, 4)], ids=str)
def test_parity_options(shape, options, momentum, dtype, backend):
    ref, ours = module_pair(shape[1], len(shape), dtype, backend, momentum=momentum, **options)
    run_and_compare(ref, ours, shape, dtype)


def _formats(t):
    """Which memory formats t is contiguous in (empty tensors can be in several)."""
    fmts = {4: [torch.channels_last], 5: [torch.channels_last_3d]}.get(t.dim(), [])
    return [t.is_contiguous(memory_format=f) for f in (torch.contiguous_format, *fmts)]


@pytest.mark.parametrize("backend", [*BACKENDS, "auto"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "shape, channels_last",
    [((0, 3), False), ((0, 3, 4, 4), False), ((0, 3, 4, 4), True), ((2, 3, 0, 4), True),
     ((0, 2, 2, 2, 2), False), ((0, 2, 2, 2, 2), True), ((0, 3, 5), False)],
    ids=str,
)  # fmt: skip
def test_empty_batch(shape, channels_last, training, dtype, backend):
    """No values per channel: an empty output in the input's memory format (an empty
    channels-last tensor is contiguous too, and came back NCHW), statistics untouched,
    num_batches_tracked bumped in training as torch's, zero weight and bias gradients."""
    ref, ours = module_pair(shape[1], len(shape), dtype, backend)
    with torch.no_grad():
        for m in (ref, ours):
            m.running_mean.fill_(0.25)
            m.running_var.fill_(2.0)
            m.train(training)
    x = make_input(shape, dtype, channels_last=channels_last).requires_grad_()
    yr, yo = ref(x), ours(x)
    assert yo.shape == yr.shape == x.shape and yo.dtype == yr.dtype
    assert _formats(yo) == _formats(x)
    if x.dim() == 4:  # (torch's 5-D output loses channels_last_3d when a spatial size is 0)
        assert _formats(yo) == _formats(yr)
    assert torch.equal(ours.running_mean, ref.running_mean)
    assert torch.equal(ours.running_var, ref.running_var)
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == int(training)
    yo.sum().backward()
    assert x.grad.shape == x.shape and _formats(x.grad) == _formats(x)
    assert torch.equal(ours.weight.grad, torch.zeros_like(ours.weight))
    assert torch.equal(ours.bias.grad, torch.zeros_like(ours.bias))


@pytest.mark.parametrize("backend", [*BACKENDS, "auto"])
def test_empty_channels_last_edge_cases(backend):
    """An empty channels-last view (strides not those torch.empty would give) keeps its
    format, as torch's output does; zero channels in channels-last with a residual work."""
    base = make_input((2, 3, 5, 4), channels_last=True)
    v = base[:, :, :0]
    ref, ours = module_pair(3, 4, backend=backend)
    assert _formats(ours(v)) == _formats(ref(v)) == [True, True]
    x0 = torch.randn(2, 0, 4, 4).contiguous(memory_format=torch.channels_last)
    m = batchnorm.BatchNorm2d(0, backend=backend)
    y = m(x0, torch.randn(2, 0, 4, 4))
    assert y.shape == x0.shape


@pytest.mark.parametrize("backend", [*BACKENDS, "auto"])
@pytest.mark.parametrize(
    "view",
    ["transpose", "spatial_slice", "channel_slice", "expand", "permute_nc"],
)
def test_non_contiguous_input(view, backend):
    """Views that are neither contiguous nor channels_last: torch's output, buffers and
    gradients (into the base tensor, through the view)."""
    views = {
        "transpose": ((4, 6, 5, 3), lambda b: b.transpose(2, 3)),
        "spatial_slice": ((4, 6, 7, 9), lambda b: b[:, :, 1::2, ::3]),
        "channel_slice": ((4, 13, 5, 5), lambda b: b[:, 1:13:2]),
        "expand": ((1, 6, 5, 5), lambda b: b.expand(3, 6, 5, 5)),
        "permute_nc": ((6, 4, 5, 5), lambda b: b.permute(1, 0, 2, 3)),
    }
    base_shape, make_view = views[view]
    base = make_input(base_shape)
    xr_base, xo_base = base.clone().requires_grad_(), base.clone().requires_grad_()
    xr, xo = make_view(xr_base), make_view(xo_base)
    assert not xo.is_contiguous() and not xo.is_contiguous(memory_format=torch.channels_last)
    ref, ours = module_pair(xo.shape[1], 4, backend=backend)
    yr, yo = ref(xr), ours(xo)
    assert_close(yo, yr, torch.float32, "output")
    assert_close(ours.running_mean, ref.running_mean, torch.float32, "running_mean")
    assert_close(ours.running_var, ref.running_var, torch.float32, "running_var")
    g = make_input(tuple(xo.shape), seed=5)
    yr.backward(g)
    yo.backward(g)
    n = xo.numel() // xo.shape[1]
    scale = grad_input_scale(xr.detach(), g, ref.weight)
    assert_close(xo_base.grad, xr_base.grad, torch.float32, "grad_input", n, scale)
    assert_close(ours.weight.grad, ref.weight.grad, torch.float32, "grad_weight", n)
    assert_close(ours.bias.grad, ref.bias.grad, torch.float32, "grad_bias", n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_layout_gradient(backend):
    """dy in another memory format than x (contiguous dy for a channels_last x)."""
    x = make_input((3, 4, 5, 6), channels_last=True)
    ref, ours = module_pair(4, 4, backend=backend)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    g = make_input((3, 4, 5, 6), seed=9).contiguous()
    ref(xr).backward(g)
    ours(xo).backward(g)
    assert_close(xo.grad, xr.grad, torch.float32, "grad_input")


def test_seed_notebook_puzzle():
    """The seed: 9 values per channel, momentum=1. Normalising by hand with running_var gives
    outputs 1/sqrt(9/8) of ours: training uses the biased variance, running_var the unbiased."""
    import batchnorm

    x = make_input((1, 2, 3, 3), seed=3)
    bn = batchnorm.BatchNorm2d(2, momentum=1)
    y = bn(x)
    biased = x.var(dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(bn.running_var, biased * 9 / 8)
    torch.testing.assert_close(y.var(dim=(0, 2, 3)), torch.full((2,), 9 / 8), rtol=1e-4, atol=0)
    by_hand = (x - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(
        bn.running_var.view(1, -1, 1, 1) + bn.eps
    )
    torch.testing.assert_close(y / by_hand, torch.full_like(y, (9 / 8) ** 0.5), rtol=1e-4, atol=0)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    dims=st.lists(st.integers(1, 6), min_size=0, max_size=3),
    n=st.integers(1, 5),
    c=st.integers(1, 6),
    momentum=st.one_of(st.none(), st.floats(0.01, 1.0)),
    channels_last=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    backend=st.sampled_from(BACKENDS),
)
def test_parity_hypothesis(dims, n, c, momentum, channels_last, dtype, backend):
    shape = (n, c, *dims)
    assume(math.prod(shape) // c >= 2)  # one value per channel cannot train (validation tests)
    ref, ours = module_pair(c, len(shape), dtype, backend, momentum=momentum)
    run_and_compare(ref, ours, shape, dtype, channels_last=channels_last, steps=2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", (False, True))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_half_against_reference(dtype, channels_last, backend):
    """Half inputs: statistics, buffers and weight/bias gradients at float32 accuracy, against
    the float64 reference run on the same (rounded) values."""
    import batchnorm
    from batchnorm import reference

    x = make_input((4, 3, 5, 7), dtype, channels_last)
    dy = make_input((4, 3, 5, 7), dtype, seed=5, offset=0.0, scale=1.0)
    bn = batchnorm.BatchNorm2d(3, backend=backend)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.5, -2.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    xo = x.clone().requires_grad_()
    y = bn(xo)
    y.backward(dy)
    xd, dyd = x.double().numpy(), dy.double().numpy()
    w, b = bn.weight.detach().double().numpy(), bn.bias.detach().double().numpy()
    y_ref, cache = reference.forward(xd, w, b, eps=bn.eps)
    dx_ref, dw_ref, db_ref = reference.backward(dyd, cache)
    rm, rv, _ = reference.update_running_stats(np.zeros(3), np.ones(3), 0, xd, momentum=0.1)
    f32 = torch.float32
    n = 4 * 5 * 7
    assert_close(bn.weight.grad, torch.from_numpy(dw_ref), f32, "grad_weight", n)
    assert_close(bn.bias.grad, torch.from_numpy(db_ref), f32, "grad_bias", n)
    assert_close(bn.running_mean, torch.from_numpy(rm), f32, "running_mean", n)
    assert_close(bn.running_var, torch.from_numpy(rv), f32, "running_var", n)
    assert_close(y, torch.from_numpy(y_ref), dtype, "output")
    assert_close(xo.grad, torch.from_numpy(dx_ref), dtype, "grad_input")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", (False, True))
@pytest.mark.parametrize("momentum", (0.1, None))
def test_parity_under_no_grad(momentum, channels_last, backend):
    """Inference skips the autograd.Function; same numbers and buffers."""
    ref, ours = module_pair(5, 4, backend=backend, momentum=momentum)
    with torch.no_grad():
        for step in range(3):
            x = make_input((3, 5, 4, 6), channels_last=channels_last, seed=step)
            assert_close(ours(x), ref(x), torch.float32, f"train output {step}")
            assert_close(ours.running_var, ref.running_var, torch.float32, "running_var")
            assert_close(ours.running_mean, ref.running_mean, torch.float32, "running_mean")
        assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == 3
        ref.eval()
        ours.eval()
        y = ours(x)
        assert_close(y, ref(x), torch.float32, "eval output")
        assert not y.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_with_zero_variance_and_eps(backend):
    """eps=0 is allowed in eval; a zero running_var then gives what torch gives (nan/inf)."""
    x = make_input((2, 3, 2, 2))
    rm, rv = torch.tensor([0.0, 0.5, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    import batchnorm.functional as BF

    theirs = torch.nn.functional.batch_norm(x, rm, rv, None, None, False, 0.1, 0.0)
    ours = BF.batch_norm(x, rm, rv, None, None, False, 0.1, 0.0, backend=backend)
    torch.testing.assert_close(ours, theirs, equal_nan=True)


@pytest.mark.parametrize("backend", [*BACKENDS, "auto"])
@pytest.mark.parametrize(
    "dtype, offset, std, rtol",
    [
        (torch.float64, 1e4, 1e-3, 1e-14),  # 1e7 standard deviations from zero
        (torch.float32, 1e4, 0.1, 1e-3),  # the case: 1e5 standard deviations
    ],
    ids=["float64", "float32"],
)
def test_data_far_from_zero_keeps_its_variance(backend, dtype, offset, std, rtol):
    """Every backend's statistics are two-pass (or shifted): running_var against float64's
    two-pass value of the same data. (The torch backend's var_mean was 1e-9 off in float64 at
    1e7 standard deviations, against torch's 1e-16; found by a fuzzing helper.)"""
    g = torch.Generator().manual_seed(3)
    x = (offset + std * torch.randn(8, 2, 5, generator=g, dtype=torch.float64)).to(dtype)
    ref, ours = module_pair(2, 3, dtype, backend, momentum=1.0)
    with torch.no_grad():
        ref(x), ours(x)
    xd = x.double()
    exact = (xd - xd.mean(dim=(0, 2), keepdim=True)).square().sum(dim=(0, 2)) / (8 * 5 - 1)
    torch.testing.assert_close(ours.running_var.double(), exact, rtol=rtol, atol=0)
    torch.testing.assert_close(ref.running_var.double(), exact, rtol=rtol, atol=0)  # torch too
