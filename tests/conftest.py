"""Shared helpers: inputs, tolerances, and running torch's module beside ours."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import batchnorm

# (dtype, rtol, atol) for comparisons with torch's own output; float32 ~1e-5 relative,
# float64 ~1e-9, half types one rounding of the output dtype.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-9, 1e-10),
    torch.bfloat16: (1.6e-2, 1.6e-2),
    torch.float16: (2e-3, 2e-3),
}

# The backends the parity grids run on ("auto" picks numba for CPU tensors: test_backends.py).
BACKENDS = ("torch", "numba")

TORCH_CLASSES = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}


def param_dtype(dtype: torch.dtype) -> torch.dtype:
    """Parameters and buffers: float32 for half inputs, the input dtype otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def make_input(shape, dtype=torch.float32, channels_last=False, seed=0, offset=0.5, scale=2.0):
    """A non-trivial input: not centred, not unit variance, different per channel."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset
    if len(shape) > 1 and shape[1] > 0:
        per_channel = torch.linspace(-1, 1, shape[1], dtype=torch.float64)
        x = x + per_channel.view((1, -1) + (1,) * (len(shape) - 2))
    x = x.to(dtype)
    if channels_last and x.dim() == 4:
        x = x.to(memory_format=torch.channels_last)
    elif channels_last and x.dim() == 5:
        x = x.to(memory_format=torch.channels_last_3d)
    return x


def module_pair(num_features, ndim, dtype=torch.float32, backend="torch", seed=1, **kwargs):
    """(torch's module, ours) with the same non-trivial weight and bias."""
    name = TORCH_CLASSES[ndim]
    pd = param_dtype(dtype)
    ref = getattr(torch.nn, name)(num_features, dtype=pd, **kwargs)
    ours = getattr(batchnorm, name)(num_features, dtype=pd, backend=backend, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if ref.weight is not None:
            ref.weight.copy_(torch.rand(num_features, generator=g, dtype=pd) + 0.5)
        if ref.bias is not None:
            ref.bias.copy_(torch.randn(num_features, generator=g, dtype=pd))
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def grad_input_scale(x, dy, weight=None, eps=1e-5) -> float:
    """The size of the terms grad_input is made of, ``|dy| * |w| * invstd``: dx is a
    difference of such terms, so its rounding error scales with them, not with dx (for two
    values per channel dx is ~0 analytically and pure rounding noise)."""
    dims = (0, *range(2, x.dim()))
    invstd = (x.double().var(dim=dims, correction=0) + eps).rsqrt().max().item()
    w = 1.0 if weight is None else weight.detach().double().abs().max().item()
    return max(1.0, dy.double().abs().max().item() * w * invstd)


def assert_close(actual, expected, dtype, what="", count=1, scale=1.0):
    """Compare at ``dtype``'s tolerance; ``count`` is the number of terms summed into each
    value (a reduction's rounding grows like sqrt(count), and cancellation makes rtol useless),
    ``scale`` the size of the terms (see grad_input_scale)."""
    rtol, atol = TOLERANCES[dtype]
    atol = atol * max(1.0, count**0.5) * scale
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}"
    )


def to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
