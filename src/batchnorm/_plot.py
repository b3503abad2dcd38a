"""The pictures of ``batchnorm explain --plot`` and ``batchnorm demo --plot`` (matplotlib, Agg).

Figures are built with ``matplotlib.figure.Figure`` directly, so no GUI backend and no global
pyplot state are involved.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .explain import Explanation

MAX_CHANNELS = 4  # panels per row; more would be unreadable
X_COLOR, Y_COLOR = "#1f77b4", "#ff7f0e"
MOMENTUM_COLORS = {"momentum=0.1": "#2ca02c", "momentum=1": "#d62728", "momentum=None": "#9467bd"}


def _figure(*args, **kwargs):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        from .cli import UsageError

        raise UsageError("--plot needs matplotlib: pip install 'batchnorm[plot]'") from None
    return Figure(*args, **kwargs)


def explain_figure(
    path: str,
    e: Explanation,
    curves: dict[str, np.ndarray],
    biased_average: np.ndarray,
    truth: np.ndarray,
    source: str = "",
) -> None:
    """Per channel: histograms of x and y on top; running_var over steps below.

    ``curves``: momentum label -> running_var per step (T + 1, C); ``biased_average``: the
    running average of biased batch variances (T, C); ``truth``: the true variance (C,).
    """
    C = e.x.shape[1]
    cols = min(C, MAX_CHANNELS)
    # wide enough for the title and the legend even with one channel
    fig = _figure(figsize=(max(4.6 * cols + 0.6, 11.0), 8.4), dpi=110, layout="constrained")
    axes = fig.subplots(2, cols, squeeze=False)
    mom = "None" if e.momentum is None else f"{e.momentum:g}"
    shown = "" if C <= cols else f" (first {cols} of {C} channels)"
    fig.suptitle(
        f"batch norm of an input {tuple(e.x.shape)}: n = {e.n} values per channel, "
        f"momentum={mom}, eps={e.eps:g}{shown}",
        fontsize=13,
    )
    T = biased_average.shape[0]
    source_note = f"running_var: each step is a fresh batch of shape {tuple(e.x.shape)}, " + (
        f"drawn from {source}" if source else ""
    )
    for c in range(cols):
        idx = (slice(None), c) + (slice(None),) * (e.x.ndim - 2)
        x = e.x[idx].astype(np.float64).ravel()
        y = e.ours["output"][idx].astype(np.float64).ravel()
        ax = axes[0, c]
        lo, hi = min(x.min(), y.min()), max(x.max(), y.max())
        bins = np.linspace(lo, hi, int(np.clip(np.sqrt(x.size) * 2, 8, 40)) + 1)
        ax.hist(x, bins=bins, alpha=0.55, color=X_COLOR,
                label=f"x: mean {e.mean[c]:.3g}, var {e.var[c]:.3g}")  # fmt: skip
        ax.hist(y, bins=bins, alpha=0.55, color=Y_COLOR,
                label=f"y: mean {y.mean():.1g}, var {y.var():.4g}")  # fmt: skip
        # a rug of the actual values below the bars: with few values the bars hide them
        top = ax.get_ylim()[1]
        ax.plot(x, np.full_like(x, -0.07 * top), "|", color=X_COLOR, ms=10, mew=1.5)
        ax.plot(y, np.full_like(y, -0.16 * top), "|", color=Y_COLOR, ms=10, mew=1.5)
        ax.set_ylim(-0.23 * top, top * 1.25)
        ax.axvline(e.mean[c], color=X_COLOR, ls="--", lw=1)
        ax.axvline(0, color=Y_COLOR, ls="--", lw=1)
        ax.set_title(f"channel {c}: y = (x - mean) / sqrt(var + eps)", fontsize=10.5)
        ax.set_xlabel("value")
        ax.set_ylabel("count")
        ax.legend(fontsize=8.5, loc="upper left")

        ax = axes[1, c]
        steps = np.arange(T + 1)
        for label, trace in curves.items():
            thin = label == "momentum=1"  # the last batch alone: noisy, drawn light
            ax.plot(steps, trace[:, c], color=MOMENTUM_COLORS[label], label=label,
                    lw=0.9 if thin else 1.8, alpha=0.45 if thin else 1.0)  # fmt: skip
        ax.plot(np.arange(1, T + 1), biased_average[:, c], color="grey", ls=":", lw=1.8,
                label="momentum=None storing the biased var")  # fmt: skip
        ax.axhline(truth[c], color="black", lw=1.2, label=f"true variance {truth[c]:.3g}")
        k = e.n / (e.n - 1)
        ax.axhline(truth[c] / k, color="grey", lw=0.8, ls="--",
                   label=f"true variance * (n-1)/n = {truth[c] / k:.3g}")  # fmt: skip
        ax.set_title(f"channel {c}: running_var, {T} steps on fresh batches", fontsize=10.5)
        ax.set_xlabel("training step (num_batches_tracked)")
        ax.set_ylabel("running_var")
        ax.set_xlim(0, T)
        # momentum=1's spikes would squash the averages that are the point of the panel
        ax.set_ylim(0, 2.2 * max(truth[c], 1e-12))
    handles, labels = axes[1, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=3, fontsize=9,
               title=source_note)  # fmt: skip
    fig.savefig(path)


def demo_figure(
    path: str,
    loss: dict[str, list[float]],
    steps_per_epoch: int,
    title: str,
) -> None:
    """Both training-loss curves in one panel; below, on a log axis, |ours - torch| beside
    |control - torch| (torch against its own channels-last kernels: rounding-level drift)."""
    fig = _figure(figsize=(9, 7), dpi=110, layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(2.2, 1.3))
    a, b = np.asarray(loss["torch"]), np.asarray(loss["ours"])
    step = np.arange(1, a.size + 1)
    top.plot(step, a, color="#1f77b4", lw=3.0, alpha=0.55, label="torch.nn.BatchNorm2d")
    top.plot(step, b, color="#d62728", lw=1.1, ls="--", label="batchnorm.BatchNorm2d")
    top.set_ylabel("training loss (cross entropy)")
    top.set_title(title, fontsize=11)
    top.legend()
    floor = 1e-9  # an exactly equal step has difference 0, which a log axis cannot show
    if "control" in loss:
        dc = np.abs(np.asarray(loss["control"]) - a)
        control = "torch vs torch in channels_last (other kernels)"
        bottom.semilogy(step, np.maximum(dc, floor), color="grey", lw=1, alpha=0.8, label=control)
    d = np.maximum(np.abs(a - b), floor)
    bottom.semilogy(step, d, color="#d62728", lw=1, label="batchnorm vs torch")
    bottom.set_ylabel(f"|loss difference|\n(0 drawn at {floor:g})")
    bottom.set_xlabel(f"training step ({steps_per_epoch} per epoch)")
    bottom.legend(fontsize=8.5, loc="upper left")
    for ax in (top, bottom):
        for s in range(steps_per_epoch, step.size, steps_per_epoch):
            ax.axvline(s + 0.5, color="grey", lw=0.5, alpha=0.5)
    fig.savefig(path)
