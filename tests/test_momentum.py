"""momentum_from_keras / momentum_to_keras: the conversion, and that a torch-convention module
with the converted momentum tracks the same running mean as Keras's update rule by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import batchnorm
from batchnorm.momentum import momentum_from_keras, momentum_to_keras


@pytest.mark.parametrize(
    "decay, momentum",
    [(0.99, 0.01), (0.9, 0.1), (0.999, 0.001), (0.0, 1.0), (1.0, 0.0), (0.5, 0.5), (0.97, 0.03)],
)
def test_values(decay, momentum):
    assert momentum_from_keras(decay) == momentum
    assert momentum_to_keras(momentum) == decay


@pytest.mark.parametrize("value", [0.123456789, 0.99, 1e-4, 0.75, np.float32(0.9)])
def test_round_trip_and_closeness(value):
    m = momentum_from_keras(value)
    assert isinstance(m, float)
    assert abs(m - (1 - float(value))) < 1e-15
    assert abs(momentum_to_keras(m) - float(value)) < 1e-15


def test_lazy_exports():
    assert batchnorm.momentum_from_keras is momentum_from_keras
    assert batchnorm.momentum_to_keras is momentum_to_keras


@pytest.mark.parametrize("module_cls", [batchnorm.BatchNorm1d, torch.nn.BatchNorm1d])
def test_matches_keras_update_rule_by_hand(module_cls):
    # Keras: moving = decay * moving + (1 - decay) * batch, with the *biased* batch variance;
    # torch: the same for the mean, the unbiased variance for running_var.
    decay = 0.9
    bn = module_cls(3, momentum=momentum_from_keras(decay)).double()
    g = torch.Generator().manual_seed(0)
    moving_mean = np.zeros(3)
    moving_var_keras = np.ones(3)
    moving_var_torch = np.ones(3)
    n = 7
    for _ in range(4):
        x = torch.randn(n, 3, generator=g, dtype=torch.float64) * 2 + 1
        bn(x)
        xb = x.numpy()
        moving_mean = decay * moving_mean + (1 - decay) * xb.mean(0)
        moving_var_keras = decay * moving_var_keras + (1 - decay) * xb.var(0)  # biased
        moving_var_torch = decay * moving_var_torch + (1 - decay) * xb.var(0, ddof=1)
    np.testing.assert_allclose(bn.running_mean.numpy(), moving_mean, rtol=1e-12)
    np.testing.assert_allclose(bn.running_var.numpy(), moving_var_torch, rtol=1e-12)
    # the documented difference: torch's running_var is not Keras's moving_variance
    assert not np.allclose(bn.running_var.numpy(), moving_var_keras, rtol=1e-3)


@pytest.mark.parametrize("func", [momentum_from_keras, momentum_to_keras])
@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf")])
def test_out_of_range(func, bad):
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        func(bad)


@pytest.mark.parametrize("func", [momentum_from_keras, momentum_to_keras])
@pytest.mark.parametrize("bad", ["0.9", True, torch.tensor(0.9), [0.9]])
def test_wrong_type(func, bad):
    with pytest.raises(TypeError, match="must be a float"):
        func(bad)


def test_none_momentum_has_no_keras_equivalent():
    with pytest.raises(ValueError, match="cumulative average"):
        momentum_to_keras(None)
    with pytest.raises(TypeError):
        momentum_from_keras(None)
