"""Backend selection: "auto" picks the numba kernels for CPU tensors, torch ops elsewhere."""

from __future__ import annotations

import pytest
import torch

import batchnorm
from batchnorm import backends


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_auto_picks_numba_on_cpu(dtype):
    x = torch.zeros(2, 3, 4, 4, dtype=dtype)
    assert backends.select("auto", x).name == "numba"
    assert backends.select("torch", x).name == "torch"
    assert backends.select("numba", x).name == "numba"


def test_auto_falls_back_to_torch_off_cpu():
    x = torch.zeros(2, 3, 4, 4, device="meta")
    assert backends.select("auto", x).name == "torch"
    with pytest.raises(ValueError, match="backend='numba' does not support"):
        backends.select("numba", x)


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'numba'\)"):
        backends.select("triton", torch.zeros(2, 3))


def test_module_forward_uses_the_chosen_backend(monkeypatch):
    """The module never knows which kernel ran, but the kernel it asked for is the one used."""
    calls = []
    numba_backend = backends.load("numba")
    original = numba_backend.train_direct

    def spy(*args, **kwargs):
        calls.append("numba")
        return original(*args, **kwargs)

    monkeypatch.setattr(numba_backend, "train_direct", spy)
    x = torch.randn(4, 3, 5, 5)
    batchnorm.BatchNorm2d(3)(x)  # auto
    assert calls == ["numba"]
    batchnorm.BatchNorm2d(3, backend="torch")(x)
    assert calls == ["numba"]


def test_numba_import_failure_is_decided_once_and_warned(monkeypatch):
    """If the numba backend fails to import, "auto" warns and stays on torch for the whole
    process (it must not flip to numba later, midway through a run)."""
    monkeypatch.setattr(backends, "_numba_ok", None)
    monkeypatch.setattr(backends, "_loaded", {"torch": backends.load("torch")})
    real_import = backends.importlib.import_module
    calls = []

    def failing_import(name):
        calls.append(name)
        if name.endswith("numba_cpu") and len(calls) == 1:
            raise ImportError("simulated: file being edited")
        return real_import(name)

    monkeypatch.setattr(backends.importlib, "import_module", failing_import)
    x = torch.zeros(2, 3)
    with pytest.warns(RuntimeWarning, match="could not be imported"):
        assert backends.select("auto", x).name == "torch"
    assert backends.select("auto", x).name == "torch"  # the import would work now: not retried
    assert calls == ["batchnorm.backends.numba_cpu"]
