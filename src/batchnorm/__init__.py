"""batchnorm: batch normalization that matches torch exactly, computed by its own kernels.

Example::

    >>> import torch, batchnorm
    >>> bn = batchnorm.BatchNorm2d(3)              # torch.nn.BatchNorm2d's constructor
    >>> y = bn(torch.randn(8, 3, 5, 5))            # same output and buffers as torch
    >>> model = batchnorm.convert(torch.nn.Sequential(torch.nn.BatchNorm1d(4)))
"""

from . import functional, reference
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, convert

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "convert",
    "functional",
    "reference",
    "__version__",
]
