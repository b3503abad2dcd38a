"""SyncBatchNorm against one torch.nn.BatchNorm*d over the concatenated batch.

Processes are spawned once per world size (gloo on 127.0.0.1) and run every case of
``_sync_worker.parity_cases`` plus the error, subgroup and DDP cases inside that one group;
the tests below compare what each rank returned. Shards (3, 5), (2, 0, 4), (1, 1, 1).
"""

from __future__ import annotations

import copy
import functools
import glob
import os
import pickle
import sys
import tempfile
import time

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import SyncBatchNorm

sys.path.insert(0, os.path.dirname(__file__))  # spawned processes import the worker by name
import _sync_worker as W  # noqa: E402

try:
    import fcntl
except ImportError:  # not POSIX: each xdist worker spawns its own groups
    fcntl = None

WORLDS = (2, 3)
# float64: one rounding of the merge (~1e-16) per value; float32: its own rounding
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


@functools.cache
def group_results(world: int) -> tuple[dict, ...]:
    """Each rank's results; spawned once per world size and test run."""
    results = _shared_between_xdist_workers(world)
    for rank, r in enumerate(results):
        if "crash" in r:
            pytest.fail(f"rank {rank} of {world} crashed:\n{r['crash']}")
    return tuple(results)


def _remove_stale_results(max_age_s: float = 3600) -> None:
    """Earlier runs' files (about 1 MB a run): nobody reads them after their run."""
    for path in glob.glob(os.path.join(tempfile.gettempdir(), "batchnorm-test-sync-*")):
        try:
            if time.time() - os.path.getmtime(path) > max_age_s:
                os.remove(path)
        except OSError:  # another worker removed it first
            pass


def _shared_between_xdist_workers(world: int) -> list[dict]:
    """Under pytest-xdist, the first worker to need a world size spawns it and leaves the
    results in a file for the others (a spawn costs seconds on 2 cores; two at once, more)."""
    run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run_id is None or fcntl is None:
        return W.run_group(world)
    _remove_stale_results()
    path = os.path.join(tempfile.gettempdir(), f"batchnorm-test-sync-{run_id}-{world}.pt")
    # one lock for every world size: two groups at once would share the cores
    lock_path = os.path.join(tempfile.gettempdir(), f"batchnorm-test-sync-{run_id}.lock")
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if os.path.exists(path):
            return torch.load(path)
        results = W.run_group(world)
        torch.save(results, path + ".tmp")
        os.replace(path + ".tmp", path)
    return results


def close(actual, expected, dtype, what):
    torch.testing.assert_close(
        actual.double(), expected.double(), **TOL[dtype], msg=lambda m: f"{what}: {m}"
    )


def reference(case: dict) -> dict:
    """torch's BatchNorm over the whole batch (float64), the same two steps, then eval."""
    dtype, pd = case["dtype"], W.param_dtype(case["dtype"])
    ndim = 2 + len(W.SPATIAL[case["layout"]])
    ref = W.TORCH_CLASS[ndim](
        case["channels"], momentum=case["momentum"], affine=case["affine"],
        track_running_stats=case["track"], dtype=torch.float64,
    )  # fmt: skip
    if case["affine"]:
        w, b = W.case_params(case)
        with torch.no_grad():  # the values the ranks hold, after rounding to their dtype
            ref.weight.copy_(w.to(pd))
            ref.bias.copy_(b.to(pd))
    out: dict = {"steps": []}
    for step in range(2):
        x_full, dy_full = W.case_data(case, step)
        x = x_full.to(dtype).double().requires_grad_()
        y = ref(x)
        y.backward(dy_full.to(dtype).double())
        rec = {"y": y.detach(), "dx": x.grad}
        if case["affine"]:
            rec["dw"], rec["db"] = ref.weight.grad.clone(), ref.bias.grad.clone()
            ref.weight.grad = ref.bias.grad = None
        out["steps"].append(rec)
    ref.eval()
    x_full, _ = W.case_data(case, 2)
    x_full = x_full.to(dtype).double()
    with torch.no_grad():
        if case["track"]:
            out["y_eval"] = ref(x_full)
        else:  # no buffers: each rank normalises its own shard with its own statistics
            parts = [ref(W.shard_of(x_full, case["shards"], r)) for r in range(len(case["shards"]))]
            out["y_eval"] = torch.cat(parts)
    if case["track"]:
        out["running_mean"], out["running_var"] = ref.running_mean, ref.running_var
        out["num_batches_tracked"] = ref.num_batches_tracked
    return out


def check_case(case: dict, per_rank: list[dict]) -> None:
    """Every rank's outputs, grad_input, buffers; weight/bias grads summed over the ranks."""
    ref = reference(case)
    dtype, shards = case["dtype"], case["shards"]
    for step in range(2):
        r_step = ref["steps"][step]
        for rank, got in enumerate(per_rank):
            s = got["steps"][step]
            where = f"{case['id']} step {step} rank {rank}"
            close(s["y"], W.shard_of(r_step["y"], shards, rank), dtype, f"y {where}")
            close(s["dx"], W.shard_of(r_step["dx"], shards, rank), dtype, f"dx {where}")
            if case["layout"] == "4d_cl":
                assert s["channels_last"], f"{where}: output lost channels_last"
        if case["affine"]:
            dw = sum(got["steps"][step]["dw"] for got in per_rank)
            db = sum(got["steps"][step]["db"] for got in per_rank)
            close(dw, r_step["dw"], dtype, f"{case['id']} step {step}: weight.grad summed")
            close(db, r_step["db"], dtype, f"{case['id']} step {step}: bias.grad summed")
    for rank, got in enumerate(per_rank):
        where = f"{case['id']} rank {rank}"
        close(got["y_eval"], W.shard_of(ref["y_eval"], shards, rank), dtype, f"eval {where}")
        if case["track"]:
            close(got["running_mean"], ref["running_mean"], dtype, f"running_mean {where}")
            close(got["running_var"], ref["running_var"], dtype, f"running_var {where}")
            assert int(got["num_batches_tracked"]) == int(ref["num_batches_tracked"]) == 2
            # identical, not merely close: every rank merged the same gathered table
            assert torch.equal(got["running_mean"], per_rank[0]["running_mean"]), where
            assert torch.equal(got["running_var"], per_rank[0]["running_var"]), where


# ---------------------------------------------------------------- spawned groups


@pytest.mark.parametrize(
    "world, case_id",
    [(world, c["id"]) for world in WORLDS for c in W.parity_cases(world)],
)
def test_matches_one_batchnorm_over_the_whole_batch(world, case_id):
    case = next(c for c in W.parity_cases(world) if c["id"] == case_id)
    results = group_results(world)
    check_case(case, [r["cases"][case_id] for r in results])


@pytest.mark.parametrize("world", WORLDS)
def test_one_value_per_channel_over_the_group_raises_the_same_error_everywhere(world):
    results = group_results(world)
    errors = [r["errors"]["single_value"] for r in results]
    assert {e["type"] for e in errors} == {"ValueError"}
    assert len({e["message"] for e in errors}) == 1, "every rank must raise the same message"
    message = errors[0]["message"]
    assert message.startswith("Expected more than 1 value per channel when training")
    assert f"values per channel by rank: {[1] + [0] * (world - 1)}" in message
    for r in results:  # raised before any buffer moved
        nbt, running_mean = r["errors"]["single_value_state"]
        assert int(nbt) == 0 and torch.equal(running_mean, torch.zeros(W.C, dtype=torch.float64))


@pytest.mark.parametrize("world", WORLDS)
def test_a_bad_shard_on_one_rank_raises_on_every_rank(world):
    results = group_results(world)
    for rank, r in enumerate(results):
        err = r["errors"]["channels"]
        assert err["type"] == "ValueError"
        if rank == 1:  # its own, precise error
            assert "expected input with 3 channels (num_features)" in err["message"]
        else:  # the others name the rank and what it sent
            assert "rank 1: 4 channels, torch.float64" in err["message"], err["message"]
        assert int(r["errors"]["channels_nbt"]) == 0
        err = r["errors"]["dims"]
        expected = "expected 2D or 3D or 4D or 5D input (got 1D input)"
        assert err["type"] == "ValueError"
        assert (expected if rank == 1 else "rank 1: no channel dim") in err["message"]


@pytest.mark.parametrize("world", WORLDS)
def test_ranks_with_different_dtypes_raise_the_same_error(world):
    results = group_results(world)
    errors = [r["errors"]["dtype"] for r in results]
    assert {e["type"] for e in errors} == {"ValueError"}
    assert len({e["message"] for e in errors}) == 1
    assert "differ in dtype" in errors[0]["message"]
    assert "torch.bfloat16" in errors[0]["message"]
    assert all(int(r["errors"]["dtype_nbt"]) == 0 for r in results)


@pytest.mark.parametrize("world", WORLDS)
def test_layers_built_with_different_num_features_raise_everywhere(world):
    results = group_results(world)
    errors = [r["errors"]["num_features"] for r in results]
    expected = [W.C + r % 2 for r in range(world)]
    for e in errors:
        assert e["type"] == "ValueError"
        assert f"num_features by rank {expected}" in e["message"]


@pytest.mark.parametrize("world", WORLDS)
def test_double_backward_raises_on_every_rank(world):
    for r in group_results(world):
        err = r["errors"]["double_backward"]
        assert err["type"] == "RuntimeError" and "once_differentiable" in err["message"]


@pytest.mark.parametrize("world", WORLDS)
def test_forward_ad_and_torch_func_are_refused_on_every_rank(world):
    """A tangent on rank 0 alone: rank 0 says why, the others name rank 0; vmap everywhere."""
    for rank, r in enumerate(group_results(world)):
        err = r["errors"]["forward_ad"]
        if rank == 0:
            assert err["type"] == "NotImplementedError", err
            assert "reverse-mode autograd only" in err["message"]
        else:
            assert err["type"] == "ValueError", err
            assert "invalid input on another rank (rank 0: 3 channels" in err["message"]
        err = r["errors"]["vmap"]
        assert err["type"] == "NotImplementedError" and "torch.func" in err["message"], err
        assert int(r["errors"]["transforms_nbt"]) == 0


@pytest.mark.parametrize("world", WORLDS)
def test_the_group_stays_in_step_after_the_errors(world):
    results = group_results(world)
    case = W._case((2,) * world, "4d", 0.1, "torch")
    check_case(case, [r["errors"]["after_errors"] for r in results])


@pytest.mark.parametrize("world", WORLDS)
def test_a_group_of_one_process_is_plain_batchnorm(world):
    """Each rank in its own group: torch's BatchNorm2d over the rank's shard alone."""
    results = group_results(world)
    for rank, r in enumerate(results):
        case = W._case((3, 4, 2)[:world], "4d", None, "auto")
        case["id"] += "_alone"
        got = r["subgroups"]["alone"]
        dtype = case["dtype"]
        ref = nn.BatchNorm2d(W.C, momentum=None, dtype=torch.float64)
        w, b = W.case_params(case)
        with torch.no_grad():
            ref.weight.copy_(w)
            ref.bias.copy_(b)
        for step in range(2):
            x_full, dy_full = W.case_data(case, step)
            x = W.shard_of(x_full, case["shards"], rank).clone().requires_grad_()
            y = ref(x)
            y.backward(W.shard_of(dy_full, case["shards"], rank))
            close(got["steps"][step]["y"], y.detach(), dtype, f"alone y rank {rank}")
            close(got["steps"][step]["dx"], x.grad, dtype, f"alone dx rank {rank}")
            close(got["steps"][step]["dw"], ref.weight.grad, dtype, f"alone dw rank {rank}")
            ref.weight.grad = ref.bias.grad = None
        close(got["running_var"], ref.running_var, dtype, f"alone running_var rank {rank}")


@pytest.mark.parametrize("world", WORLDS)
def test_process_group_argument_syncs_over_that_group_only(world):
    results = group_results(world)
    case = W._case((2, 5), "3d", 0.1, "torch")
    case["id"] += "_pair"
    check_case(case, [results[0]["subgroups"]["pair"], results[-1]["subgroups"]["pair"]])
    for r in results[1:-1]:
        err = r["subgroups"]["outside"]
        assert err["type"] == "ValueError" and "not a member" in err["message"]


def test_ddp_with_sync_batchnorm_trains_like_one_process():
    """DDP averages equal shards' gradients: the same as one process's mean loss."""
    results = group_results(2)
    model = W.ddp_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(W.DDP_STEPS):
        x, target = W.ddp_data(step)
        loss = ((model(x) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    expected = model.state_dict()
    for rank, r in enumerate(results):
        assert r["ddp"].keys() == expected.keys()
        for k, v in expected.items():
            close(r["ddp"][k], v, torch.float64, f"DDP rank {rank} {k}")


# ---------------------------------------------------------------- one process, no group


@pytest.mark.parametrize("ndim", [2, 3, 4, 5])
@pytest.mark.parametrize("training", [True, False])
def test_without_a_process_group_it_is_batchnorm(ndim, training):
    shape = {2: (6, 3), 3: (2, 3, 7), 4: (1, 3, 3, 2), 5: (2, 3, 1, 2, 3)}[ndim]
    ref = W.TORCH_CLASS[ndim](3, dtype=torch.float64)
    ours = SyncBatchNorm(3, dtype=torch.float64, backend="torch")
    with torch.no_grad():
        ref.weight.copy_(torch.tensor([0.5, 1.5, 2.0]))
        ref.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
        ref.running_mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
        ref.running_var.copy_(torch.tensor([0.5, 2.0, 4.0]))
    ours.load_state_dict(ref.state_dict())
    ref.train(training)
    ours.train(training)
    x = torch.randn(shape, dtype=torch.float64) * 2 + 3
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn(shape, dtype=torch.float64)
    y_ref = ref(xr)
    y_ref.backward(dy)
    y = ours(xo)
    y.backward(dy)
    close(y, y_ref, torch.float64, "y")
    close(xo.grad, xr.grad, torch.float64, "dx")
    close(ours.weight.grad, ref.weight.grad, torch.float64, "dw")
    for name, buf in ref.state_dict().items():
        close(ours.state_dict()[name], buf, torch.float64, name)


def test_without_a_process_group_validation_comes_before_the_buffers():
    bn = SyncBatchNorm(3)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        bn(torch.randn(1, 3))
    with pytest.raises(ValueError, match=r"expected 2D or 3D or 4D or 5D input \(got 1D input\)"):
        bn(torch.randn(3))
    with pytest.raises(ValueError, match="expected input with 3 channels"):
        bn(torch.randn(4, 2))
    assert int(bn.num_batches_tracked) == 0
    assert torch.equal(bn.running_var, torch.ones(3))


def test_signature_attributes_and_state_dict_follow_torch():
    group = object()  # stands for a ProcessGroup; only stored until the first forward
    ours = SyncBatchNorm(4, 1e-3, 0.2, True, True, group)  # torch's positional order
    theirs = nn.SyncBatchNorm(4, 1e-3, 0.2, True, True, None)
    assert ours.process_group is group and (ours.eps, ours.momentum) == (1e-3, 0.2)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    assert isinstance(ours, torch.nn.modules.batchnorm._BatchNorm)
    assert batchnorm.SyncBatchNorm is SyncBatchNorm
    with pytest.raises(ValueError, match="backend must be one of"):
        SyncBatchNorm(4, backend="cuda")


def test_convert_sync_batchnorm_keeps_state_and_mode():
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.BatchNorm2d(3),
        nn.Sequential(batchnorm.BatchNorm1d(5, backend="torch"), nn.BatchNorm3d(2)),
        nn.SyncBatchNorm(4, affine=False),
        nn.ReLU(),
    )
    model[1].eval()
    with torch.no_grad():
        model[1].running_mean.fill_(0.25)
        model[1].num_batches_tracked.fill_(7)
    weight, running_mean = model[1].weight, model[1].running_mean
    group = object()
    converted = SyncBatchNorm.convert_sync_batchnorm(model, process_group=group)
    assert converted is model
    bns = [model[1], model[2][0], model[2][1], model[3]]
    assert all(type(m) is SyncBatchNorm for m in bns)
    assert all(m.process_group is group for m in bns)
    assert model[1].weight is weight and model[1].running_mean is running_mean
    assert int(model[1].num_batches_tracked) == 7
    assert [m.training for m in bns] == [False, True, True, True]
    assert model[2][0].backend == "torch" and model[1].backend == "auto"
    assert model[3].weight is None and model[3].affine is False
    assert type(model[0]) is nn.Conv2d and type(model[4]) is nn.ReLU
    # the eval'ed layer normalises with the buffers it brought along
    x = torch.randn(2, 3, 4, 4)
    ref = nn.BatchNorm2d(3).eval()
    ref.load_state_dict(model[1].state_dict())
    close(model[1](x), ref(x), torch.float32, "converted eval")
    # a bare layer is converted and returned
    assert type(SyncBatchNorm.convert_sync_batchnorm(nn.BatchNorm1d(2))) is SyncBatchNorm


def test_convert_refuses_a_fused_activation():
    with pytest.raises(ValueError, match="no fused activation"):
        SyncBatchNorm.convert_sync_batchnorm(batchnorm.BatchNorm2d(3, activation="relu"))


def test_copies_and_pickles():
    bn = SyncBatchNorm(3)
    bn(torch.randn(4, 3))
    bn._agreed_on = (123, 2)  # as after the num_features check over some group
    for clone in (copy.deepcopy(bn), pickle.loads(pickle.dumps(bn))):
        assert type(clone) is SyncBatchNorm and clone.process_group is None
        assert clone._agreed_on is None, "a copy must compare num_features again"
        close(clone.running_mean, bn.running_mean, torch.float32, "copied running_mean")
