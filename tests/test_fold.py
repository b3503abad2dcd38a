"""batchnorm.fold: outputs unchanged, the weights equal to the folding formula by hand, batch
norms gone where they fold and kept where they must not, the original model untouched."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

import batchnorm
from batchnorm.folding import fold


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so the folding has work to do."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                C = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(C, generator=g))
                    m.running_var.copy_(torch.rand(C, generator=g) * 2 + 0.1)
                if m.weight is not None:
                    m.weight.copy_(torch.randn(C, generator=g))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(C, generator=g))
    return model


def _bns(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def _check(model, x, *, n_left=0, rtol=1e-5, atol=1e-5):
    """fold(model) gives model's outputs, leaves n_left batch norms, and leaves model as it was."""
    model = _randomize(model).eval()
    before = copy.deepcopy(model.state_dict())
    types_before = [type(m) for m in model.modules()]
    folded = fold(model)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=rtol, atol=atol)
    assert len(_bns(folded)) == n_left
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [type(m) for m in model.modules()] == types_before
    assert not folded.training
    return folded


@pytest.mark.parametrize(
    "layer, bn, shape",
    [
        (nn.Conv1d(3, 5, 3, bias=False), nn.BatchNorm1d(5), (2, 3, 9)),
        (nn.Conv2d(3, 4, 3, padding=1), batchnorm.BatchNorm2d(4), (2, 3, 6, 5)),
        (
            nn.Conv2d(4, 4, 3, groups=4, padding_mode="reflect", padding=1),
            nn.BatchNorm2d(4),
            (1, 4, 5, 5),
        ),  # fmt: skip
        (
            nn.Conv2d(6, 4, 3, groups=2, dilation=2, stride=2),
            nn.BatchNorm2d(4, affine=False),
            (3, 6, 9, 9),
        ),  # fmt: skip
        (nn.Conv3d(2, 3, 2, bias=False), batchnorm.BatchNorm3d(3, eps=1e-3), (2, 2, 3, 4, 4)),
        (nn.Linear(7, 5), nn.BatchNorm1d(5), (4, 7)),
        (nn.Linear(7, 1, bias=False), batchnorm.BatchNorm1d(1), (3, 7)),
        (nn.Conv2d(3, 4, 1), batchnorm.BatchRenorm2d(4), (2, 3, 4, 4)),
        (nn.Conv2d(3, 4, 1), batchnorm.GhostBatchNorm2d(4, 2), (2, 3, 4, 4)),
        (nn.Conv2d(3, 4, 1), nn.SyncBatchNorm(4), (2, 3, 4, 4)),
    ],
)
def test_pairs_fold_to_the_formula(layer, bn, shape):
    model = nn.Sequential(layer, bn)
    x = torch.randn(shape)
    folded = _check(model, x)
    assert isinstance(folded, nn.Sequential) and isinstance(folded[1], nn.Identity)
    # W' = W * s and b' = (b - running_mean) * s + beta by hand, in float64
    bn, layer = model[1], model[0]
    w = torch.ones(bn.num_features) if bn.weight is None else bn.weight.detach()
    beta = torch.zeros(bn.num_features) if bn.bias is None else bn.bias.detach()
    s = w.double() / (bn.running_var.double() + bn.eps).sqrt()
    b = torch.zeros(bn.num_features) if layer.bias is None else layer.bias.detach()
    view = (-1,) + (1,) * (layer.weight.dim() - 1)
    torch.testing.assert_close(folded[0].weight, (layer.weight.double() * s.view(view)).float())
    torch.testing.assert_close(folded[0].bias, ((b - bn.running_mean) * s + beta).float())
    assert folded[0].bias is not None  # created when the layer had none


def test_float64_to_tight_tolerance():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).double()
    _check(model, torch.randn(2, 3, 7, 7, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_nested_sequentials_and_fused_relu():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False),
        batchnorm.BatchNorm2d(8, activation="relu"),
        nn.Sequential(
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4)),
        ),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 6),
        nn.BatchNorm1d(6),
    )
    folded = _check(model, torch.randn(3, 3, 9, 9))
    assert isinstance(folded[1], nn.ReLU)  # the fused activation stays
    assert isinstance(folded[2][1], nn.Identity) and isinstance(folded[2][3][1], nn.Identity)
    assert type(folded) is nn.Sequential


class Block(nn.Module):
    """A residual block whose pairs live in forward, not in a Sequential: fx's job."""

    def __init__(self, c: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = batchnorm.BatchNorm2d(c, activation="relu")
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.head = nn.Sequential(nn.Conv2d(c, 2, 1), nn.BatchNorm2d(2))

    def forward(self, x):
        y = self.bn1(self.conv1(x))
        y = torch.relu(self.bn2(self.conv2(y)) + x)
        return self.head(y)


def test_fx_traced_model():
    folded = _check(Block(), torch.randn(2, 4, 6, 6))
    assert isinstance(folded, fx.GraphModule)
    assert not hasattr(folded, "bn1") and not hasattr(folded, "bn2")


def test_fx_leaves_shared_outputs_and_residual_calls():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.conv2 = nn.Conv2d(3, 4, 3)
            self.bn2 = batchnorm.BatchNorm2d(4, activation="relu")

        def forward(self, x):
            y = self.conv(x)  # used by the batch norm and by the sum: must not fold
            z = self.bn2(self.conv2(x), residual=y)  # residual=: must not fold
            return self.bn(y) + y + z

    folded = _check(Twice(), torch.randn(2, 3, 6, 6), n_left=2)
    assert isinstance(folded, Twice)  # nothing folded: the model keeps its class


def test_shared_layer_is_not_folded():
    conv = nn.Conv2d(3, 3, 1)
    model = nn.Sequential(conv, nn.BatchNorm2d(3), conv, nn.BatchNorm2d(3))
    _check(model, torch.randn(2, 3, 4, 4), n_left=2)


def test_batch_norm_without_running_stats_or_first_stays():
    model = nn.Sequential(
        nn.BatchNorm2d(3),  # nothing before it
        nn.Conv2d(3, 4, 1),
        nn.BatchNorm2d(4, track_running_stats=False),  # uses batch statistics in eval
        nn.Conv2d(4, 4, 1),
        nn.ReLU(),
        nn.BatchNorm2d(4),  # after a ReLU, not a layer
    )
    _check(model, torch.randn(2, 3, 4, 4), n_left=3)


def test_untraceable_model_warns_and_keeps_sequential_folding():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.bn = nn.BatchNorm2d(4)
            self.seq = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
                x = x * 2
            return self.seq(self.bn(self.conv(x)))

    model = _randomize(Branchy()).eval()
    with pytest.warns(UserWarning, match="could not trace Branchy"):
        folded = fold(model)
    assert isinstance(folded.seq[1], nn.Identity) and isinstance(folded.bn, nn.BatchNorm2d)
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x))


def test_training_mode_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match=r"the model is in training mode.*model.eval\(\)"):
        fold(model)
    model.eval()
    model[1].train()  # a batch norm left in training mode inside an eval model
    with pytest.raises(ValueError, match="1 is in training mode"):
        fold(model)
    assert model[1].training and isinstance(model[1], nn.BatchNorm2d)


def test_not_a_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fold(lambda x: x)


def test_lazy_export():
    assert batchnorm.fold is fold


class _ScaledLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2 + 1


class _StandardisedConv(nn.Conv2d):
    def forward(self, x):
        w = self.weight
        w = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (w.std(dim=(1, 2, 3), keepdim=True) + 1e-5)
        return self._conv_forward(x, w, self.bias)


class _PlainSubclass(nn.Conv2d):  # no forward of its own: still the affine map
    pass


@pytest.mark.parametrize(
    "layer, bn, shape, folds",
    [
        (_ScaledLinear(3, 4), nn.BatchNorm1d(4), (5, 3), False),
        (_StandardisedConv(3, 4, 3), batchnorm.BatchNorm2d(4), (2, 3, 6, 6), False),
        (_PlainSubclass(3, 4, 3), nn.BatchNorm2d(4), (2, 3, 6, 6), True),
    ],
    ids=["scaled_linear", "standardised_conv", "plain_subclass"],
)
def test_layer_subclasses_with_their_own_forward_are_left_alone(layer, bn, shape, folds):
    """A Conv/Linear subclass overriding forward is not the affine map folding assumes:
    folding it changed outputs by up to 25 (found by a fuzzing helper)."""
    torch.manual_seed(0)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    model = nn.Sequential(layer, bn).eval()
    x = torch.randn(shape)
    folded = fold(model)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    assert isinstance(folded[1], nn.Identity) == folds
