"""``batchnorm explain``: one batch-norm training step, step by step, checked against torch.

Example::

    $ batchnorm explain --shape 1,2,3,3 --momentum 1        # the seed notebook's case
    $ batchnorm explain --input x.npy --yours mine.npy      # what went wrong by hand?
    $ batchnorm explain --steps 5 --eval --json

    >>> import torch
    >>> from batchnorm.explain import explain
    >>> e = explain(torch.randn(1, 2, 3, 3), momentum=1.0)
    >>> e.n, round(float(e.var_unbiased[0] / e.var[0]), 6)  # running_var is unbiased: 9/8
    (9, 1.125)

The input runs ``steps`` training steps, then the explained one (its output and the gradients
of ``loss = y.sum()``), all on the same tensor; ``--eval`` adds an eval pass with the buffers
reached. Every value comes three ways: the float64 reference (``batchnorm.reference``, the
numbers in the formulas), this package's module (``batchnorm.BatchNorm*d``), and torch's module
(``torch.nn.BatchNorm*d``, the "vs torch" column).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import modules, reference
from .cli import UsageError, check_png
from .diagnose import Diagnosis, candidates, diagnose

__all__ = ["Explanation", "explain", "load_tensor", "add_parser", "run"]

MAX_ELEMENTS = 50_000_000  # larger inputs are not something to explain value by value
MAX_STEPS = 100_000
SHOWN_CHANNELS = 4  # tables printed; --json has every channel
SHOWN_VALUES = 32  # x and y printed per channel up to this many values

_OURS = {2: modules.BatchNorm1d, 3: modules.BatchNorm1d, 4: modules.BatchNorm2d}
_OURS[5] = modules.BatchNorm3d
_TORCH = {
    2: torch.nn.BatchNorm1d,
    3: torch.nn.BatchNorm1d,
    4: torch.nn.BatchNorm2d,
    5: torch.nn.BatchNorm3d,
}


# ----------------------------------------------------------------------------- arguments


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected N,C[,spatial...] as 2 to 5 comma-separated integers, got {text!r}"
        ) from None
    if not 2 <= len(shape) <= 5 or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            f"expected N,C[,spatial...] as 2 to 5 positive integers, got {text!r}"
        )
    if math.prod(shape) > MAX_ELEMENTS:
        raise argparse.ArgumentTypeError(f"at most {MAX_ELEMENTS} elements, got {text!r}")
    return shape


def _momentum(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        m = float(text)
    except ValueError:
        m = math.nan
    if not 0 < m <= 1:  # also rejects nan
        raise argparse.ArgumentTypeError(
            f"expected a float in (0, 1] or 'none' (cumulative average), got {text!r}"
        )
    return m


def _eps(text: str) -> float:
    try:
        eps = float(text)
    except ValueError:
        eps = math.nan
    if not 0 < eps < math.inf:  # torch refuses eps <= 0 in training
        raise argparse.ArgumentTypeError(f"expected a finite float > 0, got {text!r}")
    return eps


def _steps(text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        k = -1
    if not 0 <= k <= MAX_STEPS:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, {MAX_STEPS}], got {text!r}")
    return k


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``batchnorm explain``."""
    p = subparsers.add_parser(
        "explain",
        help="reproduce a batch-norm step by step, check it against torch, diagnose yours",
        description=(
            "Run `steps` training steps of torch.nn.BatchNorm*d's computation on one input, "
            "then explain the next one: each value with its formula, beside torch's."
        ),
    )
    add = p.add_argument
    # fmt: off
    add("--shape", type=_shape, default=(1, 2, 3, 3), metavar="N,C[,spatial...]",
        help="shape of a random normal input (default 1,2,3,3, as in the seed notebook)")
    add("--seed", type=_int, default=0, help="seed of the random input (default 0)")
    add("--input", metavar="FILE", help="input tensor, .npy or .pt (overrides --shape, --seed)")
    add("--momentum", type=_momentum, default=0.1, metavar="FLOAT|none",
        help="weight of the new batch, 0 < m <= 1, or none (default 0.1)")
    add("--eps", type=_eps, default=1e-5, help="added to var inside the root (default 1e-5)")
    add("--steps", type=_steps, default=0, metavar="K",
        help="training steps on the same input before the explained one (default 0)")
    add("--eval", action="store_true",
        help="also explain an eval pass with the running buffers reached")
    add("--json", action="store_true", help="print one JSON object instead of tables")
    add("--plot", metavar="FILE.png", help="draw histograms and running_var curves")
    add("--yours", metavar="FILE",
        help="a tensor you computed by hand for the same input (.npy or .pt): name what it "
        "matches (the eval output with --eval)")
    # fmt: on
    p.set_defaults(run=run)
    return p


# ----------------------------------------------------------------------------- loading


def load_tensor(path: str, what: str = "--input") -> torch.Tensor:
    """A real-valued tensor from a ``.npy`` or ``.pt`` file; :class:`UsageError` otherwise.

    float64 stays float64; every other real dtype becomes float32 (torch's default).
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".npy", ".pt"):
        raise UsageError(f"{what} {path}: expected a .npy or .pt file")
    if not p.is_file():
        raise UsageError(f"{what} {path}: no such file")
    try:
        with warnings.catch_warnings():  # torch.load warns about odd pickles before failing
            warnings.simplefilter("ignore")
            if suffix == ".npy":
                t = torch.from_numpy(np.load(p, allow_pickle=False))
            else:
                t = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # numpy and torch raise many types for a bad file; all mean "bad file"
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if msg.startswith("Weights only load failed"):
            msg = "not a tensor saved with torch.save; torch.load(weights_only=True) refused it"
        raise UsageError(f"{what} {path}: cannot read it as {suffix} ({msg[:160]})") from None
    if not isinstance(t, torch.Tensor):
        raise UsageError(f"{what} {path}: expected one tensor, got {type(t).__name__}")
    if t.is_complex() or t.dtype not in (
        torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
        torch.float16, torch.bfloat16, torch.float32, torch.float64,
    ):  # fmt: skip
        raise UsageError(f"{what} {path}: expected a real-valued tensor, got {t.dtype}")
    return t.detach().to(torch.float64 if t.dtype == torch.float64 else torch.float32)


def _check_input(x: torch.Tensor, source: str) -> None:
    if not 2 <= x.dim() <= 5:
        raise UsageError(
            f"{source}: expected shape (N, C[, spatial...]) with 2 to 5 dims, got {tuple(x.shape)}"
        )
    if x.numel() == 0:
        raise UsageError(f"{source}: the input is empty, shape {tuple(x.shape)}")
    if x.numel() // x.shape[1] == 1:
        raise UsageError(
            f"{source}: expected more than 1 value per channel when training, got input size "
            f"{tuple(x.shape)}"
        )
    if x.numel() > MAX_ELEMENTS:
        raise UsageError(f"{source}: at most {MAX_ELEMENTS} elements, got {x.numel()}")
    if not torch.isfinite(x).all():
        raise UsageError(f"{source}: the input holds nan or inf")


# ----------------------------------------------------------------------------- computing


@dataclass
class Explanation:
    """One explained step: float64 reference values, ours (this package's module) and torch's.

    Per-channel vectors are ``(C,)`` float64 arrays; ``ours`` and ``theirs`` map a name to the
    module's tensor as numpy (in the input dtype), ``theirs`` also holds torch's batch
    statistics as its buffers reveal them (a fresh module with momentum=1).
    """

    x: np.ndarray  # (N, C, *spatial) input, in its dtype
    dtype: str
    n: int
    momentum: float | None
    eps: float
    steps: int
    factor: float  # the explained step's weight of the new batch
    num_batches_tracked: int  # after the explained step
    mean: np.ndarray
    var: np.ndarray  # biased
    var_unbiased: np.ndarray
    invstd: np.ndarray
    running_mean_before: np.ndarray
    running_var_before: np.ndarray
    ref: dict[str, np.ndarray]  # output, running_mean, running_var, grad_*, eval_output
    ours: dict[str, np.ndarray]
    theirs: dict[str, np.ndarray]
    eval: bool = False
    diagnosis: Diagnosis | None = None
    source: str = ""
    rtol: float = field(default=1e-5)

    def torch_max_abs_diff(self) -> dict[str, float]:
        """max |ours - torch| per module tensor (output, buffers, gradients, eval output)."""
        return {
            k: float(np.abs(self.ours[k].astype(np.float64) - self.theirs[k]).max())
            for k in self.ours
        }

    def to_json(self) -> dict:
        """The ``--json`` object (nested lists; input, output and gradients in full)."""

        def lst(a):
            return np.asarray(a, dtype=np.float64).tolist()

        out = {
            "shape": list(self.x.shape),
            "dtype": self.dtype,
            "n": self.n,
            "momentum": self.momentum,
            "eps": self.eps,
            "steps": self.steps,
            "num_batches_tracked": self.num_batches_tracked,
            "input": lst(self.x),
            "mean": lst(self.mean),
            "var": lst(self.var),
            "var_unbiased": lst(self.var_unbiased),
            "invstd": lst(self.invstd),
            "running_mean": lst(self.ours["running_mean"]),
            "running_var": lst(self.ours["running_var"]),
            "output": lst(self.ours["output"]),
            "grad_weight": lst(self.ours["grad_weight"]),
            "grad_bias": lst(self.ours["grad_bias"]),
            "grad_input": lst(self.ours["grad_input"]),
            "torch_max_abs_diff": self.torch_max_abs_diff(),
        }
        if self.eval:
            out["eval_output"] = lst(self.ours["eval_output"])
        if self.diagnosis is not None:
            out["diagnosis"] = self.diagnosis.to_json()
        return out


def explain(
    x: torch.Tensor,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    steps: int = 0,
    eval: bool = False,
) -> Explanation:
    """Run ``steps`` training steps on ``x``, then the explained one (and an eval pass).

    ``x`` is (N, C, *spatial) float32 or float64 with more than one value per channel.
    """
    ndim, C = x.dim(), x.shape[1]
    dtype = x.dtype
    ours = _OURS[ndim](C, eps=eps, momentum=momentum, dtype=dtype)
    theirs = _TORCH[ndim](C, eps=eps, momentum=momentum, dtype=dtype)
    with torch.no_grad():
        for _ in range(steps):
            ours(x)
            theirs(x)

    def step(module) -> dict[str, np.ndarray]:
        xg = x.clone().requires_grad_(True)
        y = module(xg)
        y.sum().backward()  # dy = 1 everywhere
        got = {
            "output": y.detach().numpy(),
            "running_mean": module.running_mean.numpy().copy(),
            "running_var": module.running_var.numpy().copy(),
            "num_batches_tracked": module.num_batches_tracked.numpy().reshape(1).copy(),
            "grad_weight": module.weight.grad.numpy().copy(),
            "grad_bias": module.bias.grad.numpy().copy(),
            "grad_input": xg.grad.numpy().copy(),
        }
        if eval:
            module.eval()
            with torch.no_grad():
                got["eval_output"] = module(x).numpy()
        return got

    got_ours, got_theirs = step(ours), step(theirs)

    # torch's batch statistics, as a fresh module with momentum=1 stores them: running_mean is
    # the batch mean and running_var the unbiased variance, untouched by any averaging.
    probe = _TORCH[ndim](C, eps=eps, momentum=1.0, dtype=dtype)
    with torch.no_grad():
        probe(x)

    # the float64 reference, the numbers every formula shows
    x64 = x.detach().double().numpy()  # (N, C, *spatial)
    mean, var, n = reference.batch_statistics(x64)
    y64, cache = reference.forward(x64, None, None, eps=eps)
    dx64, dweight64, dbias64 = reference.backward(np.ones_like(y64), cache)
    running_mean, running_var, tracked = np.zeros(C), np.ones(C), 0
    for _ in range(steps):
        running_mean, running_var, tracked = reference.update_running_stats(
            running_mean, running_var, tracked, x64, momentum
        )
    before = (running_mean, running_var)
    running_mean, running_var, tracked = reference.update_running_stats(
        running_mean, running_var, tracked, x64, momentum
    )
    ref = {
        "output": y64,
        "running_mean": running_mean,
        "running_var": running_var,
        "num_batches_tracked": np.array([tracked], np.float64),
        "grad_weight": dweight64,
        "grad_bias": dbias64,
        "grad_input": dx64,
    }
    if eval:
        ref["eval_output"] = reference.forward_eval(
            x64, running_mean, running_var, None, None, eps=eps
        )[0]

    axes = (0, *range(2, ndim))
    torch_mean = probe.running_mean.double().numpy()
    torch_var_unbiased = probe.running_var.double().numpy()
    # the invstd torch's output implies: least squares of y = (x - mean) * invstd per channel
    xmu = x64 - torch_mean.reshape((1, -1) + (1,) * (ndim - 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        torch_invstd = (got_theirs["output"] * xmu).sum(axis=axes) / (xmu**2).sum(axis=axes)
    got_theirs = {k: v.astype(np.float64) for k, v in got_theirs.items()}
    got_theirs.update(
        mean=torch_mean,
        var_unbiased=torch_var_unbiased,
        var=torch_var_unbiased * (n - 1) / n,
        invstd=torch_invstd,
    )
    return Explanation(
        x=x.detach().numpy(),
        dtype=str(dtype).replace("torch.", ""),
        n=n,
        momentum=momentum,
        eps=eps,
        steps=steps,
        factor=reference.momentum_factor(momentum, tracked),
        num_batches_tracked=tracked,
        mean=mean,
        var=var,
        var_unbiased=var * n / (n - 1),
        invstd=cache.invstd,
        running_mean_before=before[0],
        running_var_before=before[1],
        ref=ref,
        ours=got_ours,
        theirs=got_theirs,
        eval=eval,
        rtol=1e-5 if dtype != torch.float64 else 1e-10,
    )


def running_var_curves(
    x: torch.Tensor, from_file: bool, seed: int, steps: int
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """running_var over ``max(200, steps + 1)`` training steps on FRESH batches shaped like x.

    Batches are drawn from N(0, 1) for a generated input (true variance 1), or resampled with
    replacement from each channel's values of a file input (true variance: their biased
    variance, the population's). Returns ``(curves, biased_average, truth)``: ``curves`` maps
    a momentum label to running_var per step ``(T + 1, C)`` from the initial 1; the average of
    the *biased* batch variances shows why torch stores unbiased ones.
    """
    T = min(max(200, steps + 1), 1000)
    x64 = x.detach().double().numpy()  # (N, C, *spatial)
    C = x64.shape[1]
    rng = np.random.default_rng(seed + 1)
    per_channel = np.moveaxis(x64, 1, 0).reshape(C, -1)  # (C, n)
    if from_file:
        truth = per_channel.var(axis=1)  # (C,) the population's variance
    else:
        truth = np.ones(C)

    def batch() -> np.ndarray:
        if not from_file:
            return rng.standard_normal(x64.shape)
        idx = rng.integers(0, per_channel.shape[1], size=per_channel.shape)  # (C, n)
        drawn = np.take_along_axis(per_channel, idx, axis=1)  # (C, n)
        moved = (x64.shape[1], x64.shape[0], *x64.shape[2:])
        return np.moveaxis(drawn.reshape(moved), 0, 1)

    batches = [batch() for _ in range(T)]
    curves = {}
    for label, m in (("momentum=0.1", 0.1), ("momentum=1", 1.0), ("momentum=None", None)):
        rm, rv, t = np.zeros(C), np.ones(C), 0
        trace = [rv]
        for b in batches:
            rm, rv, t = reference.update_running_stats(rm, rv, t, b, m)
            trace.append(rv)
        curves[label] = np.stack(trace)  # (T + 1, C)
    biased = np.cumsum([reference.batch_statistics(b)[1] for b in batches], axis=0)
    biased_average = biased / np.arange(1, T + 1)[:, None]  # (T, C)
    return curves, biased_average, truth


# ----------------------------------------------------------------------------- printing


def _g(v: float, digits: int = 6) -> str:
    return f"{v:.{digits}g}"


def _mark(ours, theirs, rtol: float, scale: float = 1.0) -> tuple[str, str]:
    """("exact" | "close (d)" | "max diff d", rich style) for ours vs torch's values."""
    ours = np.atleast_1d(np.asarray(ours))
    theirs = np.atleast_1d(np.asarray(theirs, dtype=np.float64))
    if not np.isfinite(theirs).all():
        return "n/a", "dim"
    ours32 = ours.astype(np.float32 if rtol > 1e-8 else np.float64).astype(np.float64)
    d = float(np.abs(ours32 - theirs).max())
    if d == 0:
        return "exact", "green"
    if d <= rtol * (scale + float(np.abs(theirs).max())):
        return f"close ({d:.1e})", "green"
    return f"max diff {d:.1e}", "bold red"


def _momentum_text(e: Explanation) -> str:
    if e.momentum is None:
        return f"m = 1/num_batches_tracked = 1/{e.num_batches_tracked}"
    return f"m = {e.momentum:g}"


def _channel_rows(e: Explanation, c: int) -> list[tuple[str, str, str, tuple[str, str]]]:
    """(step, formula with this channel's numbers, value, vs-torch mark) for channel c."""
    ndim = e.x.ndim
    idx = (slice(None), c) + (slice(None),) * (ndim - 2)
    x = e.x[idx].astype(np.float64)
    n, eps, r = e.n, e.eps, e.rtol
    mean, var, vu, invstd = e.mean[c], e.var[c], e.var_unbiased[c], e.invstd[c]
    ours, theirs = e.ours, e.theirs
    dims = "*".join(str(s) for i, s in enumerate(e.x.shape) if i != 1)
    y_ours, y_theirs = ours["output"][idx], theirs["output"][idx]
    yv = var / (var + eps) if var + eps > 0 else 0.0
    rm0, rv0 = e.running_mean_before[c], e.running_var_before[c]
    rows = [
        ("n", f"values per channel: {dims}", str(n), ("", "")),
        ("mean", f"sum(x) / n = {_g(x.sum())} / {n}", _g(mean),
         _mark(mean, theirs["mean"][c], r)),
        ("var (biased)", f"sum((x - mean)^2) / n = {_g(((x - mean) ** 2).sum())} / {n}",
         _g(var), _mark(var, theirs["var"][c], r)),
        ("var_unbiased", f"var * n/(n-1) = {_g(var)} * {n}/{n - 1}", _g(vu),
         _mark(vu, theirs["var_unbiased"][c], r)),
        ("invstd", f"1 / sqrt(var + eps) = 1 / sqrt({_g(var)} + {eps:g})", _g(invstd),
         _mark(invstd, theirs["invstd"][c], r)),
        ("y", "(x - mean) * invstd * w + b, w = 1, b = 0", f"{n} values below",
         _mark(y_ours, y_theirs, r)),
        ("mean(y)", "sum(y) / n, 0 up to rounding", _g(float(y_ours.astype(float).mean()), 3),
         _mark(y_ours.astype(float).mean(), y_theirs.mean(), r)),
        ("var(y), biased", f"var / (var + eps) = {_g(var)} / {_g(var + eps)}", _g(yv),
         _mark(y_ours.astype(float).var(), y_theirs.var(), r)),
        ("y.var(), unbiased", f"n/(n-1) * var(y) = {n}/{n - 1} * {_g(yv)}",
         _g(yv * n / (n - 1)), _mark(y_ours.astype(float).var(ddof=1), y_theirs.var(ddof=1), r)),
        ("running_mean", f"(1 - m) * {_g(rm0)} + m * mean, {_momentum_text(e)}",
         _g(float(ours["running_mean"][c])),
         _mark(ours["running_mean"][c], theirs["running_mean"][c], r)),
        ("running_var", f"(1 - m) * {_g(rv0)} + m * var_unbiased, {_momentum_text(e)}",
         _g(float(ours["running_var"][c])),
         _mark(ours["running_var"][c], theirs["running_var"][c], r)),
        ("num_batches_tracked", f"{e.steps} earlier steps + 1", str(e.num_batches_tracked),
         _mark(ours["num_batches_tracked"], theirs["num_batches_tracked"], r)),
        ("grad_bias", "sum(dy), dy = 1 for loss = y.sum()", _g(float(ours["grad_bias"][c])),
         _mark(ours["grad_bias"][c], theirs["grad_bias"][c], r, scale=n)),
        ("grad_weight", "sum(dy * xhat) = sum(xhat), 0 up to rounding",
         _g(float(ours["grad_weight"][c]), 3),
         _mark(ours["grad_weight"][c], theirs["grad_weight"][c], r, scale=n)),
        ("max |grad_input|", "invstd/n * (n*dy - sum_dy - xhat*sum_dy_xhat)",
         _g(float(np.abs(ours["grad_input"][idx]).max()), 3),
         _mark(ours["grad_input"][idx], theirs["grad_input"][idx], r)),
    ]  # fmt: skip
    if e.eval:
        rm, rv = e.ref["running_mean"][c], e.ref["running_var"][c]
        ye_ours, ye_theirs = ours["eval_output"][idx], theirs["eval_output"][idx]
        ev = var / (rv + eps)
        rows += [
            ("eval y", f"(x - {_g(rm)}) / sqrt({_g(rv)} + eps), the running buffers",
             f"{n} values below", _mark(ye_ours, ye_theirs, r)),
            ("eval var(y), biased", f"var / (running_var + eps) = {_g(var)} / {_g(rv + eps)}",
             _g(ev), _mark(ye_ours.astype(float).var(), ye_theirs.var(), r)),
        ]  # fmt: skip
    return rows


def _values(a: np.ndarray) -> str:
    flat = a.astype(np.float64).ravel()
    shown = " ".join(f"{v:.4f}" for v in flat[:SHOWN_VALUES])
    return shown + (f" ... ({flat.size} values)" if flat.size > SHOWN_VALUES else "")


def _print_human(e: Explanation) -> None:
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    console = Console(width=max(Console().width, 110) if not sys.stdout.isatty() else None)
    C = e.x.shape[1]
    name = _TORCH[e.x.ndim].__name__
    mom = "None" if e.momentum is None else f"{e.momentum:g}"
    console.print(
        f"[bold]batchnorm explain[/]: {name}({C}, eps={e.eps:g}, momentum={mom}) on "
        f"{e.source}, shape {tuple(e.x.shape)} {e.dtype}; {e.steps} training step(s) on it, "
        f"then the one explained (loss = y.sum()); weight 1, bias 0."
    )
    marks: list[str] = []
    for c in range(min(C, SHOWN_CHANNELS)):
        table = Table(title=f"channel {c}", title_justify="left", expand=False)
        table.add_column("step", style="bold")
        table.add_column("formula")
        table.add_column("value", justify="right")
        table.add_column("vs torch")
        for step, formula, value, (mark, style) in _channel_rows(e, c):
            table.add_row(step, formula, value, Text(mark, style=style))
            if mark:
                marks.append(mark)
        console.print(table)
        idx = (slice(None), c) + (slice(None),) * (e.x.ndim - 2)
        console.print(f"  x[:, {c}]  {_values(e.x[idx])}")
        console.print(f"  y[:, {c}]  {_values(e.ours['output'][idx])}")
        if e.eval:
            console.print(f"  eval y   {_values(e.ours['eval_output'][idx])}")
    if C > SHOWN_CHANNELS:
        console.print(f"... {C - SHOWN_CHANNELS} more channels: --json has every value.")

    n = e.n
    k = n / (n - 1)
    note = (
        f"Training normalises with the BIASED variance (divides by n = {n}), but running_var "
        f"stores the UNBIASED one (divides by n - 1): the factor n/(n-1) = {n}/{n - 1} = "
        f"{k:.6g}. A hand computation with x.var() or with running_var is {math.sqrt(k):.6g}x "
        f"too small, and torch's y.var() prints {k:.6g} rather than 1."
    )
    if e.momentum == 1.0:
        note += (
            f" With momentum=1, running_var is exactly var * {n}/{n - 1}: the seed notebook's "
            "case, 'always off' by that factor."
        )
    console.print(Panel(note, title="the seed's puzzle: biased var vs unbiased running_var"))

    if e.diagnosis is not None:
        d = e.diagnosis
        body = Text()
        body.append(f"{d.what_you_did}\n", style="bold")
        body.append(f"{d.what_torch_does}\n")
        body.append(f"Fix: {d.fix}\n", style="green")
        body.append(
            "max |yours - candidate|: "
            + ", ".join(f"{k} {v:.2g}" for k, v in d.max_abs_diff.items())
        )
        style = "green" if d.name == "match" else "yellow"
        console.print(Panel(body, title=f"--yours ({d.mode} output): {d.name}", style=style))

    diffs = sum(m.startswith("max diff") for m in marks)
    exact = sum(m == "exact" for m in marks)
    summary = f"vs torch.nn.{name}: {exact} exact, {len(marks) - exact - diffs} close"
    console.print(summary + (f", [bold red]{diffs} differ[/]" if diffs else ", 0 differ"))


# ----------------------------------------------------------------------------- command


def run(args: argparse.Namespace) -> int:
    """``batchnorm explain``: see the module docstring."""
    if args.input is not None:
        x = load_tensor(args.input, "--input")
        source = args.input
    else:
        g = torch.Generator().manual_seed(args.seed)
        x = torch.randn(args.shape, generator=g)
        source = f"randn(seed={args.seed})"
    _check_input(x, f"--input {args.input}" if args.input else "--shape")
    yours = None
    if args.yours is not None:
        yours = load_tensor(args.yours, "--yours")
        if tuple(yours.shape) != tuple(x.shape):
            raise UsageError(
                f"--yours {args.yours}: expected the input's shape {tuple(x.shape)}, got "
                f"{tuple(yours.shape)}"
            )
    if args.plot is not None:
        check_png(args.plot)

    try:
        e = explain(x, momentum=args.momentum, eps=args.eps, steps=args.steps, eval=args.eval)
    except ValueError as err:  # a check of torch's or ours that the ones above missed
        raise UsageError(str(err).splitlines()[0]) from None
    e.source = source
    if yours is not None:
        mode = "eval" if args.eval else "training"
        cands = candidates(e.x, args.momentum, args.eps, args.steps, mode)
        key = "eval_output" if args.eval else "output"
        # how far a correct computation in the input's dtype lands from the float64 truth
        noise = float(np.abs(e.theirs[key] - cands["match"]).max())
        e.diagnosis = diagnose(yours.double().numpy(), cands, noise=noise, mode=mode, n=e.n)

    if args.plot is not None:
        from . import _plot

        from_file = args.input is not None
        curves, biased_average, truth = running_var_curves(x, from_file, args.seed, args.steps)
        drawn = (
            "each channel's values of the input, resampled (true variance: their biased var)"
            if from_file
            else "N(0, 1) (true variance 1)"
        )
        try:
            _plot.explain_figure(args.plot, e, curves, biased_average, truth, drawn)
        except OSError as err:
            raise UsageError(f"--plot {args.plot}: cannot write it ({err.strerror})") from None

    if args.json:
        print(json.dumps(e.to_json()))
    else:
        _print_human(e)
        if args.plot is not None:
            print(f"wrote {args.plot}")
    return 0
