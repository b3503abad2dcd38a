"""torch's own BatchNorm samples (torch.testing._internal.common_modules.module_db), run on
torch's module and ours from the same state, in training and eval, float32 and float64."""

from __future__ import annotations

import pytest
import torch
from torch.testing._internal.common_modules import module_db

import batchnorm
from conftest import BACKENDS, assert_close

INFOS = [
    info
    for info in module_db
    if info.name in ("nn.BatchNorm1d", "nn.BatchNorm2d", "nn.BatchNorm3d")
]


def test_samples_found():
    assert len(INFOS) == 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("info", INFOS, ids=lambda i: i.name)
def test_module_db_samples(info, training, dtype, backend):
    samples = list(
        info.module_inputs_func(
            info, device="cpu", dtype=dtype, requires_grad=True, training=training
        )
    )
    assert samples
    ours_cls = getattr(batchnorm, info.name.split(".")[-1])
    for sample in samples:
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        ref = info.module_cls(*args, **kwargs).to(dtype)
        ours = ours_cls(*args, **kwargs, backend=backend).to(dtype)
        ours.load_state_dict(ref.state_dict())
        ref.train(training)
        ours.train(training)
        (x,) = sample.forward_input.args
        for step in range(2):
            xr = x.detach().clone().requires_grad_()
            xo = x.detach().clone().requires_grad_()
            yr, yo = ref(xr), ours(xo)
            assert_close(yo, yr, dtype, f"{sample.desc} output")
            g = torch.linspace(-1, 1, yr.numel(), dtype=dtype).reshape(yr.shape)
            yr.backward(g)
            yo.backward(g)
            assert_close(xo.grad, xr.grad, dtype, f"{sample.desc} grad_input")
            for (n, a), (_, b) in zip(ours.named_parameters(), ref.named_parameters()):
                assert_close(a.grad, b.grad, dtype, f"{sample.desc} grad {n}", x.numel())
            for (n, a), (_, b) in zip(ours.named_buffers(), ref.named_buffers()):
                if a.is_floating_point():
                    assert_close(a, b, dtype, f"{sample.desc} {n} step {step}")
                else:
                    assert torch.equal(a, b), f"{sample.desc} {n}"
