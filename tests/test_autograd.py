"""gradcheck / gradgradcheck in float64, and a profiler proof that the path is ours."""

from __future__ import annotations

import pytest
import torch

import batchnorm
import batchnorm.functional as BF
from conftest import BACKENDS, make_input


def _params(C, affine=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    if not affine:
        return None, None
    w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(C, generator=g, dtype=torch.float64).requires_grad_()
    return w, b


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize(
    "shape,channels_last",
    [((5, 3), False), ((2, 3, 4), False), ((2, 3, 3, 2), False), ((2, 3, 3, 2), True),
     ((1, 2, 3, 3), False), ((2, 2, 2, 1, 3), True)],
    ids=str,
)  # fmt: skip
def test_gradcheck(shape, channels_last, affine, training, backend):
    C = shape[1]
    x = make_input(shape, torch.float64, channels_last).requires_grad_()
    w, b = _params(C, affine)
    rm = torch.linspace(-0.5, 0.5, C, dtype=torch.float64)
    rv = torch.linspace(0.5, 2.0, C, dtype=torch.float64)

    def f(x, w, b):
        # fresh buffers each call: gradcheck calls f many times
        return BF.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, backend=backend)

    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 2, 2), (1, 2, 3, 3)], ids=str)
def test_gradgradcheck(shape, training):
    """Double backward on the portable backend."""
    x = make_input(shape, torch.float64).requires_grad_()
    w, b = _params(shape[1])
    rm = torch.zeros(shape[1], dtype=torch.float64)
    rv = torch.full((shape[1],), 1.5, dtype=torch.float64)

    def f(x, w, b):
        return BF.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, backend="torch")

    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_double_backward_matches_torch():
    """A gradient penalty (grad of ||dL/dx||^2) equals torch's, module form."""
    x = make_input((4, 3, 3, 3), torch.float64)
    ref = torch.nn.BatchNorm2d(3, dtype=torch.float64)
    ours = batchnorm.BatchNorm2d(3, dtype=torch.float64, backend="torch")
    results = []
    for m in (ref, ours):
        xi = x.clone().requires_grad_()
        y = m(xi)
        (gx,) = torch.autograd.grad((y**3).sum(), xi, create_graph=True)
        penalty = (gx**2).sum()
        penalty.backward()
        results.append((xi.grad, m.weight.grad, m.bias.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def _ops(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_profiler_no_torch_batch_norm(backend, channels_last):
    """No aten batch-norm op runs in our forward or backward (train and eval)."""
    bn = batchnorm.BatchNorm2d(4, backend=backend)
    x = make_input((3, 4, 5, 5), channels_last=channels_last).requires_grad_()

    def train_step():
        bn.train()
        bn(x).pow(2).sum().backward()
        bn.eval()
        bn(x).pow(2).sum().backward()

    ops = _ops(train_step)
    assert any("BatchNormFunction" in k for k in ops), "our Function did not run"
    leaked = {k for k in ops if "batch_norm" in k.lower()}
    assert not leaked, f"torch batch-norm ops ran: {leaked}"
    # and the check can fail: torch's module does show up
    torch_ops = _ops(lambda: torch.nn.BatchNorm2d(4)(x).sum().backward())
    assert any("batch_norm" in k for k in torch_ops)
