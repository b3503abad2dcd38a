"""Fused activation: ``batch_norm(..., activation="relu")`` and the residual form
``relu(bn(x) + z)``, on every backend, against torch's ``relu(bn(x))`` and
``relu(bn(x) + z)`` computed in float64 from the same inputs: values, running buffers and all
gradients (input, weight, bias and the residual's), plus gradcheck/gradgradcheck.

The inputs are built away from the relu's kink (no output within ~0.05 of 0), so that a
rounding difference can never flip the mask and every comparison is well defined.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import batchnorm
import batchnorm.functional as BF

BACKENDS = ("torch", "numba")

SHAPES = [
    (6, 4),
    (5, 3, 7),
    (1, 3, 5),  # N=1, spatial > 1
    (4, 1, 3),  # C=1
    (2, 5, 3, 7),  # primes
    (1, 2, 3, 3),
    (3, 2, 2, 3, 5),
]

# (dtype, rtol/atol for values, for gradients)
DTYPES = [
    (torch.float64, 1e-10, 1e-9),
    (torch.float32, 1e-5, 5e-5),
    (torch.float16, 4e-3, 2e-2),
    (torch.bfloat16, 2e-2, 8e-2),
]


def kink_free_input(shape, dtype, seed):
    """x whose values sit at least 0.5 from their channel's mean ``c`` (pairs ``c +- a`` with
    ``a`` in [0.5, 1.5], and one ``c`` when a channel has an odd count), shuffled."""
    g = torch.Generator().manual_seed(seed)
    N, C = shape[0], shape[1]
    n = torch.Size(shape).numel() // C
    a = 0.5 + torch.rand(C, n // 2, generator=g, dtype=torch.float64)
    vals = torch.cat([a, -a] + ([torch.zeros(C, 1, dtype=torch.float64)] if n % 2 else []), 1)
    vals = vals.gather(1, torch.argsort(torch.rand(C, n, generator=g), dim=1))  # (C, n)
    c = torch.linspace(-2.0, 2.0, C, dtype=torch.float64)
    vals = vals + c[:, None]
    x = vals.reshape(C, N, *shape[2:]).movedim(0, 1).contiguous()  # (N, C, *spatial)
    return x.to(dtype), c


def params(C, dtype, seed):
    """w in +-[0.8, 1.5], b in +-[0.05, 0.2]: |w * xhat| > |b|, so bn(x) keeps away from 0."""
    g = torch.Generator().manual_seed(seed)
    sign = lambda: torch.where(torch.rand(C, generator=g) < 0.5, -1.0, 1.0).double()  # noqa: E731
    w = sign() * (0.8 + 0.7 * torch.rand(C, generator=g, dtype=torch.float64))
    b = sign() * (0.05 + 0.15 * torch.rand(C, generator=g, dtype=torch.float64))
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    return w.to(pdtype), b.to(pdtype)


def torch_bn64(x, running_mean, running_var, w, b, training, eps=1e-5):
    return F.batch_norm(
        x.double(), running_mean, running_var,
        None if w is None else w.double(), None if b is None else b.double(), training, 0.0, eps,
    )  # fmt: skip


def kink_free_residual(x, w, b, running_mean, running_var, training, seed):
    """z such that bn(x) + z = t with |t| in [0.25, 1.5], random signs."""
    g = torch.Generator().manual_seed(seed)
    t = 0.25 + 1.25 * torch.rand(x.shape, generator=g, dtype=torch.float64)
    t = t * torch.where(torch.rand(x.shape, generator=g) < 0.5, -1.0, 1.0).double()
    rm = None if running_mean is None else running_mean.double()
    rv = None if running_var is None else running_var.double()
    return (t - torch_bn64(x, rm, rv, w, b, training)).to(x.dtype)


def make_case(shape, dtype, training, affine, residual, channels_last=False, seed=0):
    x, c = kink_free_input(shape, dtype, seed)
    C = shape[1]
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    w, b = params(C, dtype, seed + 1) if affine else (None, None)
    g = torch.Generator().manual_seed(seed + 2)
    running_mean = c.to(pdtype)  # eval: x - running_mean keeps the 0.5 gap
    running_var = (0.5 + 1.5 * torch.rand(C, generator=g, dtype=torch.float64)).to(pdtype)
    z = None
    if residual:
        z = kink_free_residual(x, w, b, running_mean, running_var, training, seed + 3)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x, w, b, z, running_mean, running_var, dy


def _leaf(t):
    return None if t is None else t.detach().clone().requires_grad_()


def run_both(backend, x, w, b, z, running_mean, running_var, dy, training, momentum=0.1):
    """(ours, reference): each a dict of y, grads and the buffers after the call."""
    ins = [_leaf(t) for t in (x, w, b, z)]
    rm, rv = running_mean.clone(), running_var.clone()
    y = BF.batch_norm(
        ins[0], rm, rv, ins[1], ins[2], training, momentum, 1e-5,
        residual=ins[3], activation="relu", backend=backend,
    )  # fmt: skip
    y.backward(dy)
    ours = dict(y=y, rm=rm, rv=rv, grads=[None if t is None else t.grad for t in ins])

    refs = [None if t is None else t.detach().double().requires_grad_() for t in (x, w, b, z)]
    rm64, rv64 = running_mean.double(), running_var.double()
    y64 = F.batch_norm(refs[0], rm64, rv64, refs[1], refs[2], training, momentum, 1e-5)
    if refs[3] is not None:
        y64 = y64 + refs[3]
    y64 = torch.relu(y64)
    y64.backward(dy.double())
    ref = dict(y=y64, rm=rm64, rv=rv64, grads=[None if t is None else t.grad for t in refs])
    return ours, ref


def assert_matches(ours, ref, dtype, tol, gtol):
    assert ours["y"].dtype == dtype
    torch.testing.assert_close(ours["y"].double(), ref["y"].detach(), rtol=tol, atol=tol)
    btol = min(tol, 1e-5)
    torch.testing.assert_close(ours["rm"].double(), ref["rm"], rtol=btol, atol=btol)
    torch.testing.assert_close(ours["rv"].double(), ref["rv"], rtol=btol, atol=btol)
    for name, g, g_ref in zip(("dx", "dweight", "dbias", "dresidual"), ours["grads"], ref["grads"]):
        if g_ref is None:
            assert g is None, name
            continue
        # weight/bias gradients are sums over the batch: scale the tolerance with their size
        scale = max(1.0, float(g_ref.abs().max()))
        torch.testing.assert_close(
            g.double(), g_ref, rtol=gtol, atol=gtol * scale, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, tol, gtol", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_functional_matches_torch_relu_bn(backend, dtype, tol, gtol, shape, residual, training):
    case = make_case(shape, dtype, training, affine=True, residual=residual)
    ours, ref = run_both(backend, *case, training=training)
    assert_matches(ours, ref, dtype, tol, gtol)
    # the mask matters: some outputs were clipped, some were not
    assert (ours["y"] == 0).any() and (ours["y"] > 0).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("residual", [False, True])
def test_without_affine_and_channels_last(backend, training, residual):
    for affine, channels_last in ((False, False), (True, True), (False, True)):
        case = make_case((3, 4, 5, 6), torch.float32, training, affine, residual, channels_last)
        ours, ref = run_both(backend, *case, training=training)
        assert_matches(ours, ref, torch.float32, 1e-5, 5e-5)
        if channels_last:
            assert ours["y"].is_contiguous(memory_format=torch.channels_last)
            assert ours["grads"][0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_with_other_strides(backend):
    # channels_last x with an NCHW residual, and a residual that is a transposed view
    x, w, b, z, rm, rv, dy = make_case((2, 3, 4, 4), torch.float32, True, True, True)
    for x_, z_ in (
        (x.to(memory_format=torch.channels_last), z),
        (x, z.transpose(2, 3).contiguous().transpose(2, 3)),
    ):
        ours, ref = run_both(backend, x_, w, b, z_, rm, rv, dy, training=True)
        assert_matches(ours, ref, torch.float32, 1e-5, 5e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
def test_module_relu_and_residual_match_torch(backend, training):
    x, w, b, z, rm, rv, dy = make_case((4, 3, 5, 5), torch.float32, training, True, True)
    ours = batchnorm.BatchNorm2d(3, activation="relu", backend=backend)
    theirs = torch.nn.BatchNorm2d(3)
    for m in (ours, theirs):
        with torch.no_grad():
            m.weight.copy_(w), m.bias.copy_(b)
            m.running_mean.copy_(rm), m.running_var.copy_(rv)
        m.train(training)
    assert "activation='relu'" in repr(ours)
    x1, x2, z1, z2 = _leaf(x), _leaf(x), _leaf(z), _leaf(z)
    y1 = ours(x1, residual=z1)
    y2 = torch.relu(theirs(x2) + z2)
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    y1.backward(dy), y2.backward(dy)
    for a, b_ in ((x1, x2), (z1, z2), (ours.weight, theirs.weight), (ours.bias, theirs.bias)):
        torch.testing.assert_close(a.grad, b_.grad, rtol=5e-5, atol=5e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name))

    # no residual: relu(bn(x)), and the same under no_grad (the inference path)
    y1 = ours(x)
    torch.testing.assert_close(y1, torch.relu(theirs(x)), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, residual=z), torch.relu(theirs(x) + z))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("shape", [(4, 3), (3, 2, 5), (2, 3, 2, 3)])
def test_gradcheck_float64_away_from_the_kink(backend, training, residual, shape):
    x, w, b, z, rm, rv, _ = make_case(shape, torch.float64, training, True, residual, seed=5)
    inputs = [_leaf(t) for t in (x, w, b, z) if t is not None]

    def f(x, w, b, z=None):
        # training without buffers: repeated calls must not move any running statistics
        return BF.batch_norm(
            x, None if training else rm, None if training else rv, w, b, training, 0.1, 1e-5,
            residual=z, activation="relu", backend=backend,
        )  # fmt: skip

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)
    assert torch.autograd.gradgradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_is_zero_where_clipped(backend):
    # relu(bn(x) + z) with z very negative: everything clipped, no gradient anywhere
    x, w, b, _, rm, rv, dy = make_case((4, 3, 2), torch.float64, True, True, False)
    xl, wl, bl = _leaf(x), _leaf(w), _leaf(b)
    zl = torch.full_like(x, -100.0, requires_grad=True)
    y = BF.batch_norm(xl, None, None, wl, bl, True, residual=zl, activation="relu", backend=backend)
    y.backward(dy)
    assert torch.equal(y, torch.zeros_like(y))
    for t in (xl, wl, bl, zl):
        assert torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_without_activation_is_added(backend):
    x, w, b, z, rm, rv, dy = make_case((3, 2, 4), torch.float64, True, True, True)
    y = BF.batch_norm(x, None, None, w, b, True, residual=z, backend=backend)
    ref = torch_bn64(x, None, None, w, b, True) + z
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(activation="gelu"), ValueError, "activation must be one of"),
        (dict(activation="relu", residual=torch.zeros(4, 3, 2)), ValueError, "residual should"),
        (dict(residual=torch.zeros(4, 3, 5).double()), TypeError, "residual should be"),
        (dict(residual=[0.0]), TypeError, "residual must be a torch.Tensor"),
    ],
)
def test_bad_arguments_raise_before_buffers_move(kwargs, err, match):
    rm, rv = torch.zeros(3), torch.ones(3)
    nbt = torch.tensor(0)
    with pytest.raises(err, match=match):
        BF.batch_norm(
            torch.randn(4, 3, 5), rm, rv, training=True, num_batches_tracked=nbt, **kwargs
        )
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3)) and nbt == 0
    with pytest.raises(ValueError, match="activation must be one of"):
        batchnorm.BatchNorm1d(3, activation="tanh")
