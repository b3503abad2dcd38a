"""Backends: the kernels behind the one autograd.Function.

A backend is a module with these functions, all on the canonical ``(A, C, B)`` contiguous
view (``batchnorm._layout``), per-channel vectors ``(C,)`` in the accumulation dtype:

* ``supports(x) -> bool``
* ``batch_stats(x3) -> (mean, var)`` (var biased)
* ``normalize(x3, mean, invstd, weight, bias, residual3=None, relu=False) -> y3``
* ``forward_train(x3, weight, bias, eps, residual3=None, relu=False) -> (y3, mean, var, invstd)``
* ``grad_sums(dy3, x3, mean, invstd, y3_mask=None) -> (sum_dy, sum_dy_xhat)``
* ``grad_input(dy3, x3, mean, invstd, weight, sum_dy, sum_dy_xhat, count, training,
  y3_mask=None) -> dx3``
* ``backward(dy3, x3, mean, invstd, weight, training, need_dx, y3_mask=None)
  -> (dx3 or None, sum_dy, sum_dy_xhat)``

Optional, looked up by ``functional.batch_norm`` with ``getattr`` (the numba backend has both;
each must give the general path's bytes, gradients included):

* ``eval_direct(x, running_mean, running_var, weight, bias, eps, relu, residual, grad)
  -> y or None``: eval of the user's tensor in one call (``grad``: a graph is recorded, with
  a backward of its own), or None when the general path must run;
* ``train_direct(x, weight, bias, eps, relu, running_mean, running_var, momentum,
  num_batches_tracked, residual, grad) -> y or None``: training forward in one call (with a graph,
  the running update in a second one after it), running update and ``num_batches_tracked``
  included (in the general path's order), or None (nothing touched);
* ``update_running_stats(running_mean, running_var, mean, var, count, factor)``: the
  running-statistics update of ``_conventions``, in place.

``y3_mask`` is the forward output when a relu was fused: dy counts only where it is > 0.
The split functions (``batch_stats``/``normalize``, ``grad_sums``/``grad_input``) are what
SyncBatchNorm needs to put a collective in between; the fused ones are the fast path.

Names: ``"torch"`` (portable, any device), ``"numba"`` (fused CPU kernels), ``"auto"``
(numba for CPU tensors it supports, torch otherwise).
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

from torch import Tensor

from .._conventions import functorch_wrapped

BACKENDS = ("auto", "torch", "numba")
_MODULES = {"torch": "batchnorm.backends.torch_ops", "numba": "batchnorm.backends.numba_cpu"}
_loaded: dict[str, ModuleType] = {}


def check_name(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def load(name: str) -> ModuleType:
    """The backend module called ``name`` ("torch" or "numba")."""
    if name not in _loaded:
        _loaded[name] = importlib.import_module(_MODULES[name])
    return _loaded[name]


_numba_ok: bool | None = None  # decided once per process


def numba_available() -> bool:
    """Whether the numba backend imports; decided once per process, so "auto" cannot switch
    backends midway through a run (ranks of one job should agree: a failure warns)."""
    global _numba_ok
    if _numba_ok is None:
        try:
            load("numba")
            _numba_ok = True
        except ImportError as e:
            _numba_ok = False
            warnings.warn(
                f"batchnorm: the numba backend could not be imported ({e}); backend='auto' "
                "uses the portable torch backend in this process",
                RuntimeWarning,
                stacklevel=2,
            )
    return _numba_ok


def select(backend: str, x: Tensor) -> ModuleType:
    """The backend module to run for input ``x``: the torch backend, whatever ``backend``
    says, for a tensor wrapped by a running torch.func transform (vmap, grad, jvp), which
    has no storage the kernels could read."""
    if functorch_wrapped(x):
        check_name(backend)
        return load("torch")
    if backend == "auto":
        if x.is_cpu and numba_available():
            numba_cpu = _loaded["numba"]
            if numba_cpu.supports(x):
                return numba_cpu
        return load("torch")
    check_name(backend)
    module = load(backend)
    if not module.supports(x):
        raise ValueError(
            f"backend={backend!r} does not support {x.dtype} tensors on {x.device}; "
            "use backend='auto' or backend='torch'"
        )
    return module
