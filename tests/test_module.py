"""The module surface: state_dict, repr, pickling, reset, convert, and isinstance-based tools."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm.modules import _OurBatchNorm
from conftest import assert_close, make_input, module_pair

CLASSES = [
    ("BatchNorm1d", (6, 4, 5)),
    ("BatchNorm2d", (3, 4, 5, 5)),
    ("BatchNorm3d", (2, 4, 3, 3, 3)),
]
OPTIONS = [
    {},
    {"affine": False},
    {"bias": False},
    {"track_running_stats": False},
    {"momentum": None, "eps": 1e-3},
]


@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("name,shape", CLASSES)
def test_surface_matches_torch(name, shape, options):
    ref = getattr(nn, name)(4, **options)
    ours = getattr(batchnorm, name)(4, **options)
    assert isinstance(ours, nn.modules.batchnorm._BatchNorm)
    assert repr(ours) == repr(ref)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in ref.named_buffers()]
    for (n1, t1), (n2, t2) in zip(ours.state_dict().items(), ref.state_dict().items()):
        assert n1 == n2 and t1.dtype == t2.dtype and torch.equal(t1, t2)


@pytest.mark.parametrize("name,shape", CLASSES)
def test_state_dict_round_trip_both_ways(name, shape):
    ref, ours = module_pair(4, len(shape))
    for _ in range(2):
        ref(make_input(shape))
    ours.load_state_dict(ref.state_dict(), strict=True)  # torch -> ours
    back = getattr(nn, name)(4)
    back.load_state_dict(ours.state_dict(), strict=True)  # ours -> torch
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    ours.eval()
    back.eval()
    x = make_input(shape, seed=3)
    assert_close(ours(x), back(x), torch.float32, "eval output after round trip")


def test_state_dict_serialised_file():
    ours = batchnorm.BatchNorm2d(3, momentum=None)
    ours(make_input((2, 3, 4, 4)))
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    buf.seek(0)
    ref = nn.BatchNorm2d(3, momentum=None)
    ref.load_state_dict(torch.load(buf), strict=True)
    assert ref.num_batches_tracked.item() == 1
    assert torch.equal(ref.running_var, ours.running_var)


@pytest.mark.parametrize("how", ["pickle", "deepcopy", "torch.save"])
def test_pickle_and_deepcopy(how):
    ours = batchnorm.BatchNorm2d(3, momentum=0.3, backend="torch")
    ours(make_input((2, 3, 4, 4)))
    if how == "pickle":
        clone = pickle.loads(pickle.dumps(ours))
    elif how == "deepcopy":
        clone = copy.deepcopy(ours)
    else:
        buf = io.BytesIO()
        torch.save(ours, buf)
        buf.seek(0)
        clone = torch.load(buf, weights_only=False)
    assert type(clone) is batchnorm.BatchNorm2d and clone.backend == "torch"
    assert clone.momentum == 0.3
    for k, v in ours.state_dict().items():
        assert torch.equal(clone.state_dict()[k], v)
    x = make_input((2, 3, 4, 4), seed=7)
    torch.testing.assert_close(clone(x), ours(x))


def test_reset_running_stats_and_parameters():
    ours = batchnorm.BatchNorm2d(3)
    with torch.no_grad():
        ours.weight.fill_(2.0)
        ours.bias.fill_(1.0)
    ours(make_input((2, 3, 4, 4)))
    ours.reset_running_stats()
    assert torch.equal(ours.running_mean, torch.zeros(3))
    assert torch.equal(ours.running_var, torch.ones(3))
    assert ours.num_batches_tracked.item() == 0
    assert torch.equal(ours.weight, torch.full((3,), 2.0))
    ours.reset_parameters()
    assert torch.equal(ours.weight, torch.ones(3)) and torch.equal(ours.bias, torch.zeros(3))


def test_flipping_track_running_stats_after_construction():
    """torch then uses the (still present) buffers in eval, and batch stats in training."""
    ref, ours = module_pair(3, 4)
    for m in (ref, ours):
        m(make_input((4, 3, 3, 3)))
        m.track_running_stats = False
    before = ours.running_mean.clone(), ours.running_var.clone()
    x = make_input((4, 3, 3, 3), seed=2)
    assert_close(ours(x), ref(x), torch.float32, "train, flag off")
    assert torch.equal(ours.running_mean, before[0]) and torch.equal(ours.running_var, before[1])
    assert_close(ours.running_mean, ref.running_mean, torch.float32, "running_mean")
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == 1
    ref.eval()
    ours.eval()
    assert_close(ours(x), ref(x), torch.float32, "eval, flag off")


def small_cnn(bn_dims=2):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),  # as in torchvision's ResNets: modifies our output in place
        nn.Sequential(nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8, momentum=None), nn.ReLU()),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
        nn.BatchNorm1d(10, affine=False),
    )


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_convert_small_cnn(mode):
    ref = small_cnn()
    for _ in range(2):  # non-trivial buffers first
        ref(make_input((4, 3, 6, 6), seed=11))
    ref.train(mode == "train")
    ours = copy.deepcopy(ref)
    weight_before = ours[1].weight
    out = batchnorm.convert(ours)
    assert out is ours
    kinds = [type(m) for m in ours.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert kinds == [batchnorm.BatchNorm2d, batchnorm.BatchNorm2d, batchnorm.BatchNorm1d]
    assert ours[1].weight is weight_before  # same Parameter objects: optimizers keep working
    assert all(m.training == (mode == "train") for m in ours.modules())
    assert ours[3][1].momentum is None and ours[6].affine is False
    x = make_input((4, 3, 6, 6), seed=12)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yo = ref(xr), ours(xo)
    assert_close(yo, yr, torch.float32, "output")
    yr.pow(2).sum().backward()
    yo.pow(2).sum().backward()
    assert_close(xo.grad, xr.grad, torch.float32, "grad_input", 100)
    for (n, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
        assert_close(a.grad, b.grad, torch.float32, f"grad {n}", 100)
    for (n, a), (_, b) in zip(ours.named_buffers(), ref.named_buffers()):
        if a.is_floating_point():
            assert_close(a, b, torch.float32, n)
        else:
            assert torch.equal(a, b), n


def test_convert_bare_module_and_backend():
    bn = nn.BatchNorm3d(5, eps=1e-3, momentum=0.2)
    bn.eval()
    ours = batchnorm.convert(bn, backend="torch")
    assert type(ours) is batchnorm.BatchNorm3d and ours.backend == "torch"
    assert not ours.training and ours.eps == 1e-3 and ours.momentum == 0.2
    assert ours.weight is bn.weight and ours.running_var is bn.running_var
    with pytest.raises(ValueError, match="backend must be one of"):
        batchnorm.convert(bn, backend="cuda")


def test_swa_update_bn_on_our_modules():
    """torch.optim.swa_utils.update_bn finds our modules and recomputes cumulative averages."""
    model = batchnorm.convert(small_cnn())
    data = [make_input((4, 3, 6, 6), seed=s) for s in range(3)]
    torch.optim.swa_utils.update_bn(data, model)
    ref = small_cnn()
    ref.load_state_dict(model.state_dict())
    for m in ref.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    ref.train()
    with torch.no_grad():
        for x in data:
            ref(x)
    for (n, a), (_, b) in zip(model.named_buffers(), ref.named_buffers()):
        if a.is_floating_point():
            assert_close(a, b, torch.float32, n)
    assert model[1].momentum == 0.1  # update_bn restores momenta


def test_fuse_conv_bn_eval_on_ours():
    conv = nn.Conv2d(3, 4, 3).eval()
    bn = batchnorm.BatchNorm2d(4)
    bn(torch.randn(8, 4, 5, 5) * 3 + 1)
    bn.eval()
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
    x = torch.randn(2, 3, 7, 7)
    torch.testing.assert_close(fused(x), bn(conv(x)), rtol=1e-5, atol=1e-5)


def test_torch_convert_sync_batchnorm_finds_ours():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), batchnorm.BatchNorm2d(4))
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(converted[1], nn.SyncBatchNorm)
    assert isinstance(batchnorm.BatchNorm2d(3), _OurBatchNorm)


@pytest.mark.parametrize("backend", ["torch", "numba"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_inplace_op_on_output(backend, channels_last):
    """In-place ops on our output (+=, ReLU(inplace=True)) work and give torch's grads."""
    x = make_input((3, 4, 5, 5), channels_last=channels_last)
    ref, ours = module_pair(4, 4, backend=backend)
    grads = []
    for m in (ref, ours):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y += 1.0
        y.relu_()
        y.pow(2).sum().backward()
        grads.append((xi.grad, m.weight.grad, m.bias.grad))
    for a, b in zip(*grads):
        assert_close(b, a, torch.float32, "grad", 75)


def test_torch_compile_runs_our_batch_norm_eagerly():
    """torch.compile of a model with our BatchNorm2d: our batch norm runs eagerly between the
    compiled parts (a graph break), with torch's numbers and buffers."""
    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), batchnorm.BatchNorm2d(8), torch.nn.ReLU())
    ref = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    ref.load_state_dict(ours.state_dict())
    compiled = torch.compile(ours)
    x = torch.randn(4, 3, 10, 10)
    y, y_ref = compiled(x), ref(x)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    assert_close(y, y_ref, torch.float32)
    # (the conv's weight gradient sums 2k products, in inductor's order on one side)
    torch.testing.assert_close(ours[0].weight.grad, ref[0].weight.grad, rtol=1e-4, atol=1e-4)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(getattr(ours[1], name).double(), getattr(ref[1], name).double())
