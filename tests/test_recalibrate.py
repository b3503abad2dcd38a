"""batchnorm.recalibrate: the cumulative average by hand, torch's swa_utils.update_bn as a
second reference, and everything restored afterwards (momentum, modes; buffers on error)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

import batchnorm
from batchnorm.recalibration import recalibrate


def _batches(k=5, n=8, f=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    # batches of different sizes and offsets: each counts once, whatever its size
    return [torch.randn(n + i, f, generator=g, dtype=torch.float64) * (1 + i) + i for i in range(k)]


def _model(bn_cls=nn.BatchNorm1d, **kw):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 6), bn_cls(6, **kw), nn.ReLU(), nn.Linear(6, 3), nn.BatchNorm1d(3)
    ).double()


@pytest.mark.parametrize("bn_cls", [nn.BatchNorm1d, batchnorm.BatchNorm1d])
def test_cumulative_average_by_hand(bn_cls):
    model = _model(bn_cls, momentum=0.3)
    batches = _batches()
    out = recalibrate(model, batches, progress=False)
    assert out is model
    # the first batch norm sees Linear(x): its buffers are the plain average of the batches'
    # means and unbiased variances
    with torch.no_grad():
        h = [model[0](x).numpy() for x in batches]
    mean = np.mean([hb.mean(0) for hb in h], axis=0)
    var = np.mean([hb.var(0, ddof=1) for hb in h], axis=0)
    np.testing.assert_allclose(model[1].running_mean.numpy(), mean, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(model[1].running_var.numpy(), var, rtol=1e-12)
    assert int(model[1].num_batches_tracked) == len(batches)
    assert model[1].momentum == 0.3  # restored


def test_matches_torch_update_bn_and_ignores_old_buffers():
    ours, theirs = _model(batchnorm.BatchNorm1d), _model(nn.BatchNorm1d)
    with torch.no_grad():  # stale statistics that must not leak into the result
        for m in (ours[1], ours[4]):
            m.running_mean.fill_(100.0)
            m.running_var.fill_(50.0)
            m.num_batches_tracked.fill_(7)
    batches = _batches(seed=1)
    recalibrate(ours, batches, progress=False)
    update_bn(batches, theirs)
    for i in (1, 4):
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(
                getattr(ours[i], name), getattr(theirs[i], name), rtol=1e-12, atol=1e-14
            )


def test_dropout_runs_in_eval_mode():
    torch.manual_seed(0)
    with_dropout = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.BatchNorm1d(6)).double()
    without = copy.deepcopy(with_dropout)
    without[1] = nn.Identity()
    batches = _batches(seed=2)
    recalibrate(with_dropout, batches, progress=False)
    update_bn(batches, without)
    torch.testing.assert_close(with_dropout[2].running_var, without[2].running_var)
    torch.testing.assert_close(with_dropout[2].running_mean, without[2].running_mean)


def test_modes_and_momentum_restored():
    model = _model(batchnorm.BatchNorm1d, momentum=None)
    model.eval()
    model[3].train()  # a mix of modes comes back as it was
    model[4].momentum = 0.05
    recalibrate(model, _batches(), progress=False)
    assert [m.training for m in model.modules()] == [False, False, False, False, True, False]
    assert model[1].momentum is None and model[4].momentum == 0.05


def test_input_target_tuples_generators_and_device():
    model1, model2 = _model(), _model()
    batches = _batches(seed=3)
    recalibrate(model1, [(x, torch.zeros(len(x))) for x in batches], progress=False)
    recalibrate(model2, ([x, "label"] for x in batches), progress=False, device="cpu")
    for a, b in zip(model1.buffers(), model2.buffers()):
        assert torch.equal(a, b)


def test_ghost_counts_virtual_batches_and_renorm_runs_as_batch_norm():
    torch.manual_seed(0)
    model = nn.Sequential(
        batchnorm.GhostBatchNorm1d(4, virtual_batch_size=5),
        batchnorm.BatchRenorm1d(4, r_max=1.5, d_max=0.5),
    ).double()
    batches = _batches(k=3, n=8)  # sizes 8, 9, 10: virtual batches 5+3, 5+4, 5+5
    recalibrate(model, batches, progress=False)
    assert int(model[0].num_batches_tracked) == 6
    virtual = [v.numpy() for x in batches for v in x.split(5)]
    np.testing.assert_allclose(
        model[0].running_mean.numpy(), np.mean([v.mean(0) for v in virtual], 0), rtol=1e-12
    )
    # the renorm layer saw the ghost layer's outputs; as plain batch norm, its statistics
    # are those of the ghost outputs, batch by batch
    with torch.no_grad():
        ghost_out = [
            torch.cat(
                [(v - v.mean(0)) / (v.var(0, correction=0) + 1e-5).sqrt() for v in x.split(5)]
            )
            for x in batches
        ]
    var = np.mean([o.var(0, correction=1).numpy() for o in ghost_out], 0)
    np.testing.assert_allclose(model[1].running_var.numpy(), var, rtol=1e-10)
    assert (model[1].r_max, model[1].d_max) == (1.5, 0.5)  # restored


def test_progress_bar_on_stderr(capsys):
    recalibrate(_model(), _batches(k=3), progress=True)
    captured = capsys.readouterr()
    assert "recalibrating batch norms" in captured.err and "3/3" in captured.err
    assert captured.out == ""
    recalibrate(_model(), _batches(k=3), progress=False)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_error_mid_way_restores_everything():
    model = _model(momentum=0.2)
    with torch.no_grad():
        model[1].running_mean.fill_(3.0)
    before = copy.deepcopy(model.state_dict())
    model.eval()
    batches = _batches(k=3)
    batches[2] = torch.randn(4, 5, dtype=torch.float64)  # wrong width: Linear raises
    with pytest.raises(RuntimeError):
        recalibrate(model, batches, progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model[1].momentum == 0.2 and not any(m.training for m in model.modules())


@pytest.mark.parametrize(
    "data, err, match",
    [
        ([], ValueError, "yielded none"),
        (iter(()), ValueError, "yielded none"),
        ([{"x": torch.randn(2, 4)}], TypeError, "tensors or \\(input, target\\)"),
        ([()], ValueError, "empty tuple"),
    ],
)
def test_bad_data_raises_before_anything_moves(data, err, match):
    model = _model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(err, match=match):
        recalibrate(model, data, progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training


def test_no_batch_norm_and_not_a_module():
    with pytest.raises(ValueError, match="no batch norm"):
        recalibrate(
            nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2, track_running_stats=False)), []
        )
    with pytest.raises(TypeError, match="torch.nn.Module"):
        recalibrate("model", [])


def test_lazy_export():
    assert batchnorm.recalibrate is recalibrate
