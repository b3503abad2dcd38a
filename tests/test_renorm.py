"""BatchRenorm1d/2d/3d against a float64 NumPy hand computation of Ioffe (2017), Algorithm 1,
with the paper's backward written out (r and d constants), and against BatchNorm for
r_max=1, d_max=0."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import batchnorm
from batchnorm.renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d

CLASSES = {2: BatchRenorm1d, 3: BatchRenorm1d, 4: BatchRenorm2d, 5: BatchRenorm3d}
OURS_BN = {2: batchnorm.BatchNorm1d, 3: batchnorm.BatchNorm1d, 4: batchnorm.BatchNorm2d}
OURS_BN[5] = batchnorm.BatchNorm3d
TORCH_BN = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}
TORCH_BN[5] = torch.nn.BatchNorm3d

SHAPES = [
    (6, 4),
    (1, 3, 5),  # N=1, spatial > 1
    (5, 1, 7),  # C=1
    (7, 5, 3),  # primes
    (2, 3, 3, 5),
    (1, 2, 3, 3),
    (3, 2, 2, 3, 5),
]


def renorm_hand(x, w, b, running_mean, running_var, eps, r_max, d_max, dy):
    """One training step of Algorithm 1 in float64 NumPy: (y, dx, dw, db, r, d, mean, var)."""
    axes = (0, *range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    n = x.size // x.shape[1]
    mean = x.mean(axis=axes)  # (C,)
    xmu = x - mean.reshape(shape)  # (N, C, *spatial)
    var = (xmu**2).mean(axis=axes)  # (C,) biased
    sigma_b = np.sqrt(var + eps)  # (C,)
    sigma = np.sqrt(running_var + eps)  # (C,)
    r = np.clip(sigma_b / sigma, 1 / r_max, r_max)  # (C,)
    d = np.clip((mean - running_mean) / sigma, -d_max, d_max)  # (C,)
    xhat = xmu / sigma_b.reshape(shape)
    yhat = xhat * r.reshape(shape) + d.reshape(shape)
    y = w.reshape(shape) * yhat + b.reshape(shape)
    # the paper's gradients, r and d held constant
    dyhat = dy * w.reshape(shape)
    dxhat = dyhat * r.reshape(shape)
    dsigma_b = (dxhat * xmu).sum(axis=axes) * (-1 / sigma_b**2)  # (C,)
    dmean = (dxhat * (-1 / sigma_b.reshape(shape))).sum(axis=axes)  # (C,)
    dx = (
        dxhat / sigma_b.reshape(shape)
        + dsigma_b.reshape(shape) * xmu / (n * sigma_b.reshape(shape))
        + dmean.reshape(shape) / n
    )
    dw = (dy * yhat).sum(axis=axes)
    db = dy.sum(axis=axes)
    return y, dx, dw, db, r, d, mean, var, n


def _data(shape, seed):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    # channels far from the initial buffers (mean 0, var 1), so r and d clip in some
    scale = torch.linspace(0.3, 4.0, C, dtype=torch.float64).view((1, -1) + (1,) * (len(shape) - 2))
    offset = torch.linspace(-2.0, 3.0, C, dtype=torch.float64).view(scale.shape)
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("momentum", [0.3, None])
def test_training_steps_match_hand_float64(shape, affine, momentum):
    C = shape[1]
    r_max, d_max, eps = 1.5, 0.5, 1e-3
    bn = CLASSES[len(shape)](C, r_max=r_max, d_max=d_max, eps=eps, momentum=momentum)
    bn = bn.double()
    g = torch.Generator().manual_seed(1)
    if affine:
        with torch.no_grad():  # non-trivial init: ones and zeros could hide a wrong gradient
            bn.weight.copy_(torch.rand(C, generator=g, dtype=torch.float64) + 0.5)
            bn.bias.copy_(torch.randn(C, generator=g, dtype=torch.float64))
    else:
        bn = CLASSES[len(shape)](C, r_max, d_max, eps, momentum, affine=False).double()
    rm, rv = np.zeros(C), np.ones(C)
    clipped_r = clipped_d = 0
    for step in range(3):
        x = _data(shape, seed=step).requires_grad_()
        dy = torch.randn(shape, generator=g, dtype=torch.float64)
        w = bn.weight.detach().numpy() if affine else np.ones(C)
        b = bn.bias.detach().numpy() if affine else np.zeros(C)
        y_ref, dx_ref, dw_ref, db_ref, r, d, mean, var, n = renorm_hand(
            x.detach().numpy(), w, b, rm, rv, eps, r_max, d_max, dy.numpy()
        )
        clipped_r += int(np.sum((r == r_max) | (r == 1 / r_max)))
        clipped_d += int(np.sum(np.abs(d) == d_max))
        if affine:
            bn.weight.grad = bn.bias.grad = None
        y = bn(x)
        y.backward(dy)
        np.testing.assert_allclose(y.detach().numpy(), y_ref, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(x.grad.numpy(), dx_ref, rtol=1e-9, atol=1e-11)
        if affine:
            np.testing.assert_allclose(bn.weight.grad.numpy(), dw_ref, rtol=1e-10, atol=1e-11)
            np.testing.assert_allclose(bn.bias.grad.numpy(), db_ref, rtol=1e-10, atol=1e-11)
        f = momentum if momentum is not None else 1 / (step + 1)
        rm = (1 - f) * rm + f * mean
        rv = (1 - f) * rv + f * var * n / (n - 1)  # torch's convention: unbiased
        np.testing.assert_allclose(bn.running_mean.numpy(), rm, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(bn.running_var.numpy(), rv, rtol=1e-12)
        assert int(bn.num_batches_tracked) == step + 1
    # the grid exercises the clipping, not only the interior
    assert clipped_r > 0 and clipped_d > 0


@pytest.mark.parametrize(
    "dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)]
)
@pytest.mark.parametrize("shape", [(7, 5, 3), (2, 3, 3, 5)])
def test_low_precision_against_hand(dtype, tol, shape):
    C = shape[1]
    bn = CLASSES[len(shape)](C, r_max=1.5, d_max=0.5)
    with torch.no_grad():
        bn.running_mean.copy_(torch.linspace(-1, 1, C))
        bn.running_var.copy_(torch.linspace(0.5, 3, C))
        bn.weight.copy_(torch.linspace(0.5, 1.5, C))
        bn.bias.copy_(torch.linspace(-0.5, 0.5, C))
    x64 = _data(shape, seed=3)
    x = x64.to(dtype).requires_grad_()
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y = bn(x)
    assert y.dtype == dtype and bn.running_var.dtype == torch.float32
    y.backward(dy.to(dtype))
    ref = renorm_hand(
        x.detach().double().numpy(),
        bn.weight.detach().double().numpy(),
        bn.bias.detach().double().numpy(),
        np.linspace(-1, 1, C),
        np.linspace(0.5, 3, C),
        1e-5,
        1.5,
        0.5,
        dy.to(dtype).double().numpy(),
    )
    scale = np.abs(ref[0]).max()
    np.testing.assert_allclose(y.detach().double().numpy(), ref[0], atol=tol * scale, rtol=tol)
    dscale = np.abs(ref[1]).max()
    np.testing.assert_allclose(x.grad.double().numpy(), ref[1], atol=tol * dscale, rtol=tol)
    np.testing.assert_allclose(bn.weight.grad.double().numpy(), ref[2], rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_r_max_1_d_max_0_is_batch_norm_exactly(shape, dtype):
    C = shape[1]
    renorm = CLASSES[len(shape)](C, r_max=1.0, d_max=0.0, momentum=0.2).to(dtype)
    ours = OURS_BN[len(shape)](C, momentum=0.2).to(dtype)
    theirs = TORCH_BN[len(shape)](C, momentum=0.2).to(dtype)
    g = torch.Generator().manual_seed(0)
    w = torch.rand(C, generator=g, dtype=dtype) + 0.5
    b = torch.randn(C, generator=g, dtype=dtype)
    for m in (renorm, ours, theirs):
        with torch.no_grad():
            m.weight.copy_(w)
            m.bias.copy_(b)
    for step in range(2):
        x = _data(shape, seed=10 + step).to(dtype)
        dy = torch.randn(shape, generator=g, dtype=dtype)
        outs = []
        for m in (renorm, ours, theirs):
            xi = x.clone().requires_grad_()
            m.weight.grad = m.bias.grad = None
            y = m(xi)
            y.backward(dy)
            outs.append((y.detach(), xi.grad, m.weight.grad, m.bias.grad))
        for a, b_ in zip(outs[0], outs[1]):  # same numbers as our BatchNorm, bit for bit
            assert torch.equal(a, b_)
        tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
        for a, b_ in zip(outs[0], outs[2]):  # and torch's to float tolerance
            torch.testing.assert_close(a, b_, **tol)
        assert torch.equal(renorm.running_mean, ours.running_mean)
        assert torch.equal(renorm.running_var, ours.running_var)
        torch.testing.assert_close(renorm.running_var, theirs.running_var, **tol)
        assert torch.equal(renorm.num_batches_tracked, theirs.num_batches_tracked)
    renorm.eval(), ours.eval(), theirs.eval()
    x = _data(shape, seed=20).to(dtype)
    assert torch.equal(renorm(x), ours(x))
    torch.testing.assert_close(renorm(x), theirs(x), **tol)


def test_eval_is_batch_norm_eval_with_default_limits():
    renorm, ours = BatchRenorm2d(3).double(), batchnorm.BatchNorm2d(3).double()
    with torch.no_grad():
        for m in (renorm, ours):
            m.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
            m.running_var.copy_(torch.tensor([0.2, 3.0, 1.5]))
    renorm.eval(), ours.eval()
    x = _data((2, 3, 4, 5), seed=0).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y = renorm(x)
    assert torch.equal(y, ours(x2))
    y.sum().backward()
    ours(x2).sum().backward()
    assert torch.equal(x.grad, x2.grad)
    assert int(renorm.num_batches_tracked) == 0  # eval moves nothing


def test_callable_limits_ramp_with_num_batches_tracked():
    steps_seen = []

    def r_ramp(step):
        steps_seen.append(step)
        return 1.0 + 0.25 * step

    def d_ramp(step):
        return 0.1 * step

    C, shape = 3, (6, 3, 4)
    bn = BatchRenorm1d(C, r_max=r_ramp, d_max=d_ramp, momentum=0.5).double()
    rm, rv = np.zeros(C), np.ones(C)
    for step in range(4):
        x = _data(shape, seed=step).requires_grad_()
        dy = torch.ones(shape, dtype=torch.float64)
        ref = renorm_hand(
            x.detach().numpy(), np.ones(C), np.zeros(C), rm, rv, 1e-5,
            1.0 + 0.25 * step, 0.1 * step, dy.numpy(),
        )  # fmt: skip
        y = bn(x)
        np.testing.assert_allclose(y.detach().numpy(), ref[0], rtol=1e-10, atol=1e-12)
        if step == 0:  # r_max=1, d_max=0 at step 0: plain batch norm
            np.testing.assert_array_equal(ref[4], 1.0)
        mean, var, n = ref[6], ref[7], ref[8]
        rm, rv = 0.5 * rm + 0.5 * mean, 0.5 * rv + 0.5 * var * n / (n - 1)
    assert steps_seen == [0, 1, 2, 3]


def test_track_running_stats_false_is_batch_norm():
    renorm = BatchRenorm1d(4, r_max=1.2, d_max=0.1, track_running_stats=False).double()
    ours = batchnorm.BatchNorm1d(4, track_running_stats=False).double()
    x = _data((5, 4), seed=0)
    assert torch.equal(renorm(x), ours(x))
    renorm.eval(), ours.eval()
    assert torch.equal(renorm(x), ours(x))


def test_fused_relu_and_residual():
    bn = BatchRenorm2d(3, r_max=1.5, d_max=0.5, activation="relu").double()
    x = _data((2, 3, 4, 4), seed=0)
    z = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    ref = renorm_hand(
        x.numpy(), np.ones(3), np.zeros(3), np.zeros(3), np.ones(3), 1e-5, 1.5, 0.5,
        np.ones(x.shape),
    )  # fmt: skip
    y = bn(x, residual=z)
    np.testing.assert_allclose(y.detach().numpy(), np.maximum(ref[0] + z.numpy(), 0), rtol=1e-10)


def test_channels_last_keeps_format_and_values():
    bn1, bn2 = BatchRenorm2d(5, 1.5, 0.5).double(), BatchRenorm2d(5, 1.5, 0.5).double()
    x = _data((3, 5, 4, 6), seed=0)
    y_cl = bn1(x.to(memory_format=torch.channels_last))
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_cl, bn2(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn1.running_var, bn2.running_var, rtol=1e-12, atol=0)


def test_double_backward_matches_autograd_of_the_formula():
    bn = BatchRenorm1d(3, r_max=1.5, d_max=0.5).double()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.3, -0.2, 5.0]))
        bn.running_var.copy_(torch.tensor([0.5, 2.0, 1.0]))
    x = _data((6, 3, 2), seed=0).requires_grad_()
    saved = (bn.running_mean.clone(), bn.running_var.clone())
    (gx,) = torch.autograd.grad(bn(x).pow(3).sum(), x, create_graph=True)
    (ggx,) = torch.autograd.grad(gx.square().sum(), x)

    # the same, written with torch ops and r, d detached
    x2 = x.detach().clone().requires_grad_()
    var, mean = torch.var_mean(x2, dim=(0, 2), correction=0, keepdim=True)
    sigma = (saved[1] + 1e-5).sqrt().view(1, -1, 1)
    r = ((var + 1e-5).sqrt() / sigma).clamp(1 / 1.5, 1.5).detach()
    d = ((mean - saved[0].view(1, -1, 1)) / sigma).clamp(-0.5, 0.5).detach()
    y2 = (x2 - mean) / (var + 1e-5).sqrt() * r + d
    (gx2,) = torch.autograd.grad(y2.pow(3).sum(), x2, create_graph=True)
    (ggx2,) = torch.autograd.grad(gx2.square().sum(), x2)
    torch.testing.assert_close(gx, gx2, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(ggx, ggx2, rtol=1e-8, atol=1e-9)


def test_subclass_state_dict_and_repr():
    bn = BatchRenorm2d(4, 2.0, 1.0)
    assert isinstance(bn, torch.nn.modules.batchnorm._BatchNorm)
    assert bn.state_dict().keys() == torch.nn.BatchNorm2d(4).state_dict().keys()
    assert "r_max=2.0, d_max=1.0" in repr(bn)
    assert batchnorm.BatchRenorm2d is BatchRenorm2d
    # positional order as the issue gives it: num_features, r_max, d_max, eps, momentum
    bn = BatchRenorm1d(3, 2.0, 1.0, 1e-3, 0.2, False, False)
    assert (bn.r_max, bn.d_max, bn.eps, bn.momentum, bn.affine) == (2.0, 1.0, 1e-3, 0.2, False)
    assert not bn.track_running_stats


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(r_max=0.5), ValueError, "r_max must be >= 1"),
        (dict(d_max=-1.0), ValueError, "d_max must be >= 0"),
        (dict(r_max=float("nan")), ValueError, "r_max"),
        (dict(r_max="3"), TypeError, "r_max must be a float"),
        (dict(d_max=None), TypeError, "d_max must be a float"),
    ],
)
def test_bad_limits_at_construction(kwargs, err, match):
    with pytest.raises(err, match=match):
        BatchRenorm1d(3, **kwargs)


def _untouched(bn, rm, rv):
    assert torch.equal(bn.running_mean, rm) and torch.equal(bn.running_var, rv)
    assert int(bn.num_batches_tracked) == 0


@pytest.mark.parametrize(
    "x, kwargs, err, match",
    [
        (torch.randn(4, 3, 5, 5), {}, ValueError, "expected 2D or 3D input"),
        (torch.randn(1, 3), {}, ValueError, "Expected more than 1 value per channel"),
        (torch.randn(4, 2), {}, ValueError, "3 channels"),
        (torch.randn(4, 3).double(), {}, TypeError, "dtype"),
        (torch.randn(4, 3), dict(r_max=lambda s: 0.9), ValueError, "callable at step 0"),
        (torch.randn(4, 3), dict(d_max=lambda s: -1), ValueError, "d_max must be >= 0"),
    ],
)
def test_bad_input_raises_before_buffers_move(x, kwargs, err, match):
    bn = BatchRenorm1d(3, **kwargs)
    with torch.no_grad():
        bn.running_mean.fill_(0.5)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    with pytest.raises(err, match=match):
        bn(x)
    _untouched(bn, rm, rv)


def test_empty_batch():
    bn = BatchRenorm2d(3)
    y = bn(torch.randn(0, 3, 2, 2))
    assert y.shape == (0, 3, 2, 2)
    assert torch.equal(bn.running_mean, torch.zeros(3))
    assert torch.equal(bn.running_var, torch.ones(3))


COMPILED = r"""
import json, torch, batchnorm
torch.manual_seed(0)
x = torch.randn(6, 3, 5, 5) * 2 + 1
m, ref = (batchnorm.BatchRenorm2d(3, r_max=1.5, d_max=0.5) for _ in range(2))
for mod in (m, ref):
    with torch.no_grad():
        mod.running_var.fill_(9.0)  # so that r is clipped
compiled = torch.compile(m, backend="eager")
out = {"y": [], "buffers": []}
for step in range(2):
    y, y_ref = compiled(x + step), ref(x + step)
    out["y"].append((y - y_ref).abs().max().item())
pairs = zip(m.buffers(), ref.buffers())
out["buffers"] = [(a.double() - b.double()).abs().max().item() for a, b in pairs]
print(json.dumps(out))
"""


def test_torch_compile_in_a_fresh_process():
    """Under torch.compile, r and d are computed eagerly: dynamo traced into the numba
    dispatcher (importing numba inside the trace) and gave up with a recompile-limit error
    in a process where numba was not loaded yet; hence a fresh process."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", COMPILED], capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert max(out["y"]) < 1e-5 and max(out["buffers"]) < 1e-6, out
