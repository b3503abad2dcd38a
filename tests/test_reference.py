"""The NumPy float64 reference: against finite differences, and against torch in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchnorm import reference


def numerical_grad(f, x, h=1e-6):
    """Central differences of the scalar f at x (float64)."""
    grad = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + h
        fp = f()
        x[i] = old - h
        fm = f()
        x[i] = old
        grad[i] = (fp - fm) / (2 * h)
    return grad


@pytest.mark.parametrize("shape", [(4, 3), (1, 2, 3, 3), (3, 1, 5), (2, 3, 2, 2, 3)], ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_backward_matches_finite_differences(shape, training):
    rng = np.random.default_rng(0)
    C = shape[1]
    x = rng.standard_normal(shape) * 1.7 + 0.3
    w = rng.uniform(0.5, 1.5, C)
    b = rng.standard_normal(C)
    rm, rv = rng.standard_normal(C), rng.uniform(0.5, 2.0, C)
    dy = rng.standard_normal(shape)  # loss = sum(y * dy): a non-trivial upstream gradient

    def run():
        if training:
            return reference.forward(x, w, b, eps=1e-5)
        return reference.forward_eval(x, rm, rv, w, b, eps=1e-5)

    def loss():
        return float((run()[0] * dy).sum())

    y, cache = run()
    dx, dw, db = reference.backward(dy, cache)
    np.testing.assert_allclose(dx, numerical_grad(loss, x), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dw, numerical_grad(loss, w), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(db, numerical_grad(loss, b), rtol=1e-6, atol=1e-7)


def test_forward_statistics_by_hand():
    x = np.arange(18, dtype=np.float64).reshape(1, 2, 3, 3)  # channel 0: 0..8, channel 1: 9..17
    y, cache = reference.forward(x, None, None, eps=0.0 + 1e-12)
    # per channel mean 4 and 13; biased var = (sum of k^2 for k=-4..4) / 9 = 60/9
    np.testing.assert_allclose(cache.invstd, 1 / np.sqrt(60 / 9 + 1e-12))
    np.testing.assert_allclose(y[0, 0].ravel(), (np.arange(9) - 4) / np.sqrt(60 / 9), rtol=1e-9)
    mean, var, n = reference.batch_statistics(x)
    np.testing.assert_allclose(mean, [4, 13])
    np.testing.assert_allclose(var, [60 / 9, 60 / 9])
    assert n == 9


@pytest.mark.parametrize("momentum", [0.1, 1.0, None, 0.5])
def test_running_update_against_torch(momentum):
    """Three steps of reference.update_running_stats equal torch's buffers in float64."""
    rng = np.random.default_rng(1)
    bn = torch.nn.BatchNorm2d(3, momentum=momentum, dtype=torch.float64)
    rm, rv, nbt = np.zeros(3), np.ones(3), 0
    for _ in range(3):
        x = rng.standard_normal((2, 3, 3, 4)) * 2 + 1
        bn(torch.from_numpy(x))
        rm, rv, nbt = reference.update_running_stats(rm, rv, nbt, x, momentum)
    np.testing.assert_allclose(rm, bn.running_mean.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(rv, bn.running_var.numpy(), rtol=1e-12, atol=1e-14)
    assert nbt == bn.num_batches_tracked.item() == 3


def test_momentum_none_first_batch_replaces_buffers():
    x = np.random.default_rng(2).standard_normal((5, 2, 3))
    rm, rv, nbt = reference.update_running_stats(np.full(2, 7.0), np.full(2, 9.0), 0, x, None)
    mean, var, n = reference.batch_statistics(x)
    np.testing.assert_allclose(rm, mean)
    np.testing.assert_allclose(rv, var * n / (n - 1))
    assert nbt == 1


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 5, 5), (1, 2, 3, 3)], ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_reference_against_torch_float64(shape, training):
    rng = np.random.default_rng(3)
    C = shape[1]
    x = rng.standard_normal(shape) * 3 - 1
    dy = rng.standard_normal(shape)
    w, b = rng.uniform(0.5, 1.5, C), rng.standard_normal(C)
    rm, rv = rng.standard_normal(C), rng.uniform(0.5, 2.0, C)
    xt = torch.from_numpy(x).requires_grad_()
    wt, bt = torch.from_numpy(w).requires_grad_(), torch.from_numpy(b).requires_grad_()
    yt = torch.nn.functional.batch_norm(
        xt, torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy()), wt, bt, training, 0.1, 1e-5
    )
    yt.backward(torch.from_numpy(dy))
    if training:
        y, cache = reference.forward(x, w, b, eps=1e-5)
    else:
        y, cache = reference.forward_eval(x, rm, rv, w, b, eps=1e-5)
    dx, dw, db = reference.backward(dy, cache)
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(dw, wt.grad.numpy(), rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(db, bt.grad.numpy(), rtol=1e-9, atol=1e-11)


def test_seed_gradients():
    """The seed notebook: for loss y.sum(), grad_bias = n = 9 and grad_weight = sum(xhat) ~ 0."""
    x = np.random.default_rng(4).standard_normal((1, 2, 3, 3))
    y, cache = reference.forward(x, np.ones(2), np.zeros(2))
    dx, dw, db = reference.backward(np.ones_like(y), cache)
    np.testing.assert_allclose(db, [9.0, 9.0])
    np.testing.assert_allclose(dw, [0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(dx, 0.0, atol=1e-12)  # y.sum() does not depend on x
