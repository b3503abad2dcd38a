"""Forward-mode AD and torch.func transforms (vmap, grad, jvp): tangents and batch dimensions
flow as through torch's own batch_norm, and the running buffers move as torch's do.

The kernels take storage addresses and the autograd.Function defines no jvp, so these calls
go through ``functional._composite`` (plain differentiable torch ops). Before it, a dual
input lost its tangent without a word and a vmapped one raised about a missing data pointer.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import grad, jvp, vmap

import batchnorm
import batchnorm.functional as BF
from conftest import TOLERANCES, make_input

SHAPES = [(4, 3, 5, 5), (1, 2, 7, 3), (6, 5), (3, 4, 2, 3, 5)]


def _params(C, dtype):
    g = torch.Generator().manual_seed(C)
    w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    b = torch.randn(C, generator=g, dtype=torch.float64).to(dtype)
    rm = torch.randn(C, generator=g, dtype=torch.float64).to(dtype)
    rv = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    return w, b, rm, rv


def _close(a, b, dtype):
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", ["auto", "numba", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_forward_ad_tangent_and_buffers_match_torch(shape, training, backend, dtype,
                                                    channels_last):  # fmt: skip
    if training and shape[0] * (shape[2] if len(shape) > 2 else 1) == 1:
        pytest.skip("one value per channel: training raises (tested in test_validation)")
    x = make_input(shape, dtype, channels_last=channels_last)
    t = make_input(shape, dtype, seed=1, offset=0.0)
    tw = torch.linspace(-1, 1, shape[1], dtype=dtype)
    w, b, rm, rv = _params(shape[1], dtype)
    ours_buf, torch_buf = (rm.clone(), rv.clone()), (rm.clone(), rv.clone())
    n_ours, n_torch = torch.tensor(4), torch.tensor(4)
    with fwAD.dual_level():
        y = BF.batch_norm(fwAD.make_dual(x, t), *ours_buf, fwAD.make_dual(w, tw), b, training,
                          None, backend=backend, num_batches_tracked=n_ours)  # fmt: skip
        y, ty = fwAD.unpack_dual(y)
        n_torch += training
        want = F.batch_norm(fwAD.make_dual(x, t), *torch_buf, fwAD.make_dual(w, tw), b,
                            training, 1 / n_torch.item() if training else 0.1)  # fmt: skip
        want, t_want = fwAD.unpack_dual(want)
    _close(y, want, dtype)
    _close(ty, t_want, dtype)
    assert ty.abs().max() > 0
    for ours, theirs in zip(ours_buf, torch_buf):
        _close(ours, theirs, dtype)
    assert n_ours.item() == n_torch.item()
    if channels_last and x.dim() == 4:
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_forward_ad_with_residual_relu_and_half_input():
    """The fused activation and float16 input (float32 statistics) keep their tangents."""
    x = make_input((4, 3, 6, 6), torch.float16)
    t, res = make_input((4, 3, 6, 6), torch.float16, seed=1), make_input((4, 3, 6, 6), seed=2)
    res = res.half()
    w, b, _, _ = _params(3, torch.float32)
    with fwAD.dual_level():
        y = BF.batch_norm(fwAD.make_dual(x, t), None, None, w, b, True, residual=res,
                          activation="relu")  # fmt: skip
        y, ty = fwAD.unpack_dual(y)
        want = F.relu(F.batch_norm(fwAD.make_dual(x, t), None, None, w, b, True) + res)
        want, t_want = fwAD.unpack_dual(want)
    assert y.dtype == ty.dtype == torch.float16  # (torch's CPU op gives float32 here)
    _close(y, want.half(), torch.float16)
    _close(ty, t_want.half(), torch.float16)


def test_a_dual_level_without_tangents_keeps_the_kernels(monkeypatch):
    """Only a tensor that carries a tangent leaves the kernels: inside ``dual_level`` a plain
    call gives the direct path's bytes."""
    x = make_input((4, 3, 5, 5))
    w, b, rm, rv = _params(3, torch.float32)
    want = BF.batch_norm(x, rm.clone(), rv.clone(), w, b, True)

    def fail(*a, **k):
        raise AssertionError("took the composite path")

    monkeypatch.setattr(BF, "_composite", fail)
    with fwAD.dual_level():
        y = BF.batch_norm(x, rm.clone(), rv.clone(), w, b, True)
    assert torch.equal(y, want)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_vmap_matches_torch(training, channels_last):
    xs = torch.stack([make_input((4, 3, 5, 5), seed=s) for s in range(3)])
    if channels_last:
        xs = xs.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    w, b, rm, rv = _params(3, torch.float32)
    buf = (None, None) if training else (rm, rv)
    y = vmap(lambda x: BF.batch_norm(x, *buf, w, b, training))(xs)
    want = vmap(lambda x: F.batch_norm(x, *buf, w, b, training))(xs)
    _close(y, want, torch.float32)


def test_vmap_over_the_buffers_updates_each():
    xs = torch.stack([make_input((4, 3, 5, 5), seed=s) for s in range(3)])
    w, b, rm, rv = _params(3, torch.float32)
    ours = rm.repeat(3, 1), rv.repeat(3, 1)
    theirs = rm.repeat(3, 1), rv.repeat(3, 1)
    y = vmap(lambda x, m, v: BF.batch_norm(x, m, v, w, b, True))(xs, *ours)
    want = vmap(lambda x, m, v: F.batch_norm(x, m, v, w, b, True))(xs, *theirs)
    _close(y, want, torch.float32)
    for a, c in zip(ours, theirs):
        _close(a, c, torch.float32)
    assert not torch.equal(ours[0], rm.repeat(3, 1))


def test_vmap_with_shared_buffers_in_training_raises_and_changes_nothing():
    """Each vmapped example has its own statistics, and one buffer cannot take them all (torch
    raises too); nothing moves, num_batches_tracked included."""
    xs = torch.stack([make_input((4, 3, 5, 5), seed=s) for s in range(3)])
    w, b, rm, rv = _params(3, torch.float32)
    rm0, rv0, n = rm.clone(), rv.clone(), torch.tensor(7)
    with pytest.raises(RuntimeError, match="running_mean/running_var"):
        vmap(lambda x: BF.batch_norm(x, rm, rv, w, b, True, num_batches_tracked=n))(xs)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0) and n.item() == 7


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_func_grad_and_jvp_match_torch_and_update_the_buffers(training):
    x = make_input((4, 3, 5, 5))
    t = make_input((4, 3, 5, 5), seed=1, offset=0.0)
    w, b, rm, rv = _params(3, torch.float32)
    weights = torch.arange(75.0).view(1, 3, 5, 5)
    ours, theirs = (rm.clone(), rv.clone()), (rm.clone(), rv.clone())

    def loss(bn, buf):
        return lambda x: (bn(x, *buf, w, b, training) ** 2 * weights).sum()

    g = grad(loss(BF.batch_norm, ours))(x)
    want = grad(loss(F.batch_norm, theirs))(x)
    _close(g / want.abs().max(), want / want.abs().max(), torch.float32)
    for a, c in zip(ours, theirs):
        _close(a, c, torch.float32)
    assert training != torch.equal(ours[0], rm)
    buf = (None, None) if training else (rm, rv)
    _, ty = jvp(lambda x: BF.batch_norm(x, *buf, w, b, training), (x,), (t,))
    _, t_want = jvp(lambda x: F.batch_norm(x, *buf, w, b, training), (x,), (t,))
    _close(ty, t_want, torch.float32)


def test_module_under_jvp_updates_its_buffers():
    """``batchnorm.BatchNorm2d`` in training under ``torch.func.jvp``: the tangent, and the
    buffers and counter moved once (torch's own module raises there: it bumps its counter
    with an in-place op the transform refuses)."""
    torch.manual_seed(0)
    m = batchnorm.BatchNorm2d(3)
    x = make_input((4, 3, 5, 5))
    t = make_input((4, 3, 5, 5), seed=1, offset=0.0)
    rm, rv = torch.zeros(3), torch.ones(3)
    _, ty = jvp(m, (x,), (t,))
    _, t_want = jvp(lambda x: F.batch_norm(x, rm, rv, m.weight, m.bias, True), (x,), (t,))
    _close(ty, t_want, torch.float32)
    _close(m.running_mean, rm, torch.float32)
    _close(m.running_var, rv, torch.float32)
    assert m.num_batches_tracked.item() == 1


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4)], ids=str)
def test_forward_ad_empty_batch_moves_only_the_counter(shape):
    """As on the kernels' path: no values, no statistics; the buffers stay, the counter
    counts the call (and no warning from an empty reduction)."""
    x = torch.randn(shape)
    _, _, rm, rv = _params(3, torch.float32)
    rm0, rv0, n = rm.clone(), rv.clone(), torch.tensor(2)
    with fwAD.dual_level():
        y = BF.batch_norm(fwAD.make_dual(x, torch.ones_like(x)), rm, rv, None, None, True,
                          num_batches_tracked=n)  # fmt: skip
    assert y.shape == shape
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0) and n.item() == 3


def _renorm(backend="auto"):
    """A BatchRenorm2d whose limits bind (r clipped, d not), buffers away from the batch's."""
    m = batchnorm.BatchRenorm2d(3, r_max=1.5, d_max=5.0, backend=backend)
    w, b, rm, rv = _params(3, torch.float32)
    with torch.no_grad():
        m.weight.copy_(w), m.bias.copy_(b), m.running_mean.copy_(rm), m.running_var.copy_(rv * 16)
    return m


def _renorm_reference(m, x):
    """(y, r, d, the module after the step) from a plain call on a copy of m: the output,
    the constants r and d, and the buffers to expect."""
    ref = batchnorm.BatchRenorm2d(3, r_max=1.5, d_max=5.0)
    ref.load_state_dict(m.state_dict())
    r, d = ref._r_d(x, 1.5, 5.0)
    y = ref(x)
    return y, r, d, ref


@pytest.mark.parametrize("backend", ["auto", "numba", "torch"])
def test_batch_renorm_under_jvp_and_grad(backend):
    """r and d are constants (the paper's stop-gradient): the tangent is batch norm's with
    weight w r and bias w d + b; grad matches reverse mode on plain tensors; buffers move."""
    x = make_input((4, 3, 5, 5), torch.float32)
    t = make_input((4, 3, 5, 5), torch.float32, seed=1, offset=0.0)
    m = _renorm(backend)
    want_y, r, d, ref = _renorm_reference(m, x)
    assert (r == 1.5).any() or (r == 1 / 1.5).any(), "the test wants r clipped somewhere"
    y, ty = jvp(m, (x,), (t,))
    w, b = m.weight.detach(), m.bias.detach()
    rm, rv = torch.zeros(3), torch.ones(3)
    _, t_want = jvp(lambda z: F.batch_norm(z, rm, rv, w * r, w * d + b, True), (x,), (t,))
    _close(y, want_y, torch.float32)
    _close(ty, t_want, torch.float32)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(m, name), getattr(ref, name))

    m = _renorm(backend)
    g = grad(lambda z: (m(z) * t).sum())(x)
    xr = x.clone().requires_grad_(True)
    (_renorm(backend)(xr) * t).sum().backward()
    _close(g, xr.grad, torch.float32)
    assert m.num_batches_tracked.item() == 1


def test_batch_renorm_under_vmap_with_vmapped_buffers():
    """Each vmapped example renormalises towards its own buffers, as a loop over modules."""
    xs = torch.stack([make_input((4, 3, 5, 5), torch.float32, seed=s) for s in range(3)])
    m = _renorm()
    bufs = {k: v.expand(3, *v.shape).clone() for k, v in m.named_buffers()
            if k != "num_batches_tracked"}  # fmt: skip
    bufs["running_mean"] += torch.arange(3.0)[:, None]
    ys = vmap(lambda b, z: torch.func.functional_call(m, b, (z,)))(bufs, xs)
    for k in range(3):
        one = _renorm()
        with torch.no_grad():
            one.running_mean += k
        _close(ys[k], one(xs[k]), torch.float32)
        _close(bufs["running_mean"][k], one.running_mean, torch.float32)
        _close(bufs["running_var"][k], one.running_var, torch.float32)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_compile_around_vmap_and_jvp(training):
    """torch.compile runs our batch norm eagerly; the transforms' check still applies there
    (the compiled branch once skipped it: an autograd.Function under vmap, a wrapped tensor
    in the kernels). The "eager" backend: dynamo's tracing alone, no code generation."""
    x = make_input((2, 4, 3, 5, 5), torch.float32)
    t = make_input((4, 3, 5, 5), torch.float32, seed=1, offset=0.0)
    ours, theirs = batchnorm.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    for m in (ours, theirs):
        m.train(training)
        m.track_running_stats = not training  # vmap in training wants no shared buffers
    torch._dynamo.reset()
    got = torch.compile(vmap(ours), backend="eager")(x)
    _close(got, vmap(theirs)(x), torch.float32)
    torch._dynamo.reset()
    y, ty = torch.compile(lambda z, u: jvp(ours, (z,), (u,)), backend="eager")(x[0], t)
    y_want, ty_want = jvp(theirs, (x[0],), (t,))
    _close(y, y_want, torch.float32)
    _close(ty, ty_want, torch.float32)


@pytest.mark.parametrize("backend", ["auto", "numba"])
def test_batch_renorm_with_the_input_closed_over(backend):
    """grad and jvp with respect to the weight, x closed over: x stays a plain tensor but
    what the statistics read is wrapped by the transform (the kernels once got it)."""
    x = make_input((4, 3, 5, 5), torch.float32)
    m = _renorm(backend)
    w0 = m.weight.detach().clone()

    def f(w):
        return torch.func.functional_call(m, {"weight": w}, (x,))

    g = grad(lambda w: (f(w) * x).sum())(w0)
    wr = w0.clone().requires_grad_(True)
    (torch.func.functional_call(_renorm(backend), {"weight": wr}, (x,)) * x).sum().backward()
    _close(g, wr.grad, torch.float32)
    m = _renorm(backend)  # (grad's call moved the buffers r and d come from)
    y, ty = jvp(f, (w0,), (torch.ones(3),))
    _, r, d, _ = _renorm_reference(_renorm(backend), x)
    xhat = F.batch_norm(x, None, None, None, None, True)  # y = w (xhat r + d) + b: dy/dw
    _close(ty, xhat * r[:, None, None] + d[:, None, None], torch.float32)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_forward_ad_non_finite_channel_buffers_match_torch(value):
    """The differentiable path's statistics (two passes, as the kernels'): an infinity in a
    training channel leaves torch's running_mean (the infinity; var_mean's mean was NaN) and a
    NaN running_var; a NaN gives NaN in both."""
    x = make_input((4, 3, 5, 5))
    x[2, 1, 3, 4] = float(value)
    ref, ours = torch.nn.BatchNorm2d(3), batchnorm.BatchNorm2d(3)
    ref(x)
    with fwAD.dual_level():
        ours(fwAD.make_dual(x, torch.ones_like(x)))
    got, want = ours.running_mean[1].item(), ref.running_mean[1].item()
    assert (got == want == float(value)) if value != "nan" else (got != got and want != want)
    assert ours.running_var[1].isnan() and ref.running_var[1].isnan()
    for c in (0, 2):
        _close(ours.running_mean[c], ref.running_mean[c], torch.float32)
        _close(ours.running_var[c], ref.running_var[c], torch.float32)


def test_forward_ad_data_far_from_zero_keeps_its_variance():
    """The issue's offset case (x = 1e4 + 0.1 * randn, float32: 1e5 standard deviations from
    zero) through the differentiable path: running_var within 1e-3 of float64's two-pass
    value, as the kernels' (test_parity)."""
    g = torch.Generator().manual_seed(3)
    x = (1e4 + 0.1 * torch.randn(8, 2, 5, generator=g, dtype=torch.float64)).float()
    ours = batchnorm.BatchNorm1d(2, momentum=1.0)
    with fwAD.dual_level():
        ours(fwAD.make_dual(x, torch.ones_like(x)))
    xd = x.double()
    exact = (xd - xd.mean(dim=(0, 2), keepdim=True)).square().sum(dim=(0, 2)) / (8 * 5 - 1)
    torch.testing.assert_close(ours.running_var.double(), exact, rtol=1e-3, atol=0)
