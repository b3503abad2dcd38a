"""Momentum between torch's convention and Keras's.

Example::

    >>> import batchnorm
    >>> batchnorm.momentum_from_keras(0.99)  # Keras BatchNormalization(momentum=0.99)
    0.01
    >>> batchnorm.momentum_to_keras(0.1)  # torch's default
    0.9

The two libraries mean opposite things by "momentum":

* torch (and this package, tinygrad, TF's fused ``exponential_avg_factor``): the weight of the
  *new* batch, ``running = (1 - momentum) * running + momentum * batch``; default 0.1.
* Keras 3 (and Flax): a decay, the weight of the *old* value,
  ``moving = decay * moving + (1 - decay) * batch``; default 0.99.

So ``torch_momentum = 1 - keras_decay``. The variance each stores also differs:

* torch stores the **unbiased** batch variance in ``running_var`` (``var * n / (n - 1)``,
  with ``n`` the values per channel of each batch), while normalising with the biased one;
* Keras 3 and Flax store the **biased** variance (``var``, divided by ``n``) in
  ``moving_variance`` / ``var``, the same one they normalise with.

The factor ``n / (n - 1)`` belongs to each batch, so stored buffers cannot be converted
exactly after the fact; with large ``n`` the difference is small (1.125 for n = 9, 1.0002 for
n = 4096). Default ``eps`` also differs: 1e-5 in torch, 1e-3 in Keras.
"""

from __future__ import annotations

import math
import numbers

__all__ = ["momentum_from_keras", "momentum_to_keras"]


def momentum_from_keras(decay: float) -> float:
    """torch's momentum for a Keras/Flax decay: ``1 - decay``.

    Example::

        >>> momentum_from_keras(0.99)
        0.01

    The result is rounded to 15 significant digits, so 0.99 gives 0.01 rather than the
    binary difference 0.010000000000000009; the change is below one part in 10^15.
    Raises ValueError outside [0, 1]: torch's ``momentum=None`` (a cumulative average) has
    no Keras equivalent.
    """
    return _one_minus(decay, "decay")


def momentum_to_keras(momentum: float) -> float:
    """The Keras/Flax decay for torch's momentum: ``1 - momentum``.

    Example::

        >>> momentum_to_keras(0.1)
        0.9

    ``momentum=None`` (torch's cumulative average) has no Keras equivalent: ValueError.
    """
    if momentum is None:
        raise ValueError(
            "momentum=None means a cumulative average (factor 1 / num_batches_tracked), "
            "which has no fixed Keras decay; pass a float momentum in [0, 1]"
        )
    return _one_minus(momentum, "momentum")


def _one_minus(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float in [0, 1], got {type(value).__name__}")
    value = float(value)
    if not (0.0 <= value <= 1.0) or math.isnan(value):
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(f"{1.0 - value:.15g}")
