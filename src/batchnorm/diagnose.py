"""Name the mistake in a batch norm computed by hand, by comparing it with candidate computations.

Example::

    >>> import numpy as np
    >>> from batchnorm.diagnose import candidates, diagnose
    >>> x = np.random.default_rng(0).standard_normal((1, 2, 3, 3))
    >>> mean = x.mean(axis=(0, 2, 3), keepdims=True)
    >>> var_unbiased = x.var(axis=(0, 2, 3), ddof=1, keepdims=True)   # the n - 1 divisor
    >>> yours = (x - mean) / np.sqrt(var_unbiased + 1e-5)
    >>> diagnose(yours, candidates(x, momentum=1.0, eps=1e-5)).name
    'unbiased_variance'

Each candidate is the tensor one way of computing batch norm gives for the same input and
options, with ``weight = 1`` and ``bias = 0`` (a fresh module). Which candidates apply depends
on what the user reproduced:

``mode="training"``: the output of the training step explained, after ``steps`` earlier training
steps on the same input (the output itself does not depend on them; the buffers do):

* ``match``: torch's, ``(x - mean) / sqrt(var + eps)`` with the biased ``var``;
* ``unbiased_variance``: ``(x - mean) / sqrt(var * n/(n-1) + eps)``. Normalising with
  ``running_var`` after ``momentum=1`` gives exactly this: the seed notebook's case;
* ``eval_mode_running_stats``: ``(x - running_mean) / sqrt(running_var + eps)`` with the
  buffers as they are after the step (what ``bn.running_*`` hold once ``y = bn(x)`` ran);
* ``eps_outside_sqrt``: ``(x - mean) / (sqrt(var) + eps)``;
* ``no_eps``: ``(x - mean) / sqrt(var)``.

``mode="eval"``: the eval pass after those ``steps + 1`` training steps:

* ``match``: torch's, ``(x - running_mean) / sqrt(running_var + eps)``;
* ``batch_stats_in_eval``: the batch's own statistics, i.e. the training output;
* ``keras_momentum``: the buffers updated with momentum read as a decay (Keras, Flax):
  ``running = m * running + (1 - m) * batch`` instead of ``(1 - m) * running + m * batch``;
* ``eps_outside_sqrt``: ``(x - running_mean) / (sqrt(running_var) + eps)``;
* ``no_eps``: ``(x - running_mean) / sqrt(running_var)``.

The user's tensor gets the name of the nearest candidate, provided it is within
``1e-4`` (relative to the output's scale, or 8x the float rounding noise when that is larger) of
it; otherwise ``unknown``. Candidates closer to each other than the rounding noise cannot be
told apart: the first in :data:`PRIORITY` wins (so ``momentum=1`` names ``unbiased_variance``,
and ``eps=0`` names ``match``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import reference

__all__ = ["PRIORITY", "Diagnosis", "candidates", "diagnose", "explanation"]

# Ties (candidates that coincide for these options) go to the first in this order.
PRIORITY = (
    "match",
    "unbiased_variance",
    "eval_mode_running_stats",
    "batch_stats_in_eval",
    "keras_momentum",
    "eps_outside_sqrt",
    "no_eps",
)

# Relative distance under which a candidate is accepted at all.
ACCEPT_RTOL = 1e-4


@dataclass
class Diagnosis:
    """The verdict: ``name`` (a :data:`PRIORITY` entry or ``"unknown"``), the mode compared
    in, each candidate's max abs difference from the user's tensor, and the explanation."""

    name: str
    mode: str
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    what_you_did: str = ""
    what_torch_does: str = ""
    fix: str = ""

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "mode": self.mode,
            "max_abs_diff": self.max_abs_diff,
            "what_you_did": self.what_you_did,
            "what_torch_does": self.what_torch_does,
            "fix": self.fix,
        }


def _col(v: np.ndarray, ndim: int) -> np.ndarray:
    """(C,) -> broadcastable against (N, C, *spatial)."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _running(
    x: np.ndarray, momentum: float | None, steps: int, keras: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The buffers after ``steps + 1`` training steps on ``x`` from (0, 1); ``keras`` reads
    momentum as the weight of the *old* value, the Keras/Flax convention."""
    C = x.shape[1]
    running_mean, running_var, tracked = np.zeros(C), np.ones(C), 0
    for _ in range(steps + 1):
        if keras:
            # 1 - m is the weight of the new batch; reference's update takes that weight
            running_mean, running_var, tracked = reference.update_running_stats(
                running_mean, running_var, tracked, x, momentum=1.0 - momentum
            )
        else:
            running_mean, running_var, tracked = reference.update_running_stats(
                running_mean, running_var, tracked, x, momentum=momentum
            )
    return running_mean, running_var


def candidates(
    x: np.ndarray,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    steps: int = 0,
    mode: str = "training",
) -> dict[str, np.ndarray]:
    """Every candidate for ``mode`` ("training" or "eval"), float64, in :data:`PRIORITY` order.

    ``x`` is the input (N, C, *spatial); see the module docstring for each definition.
    """
    if mode not in ("training", "eval"):
        raise ValueError(f"mode must be 'training' or 'eval', got {mode!r}")
    x = np.asarray(x, dtype=np.float64)  # (N, C, *spatial)
    nd = x.ndim
    mean, var, n = reference.batch_statistics(x)  # (C,), (C,) biased, count
    running_mean, running_var = _running(x, momentum, steps)  # (C,), (C,)
    # Silence 0/0 for constant channels: no_eps is then nan, which is what a user gets too.
    with np.errstate(divide="ignore", invalid="ignore"):
        if mode == "training":
            xmu = x - _col(mean, nd)  # (N, C, *spatial)
            out = {
                "match": xmu / np.sqrt(_col(var, nd) + eps),
                "unbiased_variance": xmu / np.sqrt(_col(var * n / (n - 1), nd) + eps),
                "eval_mode_running_stats": (x - _col(running_mean, nd))
                / np.sqrt(_col(running_var, nd) + eps),
                "eps_outside_sqrt": xmu / (np.sqrt(_col(var, nd)) + eps),
                "no_eps": xmu / np.sqrt(_col(var, nd)),
            }
        else:
            xmu = x - _col(running_mean, nd)  # (N, C, *spatial)
            out = {
                "match": xmu / np.sqrt(_col(running_var, nd) + eps),
                "batch_stats_in_eval": (x - _col(mean, nd)) / np.sqrt(_col(var, nd) + eps),
            }
            if momentum is not None:  # None (cumulative) has no decay reading
                keras_mean, keras_var = _running(x, momentum, steps, keras=True)
                out["keras_momentum"] = (x - _col(keras_mean, nd)) / np.sqrt(
                    _col(keras_var, nd) + eps
                )
            out["eps_outside_sqrt"] = xmu / (np.sqrt(_col(running_var, nd)) + eps)
            out["no_eps"] = xmu / np.sqrt(_col(running_var, nd))
    return {name: out[name] for name in PRIORITY if name in out}


def _max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b|, where equal values (inf == inf) and nan against nan count as 0."""
    with np.errstate(invalid="ignore"):
        d = np.abs(a - b)
    d = np.where((a == b) | (np.isnan(a) & np.isnan(b)), 0.0, d)
    d = np.where(np.isnan(d), np.inf, d)
    return float(d.max()) if d.size else 0.0


def diagnose(
    yours: np.ndarray,
    cands: dict[str, np.ndarray],
    noise: float = 0.0,
    mode: str = "training",
    n: int | None = None,
) -> Diagnosis:
    """Compare ``yours`` with each of ``cands`` (from :func:`candidates`) and name the nearest.

    ``noise``: the rounding noise of a correct computation in the input's dtype (e.g. the max
    abs difference between torch's float32 output and the float64 ``match``); candidates
    closer to the nearest one than ``4 * noise`` are a tie, decided by :data:`PRIORITY`.
    """
    yours = np.asarray(yours, dtype=np.float64)
    finite = np.abs(cands["match"][np.isfinite(cands["match"])])
    scale = max(1.0, float(finite.max()) if finite.size else 1.0)
    tie = max(4.0 * noise, 64 * np.finfo(np.float64).eps * scale)
    accept = max(ACCEPT_RTOL * scale, 8.0 * noise)
    dist = {name: _max_abs_diff(yours, c) for name, c in cands.items()}
    best = min(dist.values())
    name = "unknown"
    if best <= accept:
        name = next(k for k in PRIORITY if k in dist and dist[k] <= best + tie)
    what, torch_does, fix = explanation(name, mode, n)
    return Diagnosis(name, mode, dist, what, torch_does, fix)


def explanation(name: str, mode: str = "training", n: int | None = None) -> tuple[str, str, str]:
    """``(what you did, what torch does, the fix)`` for a diagnosis name, in plain words."""
    nn = "n" if n is None else str(n)
    ratio = "n/(n-1)" if n is None or n < 2 else f"{n}/{n - 1} = {n / (n - 1):.4g}"
    if mode == "training":
        torch_does = (
            "In training torch normalises with the batch's own mean and its BIASED variance "
            f"sum((x - mean)^2) / n (n = {nn} values per channel), eps inside the square root: "
            "y = (x - mean) / sqrt(var + eps) * weight + bias."
        )
    else:
        torch_does = (
            "In eval torch normalises with the running buffers, which hold the UNBIASED batch "
            "variance averaged with momentum = the weight of the new batch: "
            "running = (1 - m) * running + m * batch; y = (x - running_mean) / "
            "sqrt(running_var + eps) * weight + bias."
        )
    texts = {
        "match": (
            "Your tensor matches torch's output.",
            "Nothing to fix.",
        ),
        "unbiased_variance": (
            f"You normalised with the unbiased variance var * n/(n-1), {ratio} times too large "
            "(x.var() divides by n - 1; so does running_var, which after momentum=1 is exactly "
            "that: the seed notebook's case).",
            "Divide by n, not n - 1: x.var(unbiased=False) (numpy's default ddof=0); do not "
            "normalise a training batch with running_var.",
        ),
        "eval_mode_running_stats": (
            "You normalised with running_mean and running_var, which is what eval mode does; "
            "a training step uses the batch's statistics, and running_var is unbiased and "
            "averaged over steps.",
            "Use the batch's mean and biased variance for a training step, or compare with "
            "bn.eval() output if you meant eval.",
        ),
        "batch_stats_in_eval": (
            "You normalised with the batch's own statistics: that is the training output, "
            "not what eval mode computes.",
            "In eval use running_mean and running_var (call bn.eval() before comparing).",
        ),
        "keras_momentum": (
            "You read momentum as a decay (Keras/Flax): running = m * running + (1 - m) * batch.",
            "In torch momentum is the weight of the NEW batch: running = (1 - m) * running + "
            "m * batch; Keras's momentum=0.99 is torch's momentum=0.01.",
        ),
        "eps_outside_sqrt": (
            "You added eps after the square root: (x - mean) / (sqrt(var) + eps).",
            "Put eps inside: (x - mean) / sqrt(var + eps).",
        ),
        "no_eps": (
            "You left out eps: (x - mean) / sqrt(var).",
            "Add eps inside the square root (torch's default 1e-5; it is bn.eps).",
        ),
        "unknown": (
            "Your tensor matches none of the candidates (see max_abs_diff for how far each is).",
            "Check the input is the same tensor, weight = 1 and bias = 0, and compute step by "
            "step as in the table above.",
        ),
    }
    what, fix = texts[name]
    return what, torch_does, fix
