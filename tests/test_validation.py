"""Bad input: a clear ValueError/TypeError naming what was expected, and nothing moves."""

from __future__ import annotations

import re

import pytest
import torch

import batchnorm
import batchnorm.functional as BF


def snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def assert_unchanged(m, before):
    after = m.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} changed on a failed call"


@pytest.mark.parametrize(
    "cls,x,message",
    [
        (batchnorm.BatchNorm2d, torch.randn(2, 3, 4), "expected 4D input (got 3D input)"),
        (batchnorm.BatchNorm2d, torch.randn(2, 3, 4, 4, 4), "expected 4D input (got 5D input)"),
        (batchnorm.BatchNorm1d, torch.randn(2, 3, 4, 4), "expected 2D or 3D input (got 4D input)"),
        (batchnorm.BatchNorm1d, torch.randn(3), "expected 2D or 3D input (got 1D input)"),
        (batchnorm.BatchNorm3d, torch.randn(2, 3, 4, 4), "expected 5D input (got 4D input)"),
        (batchnorm.BatchNorm2d, torch.randn(2, 5, 4, 4), "expected input with 3 channels"),
        (batchnorm.BatchNorm1d, torch.randn(4, 2), "expected input with 3 channels"),
        (
            batchnorm.BatchNorm2d,
            torch.randn(1, 3, 1, 1),
            "Expected more than 1 value per channel when training, "
            "got input size torch.Size([1, 3, 1, 1])",
        ),
        (
            batchnorm.BatchNorm1d,
            torch.randn(1, 3),
            "Expected more than 1 value per channel when training, "
            "got input size torch.Size([1, 3])",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_value_errors_change_nothing(cls, x, message, momentum):
    m = cls(3, momentum=momentum)
    m(torch.randn((4, 3) + (2,) * (m._dims[0] - 2)))  # a real step first
    before = snapshot(m)
    with pytest.raises(ValueError, match=re.escape(message)):
        m(x)
    assert_unchanged(m, before)
    assert m.num_batches_tracked.item() == 1  # torch would have bumped it to 2


def test_torch_bumps_num_batches_tracked_we_do_not():
    """The documented difference: torch counts a batch that then fails validation."""
    ref, ours = torch.nn.BatchNorm2d(3), batchnorm.BatchNorm2d(3)
    bad = torch.randn(1, 3, 1, 1)
    for m in (ref, ours):
        with pytest.raises(ValueError):
            m(bad)
    assert ref.num_batches_tracked.item() == 1
    assert ours.num_batches_tracked.item() == 0


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_and_bool_input(dtype):
    m = batchnorm.BatchNorm2d(3)
    before = snapshot(m)
    with pytest.raises(TypeError, match="expected a floating-point input"):
        m(torch.ones(2, 3, 2, 2, dtype=dtype))
    assert_unchanged(m, before)


def test_one_value_per_channel_is_fine_in_eval():
    m = batchnorm.BatchNorm2d(3).eval()
    ref = torch.nn.BatchNorm2d(3).eval()
    x = torch.randn(1, 3, 1, 1)
    torch.testing.assert_close(m(x), ref(x))


def test_dtype_mismatch_module():
    m = batchnorm.BatchNorm2d(3)  # float32 parameters
    before = snapshot(m)
    with pytest.raises(
        TypeError, match=r"weight has dtype torch.float32 but the input is torch.float64"
    ):
        m(torch.randn(2, 3, 2, 2, dtype=torch.float64))
    assert_unchanged(m, before)


def test_not_a_tensor():
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        batchnorm.BatchNorm2d(3)([[1.0]])


C = 3
X = torch.randn(4, C, 2, 2)


def ok_args():
    return dict(
        running_mean=torch.zeros(C),
        running_var=torch.ones(C),
        weight=torch.ones(C),
        bias=torch.zeros(C),
    )


@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
@pytest.mark.parametrize("training", [True, False])
def test_functional_shape_mismatch(name, training):
    args = ok_args()
    args[name] = torch.ones(C + 1)
    rm, rv = args["running_mean"].clone(), args["running_var"].clone()
    with pytest.raises(ValueError, match=rf"{name} should have shape \(3,\).*got \(4,\)"):
        BF.batch_norm(X, training=training, **args)
    assert torch.equal(args["running_mean"], rm) and torch.equal(args["running_var"], rv)


@pytest.mark.parametrize("name", ["running_mean", "weight"])
def test_functional_dtype_mismatch(name):
    args = ok_args()
    args[name] = args[name].double()
    with pytest.raises(TypeError, match=f"{name} has dtype torch.float64"):
        BF.batch_norm(X, training=True, **args)


def test_functional_half_input_accepts_float32_buffers_only():
    args = ok_args()
    y = BF.batch_norm(X.bfloat16(), training=True, **args)
    assert y.dtype == torch.bfloat16
    args["running_var"] = args["running_var"].double()
    with pytest.raises(TypeError, match="expected torch.bfloat16 or torch.float32"):
        BF.batch_norm(X.bfloat16(), training=True, **args)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"running_var": None}, ValueError, "both be tensors or both be None"),
        ({"training": False, "running_mean": None, "running_var": None}, ValueError, "required"),
        ({"eps": 0.0}, ValueError, "eps must be positive during training"),
        ({"eps": -1.0, "training": False}, ValueError, "eps must be non-negative"),
        ({"momentum": None}, ValueError, "num_batches_tracked"),
        ({"momentum": "0.1"}, TypeError, "momentum must be a float or None"),
        ({"activation": "gelu"}, ValueError, "activation must be one of"),
        (
            {"residual": torch.randn(4, C, 2, 3)},
            ValueError,
            "residual should have the input's shape",
        ),
        ({"backend": "cuda"}, ValueError, "backend must be one of"),
    ],
)
def test_functional_argument_errors(kwargs, error, message):
    args = {**ok_args(), "training": True, **kwargs}
    rm = None if args["running_mean"] is None else args["running_mean"].clone()
    with pytest.raises(error, match=message):
        BF.batch_norm(X, **args)
    if rm is not None:
        assert torch.equal(args["running_mean"], rm)


def test_functional_momentum_none_with_counter():
    rm, rv = torch.zeros(C), torch.ones(C)
    nbt = torch.tensor(0)
    BF.batch_norm(X, rm, rv, training=True, momentum=None, num_batches_tracked=nbt)
    assert nbt.item() == 1
    torch.testing.assert_close(rm, X.mean(dim=(0, 2, 3)))  # the first batch replaces the buffers
    torch.testing.assert_close(rv, X.var(dim=(0, 2, 3)))


def test_constructor_errors():
    with pytest.raises(ValueError, match="backend must be one of"):
        batchnorm.BatchNorm2d(3, backend="gpu")
    with pytest.raises(ValueError, match="activation must be one of"):
        batchnorm.BatchNorm2d(3, activation="tanh")


@pytest.mark.parametrize(
    "name, layout",
    [
        ("input", "mkldnn"),
        ("input", "sparse"),
        ("weight", "mkldnn"),
        ("weight", "sparse"),
        ("running_mean", "sparse"),
        ("residual", "sparse"),
    ],  # fmt: skip
)
@pytest.mark.parametrize("training", [True, False])
def test_non_dense_tensors_are_refused_before_anything_moves(name, layout, training):
    """mkldnn and sparse tensors get a TypeError naming the layout (they used to reach the
    kernels and fail there, after num_batches_tracked had been bumped)."""
    args = ok_args()
    nbt = torch.tensor(3)
    x = X.clone()

    def convert(t):
        return t.to_mkldnn() if layout == "mkldnn" else t.to_sparse()

    if name == "input":
        x = convert(x)
    elif name == "residual":
        args["residual"] = convert(X.clone())
    else:
        args[name] = convert(args[name])
    before = [t.clone() for t in (args["running_mean"], args["running_var"])]
    rm, rv = args["running_mean"], args["running_var"]
    with pytest.raises(TypeError, match=r"dense \(strided\)"):
        BF.batch_norm(x, **{**args, "training": training}, num_batches_tracked=nbt)
    assert int(nbt) == 3
    for t, b in zip((rm, rv), before):
        if t.layout == torch.strided:
            assert torch.equal(t, b)


@pytest.mark.parametrize(
    "momentum, nbt, message",
    [(10**400, 3, "too large for a float"), (None, -1, "which is 0 here")],
)
def test_momentum_errors_move_no_counter(momentum, nbt, message):
    """A momentum that cannot give a factor raises before num_batches_tracked is bumped (it
    was bumped, then float() or 1 / 0 failed)."""
    args = ok_args()
    counter = torch.tensor(nbt)
    before = args["running_mean"].clone()
    with pytest.raises(ValueError, match=message):
        BF.batch_norm(X, **args, training=True, momentum=momentum, num_batches_tracked=counter)
    assert int(counter) == nbt and torch.equal(args["running_mean"], before)
