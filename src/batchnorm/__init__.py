"""batchnorm: batch normalization that matches torch exactly, computed by its own kernels.

Example::

    >>> import torch, batchnorm
    >>> bn = batchnorm.BatchNorm2d(3)              # torch.nn.BatchNorm2d's constructor
    >>> y = bn(torch.randn(8, 3, 5, 5))            # same output and buffers as torch
    >>> model = batchnorm.convert(torch.nn.Sequential(torch.nn.BatchNorm1d(4)))
"""

from __future__ import annotations

import importlib

from . import functional, reference
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, convert

__version__ = "0.1.0"

# Imported on first use, so `import batchnorm` stays light.
_LAZY = {
    "SyncBatchNorm": "batchnorm.sync",
    "BatchRenorm1d": "batchnorm.renorm",
    "BatchRenorm2d": "batchnorm.renorm",
    "BatchRenorm3d": "batchnorm.renorm",
    "GhostBatchNorm1d": "batchnorm.ghost",
    "GhostBatchNorm2d": "batchnorm.ghost",
    "GhostBatchNorm3d": "batchnorm.ghost",
    "fold": "batchnorm.folding",
    "recalibrate": "batchnorm.recalibration",
    "momentum_from_keras": "batchnorm.momentum",
    "momentum_to_keras": "batchnorm.momentum",
}

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "convert",
    "functional",
    "reference",
    "__version__",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'batchnorm' has no attribute {name!r}")
