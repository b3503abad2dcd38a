"""GhostBatchNorm1d/2d/3d against the float64 NumPy reference applied virtual batch by virtual
batch, and against torch's BatchNorm called on each virtual batch in turn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import batchnorm
from batchnorm import reference
from batchnorm.ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d

CLASSES = {2: GhostBatchNorm1d, 3: GhostBatchNorm1d, 4: GhostBatchNorm2d, 5: GhostBatchNorm3d}
TORCH_BN = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}
TORCH_BN[5] = torch.nn.BatchNorm3d
OURS_BN = {2: batchnorm.BatchNorm1d, 3: batchnorm.BatchNorm1d, 4: batchnorm.BatchNorm2d}
OURS_BN[5] = batchnorm.BatchNorm3d

# (shape, virtual_batch_size, virtual batch sizes it gives)
CASES = [
    ((10, 3), 4, [4, 4, 2]),
    ((7, 2, 5), 3, [3, 3, 1]),  # a last virtual batch of 1 sample, spatial > 1
    ((5, 1, 7), 5, [5]),  # C=1, exactly one virtual batch
    ((3, 5, 3), 8, [3]),  # N < virtual_batch_size: plain batch norm
    ((6, 3, 2, 3), 1, [1] * 6),  # one sample per virtual batch
    ((11, 3, 3, 5), 4, [4, 4, 3]),  # primes
    ((5, 2, 2, 3, 3), 2, [2, 2, 1]),
]


def _init(bn, C, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-trivial init: ones and zeros could hide a wrong gradient
        bn.weight.copy_(torch.rand(C, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(C, generator=g))
        bn.running_mean.copy_(torch.randn(C, generator=g))
        bn.running_var.copy_(torch.rand(C, generator=g) + 0.5)


@pytest.mark.parametrize("shape, v, sizes", CASES)
@pytest.mark.parametrize("momentum", [0.25, None])
def test_training_matches_reference_per_virtual_batch(shape, v, sizes, momentum):
    C = shape[1]
    bn = CLASSES[len(shape)](C, v, momentum=momentum)
    _init(bn, C)
    bn = bn.double()
    w, b = bn.weight.detach().numpy().copy(), bn.bias.detach().numpy().copy()
    rm, rv = bn.running_mean.numpy().copy(), bn.running_var.numpy().copy()
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1).requires_grad_()
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    y = bn(x)
    y.backward(dy)

    start, nbt = 0, 0
    y_ref, dx_ref = np.empty(shape), np.empty(shape)
    dw_ref, db_ref = np.zeros(C), np.zeros(C)
    for size in sizes:
        xv = x.detach().numpy()[start : start + size]
        yv, cache = reference.forward(xv, w, b, eps=1e-5)
        dxv, dwv, dbv = reference.backward(dy.numpy()[start : start + size], cache)
        y_ref[start : start + size], dx_ref[start : start + size] = yv, dxv
        dw_ref += dwv
        db_ref += dbv
        rm, rv, nbt = reference.update_running_stats(rm, rv, nbt, xv, momentum)
        start += size
    assert start == shape[0]
    np.testing.assert_allclose(y.detach().numpy(), y_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(x.grad.numpy(), dx_ref, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(bn.weight.grad.numpy(), dw_ref, rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(bn.bias.grad.numpy(), db_ref, rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(bn.running_mean.numpy(), rm, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(bn.running_var.numpy(), rv, rtol=1e-12)
    assert int(bn.num_batches_tracked) == nbt == len(sizes)


@pytest.mark.parametrize("shape, v, sizes", CASES[:3] + CASES[5:])
@pytest.mark.parametrize(
    "dtype, tol",
    [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)],
)
def test_training_matches_torch_called_per_virtual_batch(shape, v, sizes, dtype, tol):
    C = shape[1]
    ghost, theirs = CLASSES[len(shape)](C, v), TORCH_BN[len(shape)](C)
    _init(ghost, C)
    theirs.load_state_dict(ghost.state_dict())
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = ghost(x1)
    y_ref = torch.cat([theirs(xv) for xv in x2.split(v)])
    assert y.dtype == dtype
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=tol * 10, atol=tol * 10)
    torch.testing.assert_close(ghost.weight.grad, theirs.weight.grad, rtol=tol, atol=tol * 10)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ghost, name), getattr(theirs, name), rtol=tol, atol=0)


def test_eval_is_batch_norm_eval():
    ghost, ours = GhostBatchNorm2d(3, 2), batchnorm.BatchNorm2d(3)
    _init(ghost, 3)
    ours.load_state_dict(ghost.state_dict())
    ghost.eval(), ours.eval()
    x = torch.randn(7, 3, 4, 4)
    assert torch.equal(ghost(x), ours(x))
    assert int(ghost.num_batches_tracked) == 0


def test_without_running_stats_eval_uses_the_whole_batch():
    ghost = GhostBatchNorm1d(3, 2, track_running_stats=False).double()
    ours = batchnorm.BatchNorm1d(3, track_running_stats=False).double()
    x = torch.randn(6, 3, dtype=torch.float64) * 2 + 1
    y = ghost(x)  # training: per virtual batch of 2
    for xv, yv in zip(x.split(2), y.split(2)):
        torch.testing.assert_close(yv, ours(xv), rtol=1e-12, atol=1e-12)
    ghost.eval(), ours.eval()
    torch.testing.assert_close(ghost(x), ours(x), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(ghost(x), y)  # the whole batch's statistics, not the virtual ones


def test_channels_last_relu_and_residual():
    ghost = GhostBatchNorm2d(4, 3, activation="relu").double()
    x = (torch.randn(8, 4, 3, 5, dtype=torch.float64) + 0.3).to(memory_format=torch.channels_last)
    z = torch.randn(8, 4, 3, 5, dtype=torch.float64)
    y = ghost(x, residual=z)
    assert y.is_contiguous(memory_format=torch.channels_last)
    ref = torch.cat(
        [
            torch.relu(torch.nn.functional.batch_norm(xv, None, None, training=True) + zv)
            for xv, zv in zip(x.split(3), z.split(3))
        ]
    )
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    assert (y == 0).any() and (y > 0).any()


def test_empty_batch():
    ghost = GhostBatchNorm1d(3, 4)
    y = ghost(torch.randn(0, 3))
    assert y.shape == (0, 3)
    assert torch.equal(ghost.running_mean, torch.zeros(3))


def test_module_surface():
    ghost = GhostBatchNorm3d(4, 16, 1e-3, 0.2)
    assert isinstance(ghost, torch.nn.modules.batchnorm._BatchNorm)
    assert ghost.state_dict().keys() == torch.nn.BatchNorm3d(4).state_dict().keys()
    assert (ghost.virtual_batch_size, ghost.eps, ghost.momentum) == (16, 1e-3, 0.2)
    assert "virtual_batch_size=16" in repr(ghost)
    assert batchnorm.GhostBatchNorm1d is GhostBatchNorm1d


@pytest.mark.parametrize(
    "v, err, match",
    [(0, ValueError, ">= 1"), (2.5, TypeError, "positive int"), (None, TypeError, "int")],
)
def test_bad_virtual_batch_size(v, err, match):
    with pytest.raises(err, match=match):
        GhostBatchNorm1d(3, v)


@pytest.mark.parametrize(
    "shape, v, match",
    [
        ((5, 3), 2, "a virtual batch of 1 sample"),  # 2, 2, 1: the last one has 1 value
        ((4, 3), 1, "a virtual batch of 1 sample"),
        ((4, 3, 2, 2), 2, r"expected 2D or 3D input"),
        ((4, 2), 2, "3 channels"),
    ],
)
def test_bad_input_raises_before_any_virtual_batch_moves(shape, v, match):
    ghost = GhostBatchNorm1d(3, v)
    with pytest.raises(ValueError, match=match):
        ghost(torch.randn(shape))
    assert torch.equal(ghost.running_mean, torch.zeros(3))
    assert torch.equal(ghost.running_var, torch.ones(3))
    assert int(ghost.num_batches_tracked) == 0
