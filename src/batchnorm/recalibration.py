"""Recomputing the running statistics of every batch norm in a model from data.

Example::

    >>> import torch, batchnorm
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
    >>> data = [torch.randn(16, 4) for _ in range(10)]
    >>> model = batchnorm.recalibrate(model, data, progress=False)
    >>> int(model[1].num_batches_tracked)
    10

Useful after anything that changes the weights without touching the buffers: weight
averaging (SWA, EMA), pruning, quantisation, fine-tuning with frozen statistics, or a data
shift between training and deployment.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .renorm import _BatchRenorm

__all__ = ["recalibrate"]


def recalibrate(
    model: nn.Module,
    data: Iterable[Any],
    progress: bool = True,
    *,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Recompute the running statistics of every batch norm of ``model`` over ``data``.

    Example::

        loader = torch.utils.data.DataLoader(train_set, batch_size=256)
        batchnorm.recalibrate(swa_model, loader)  # a rich progress bar on stderr

    Every batch norm with running buffers (ours or torch's, any ``_BatchNorm``) is reset
    (mean 0, var 1, ``num_batches_tracked`` 0) and given ``momentum=None``, then the model
    sees every batch once under ``torch.no_grad()``: the buffers end as the cumulative
    average over the batches, each batch weighted equally (``running_var`` the mean of the
    batches' *unbiased* variances, torch's convention); ``num_batches_tracked`` counts the
    batches (the virtual batches for ``GhostBatchNorm``).

    During the pass only the batch norms are in training mode; every other module is in
    eval mode (dropout off), so the statistics are those of the activations inference will
    see. ``BatchRenorm`` runs as plain batch norm (``r_max=1, d_max=0``): r and d would only
    pull the outputs towards the statistics being replaced.

    Args:
        model: the model; modified in place and returned.
        data: an iterable of batches, each a tensor (the model's input) or a tuple/list
            whose first element is the input (``(input, target)`` from a DataLoader).
        progress: show a progress bar (rich, on stderr); False is silent.
        device: if given, tensor inputs are moved there first.

    Afterwards each batch norm's ``momentum`` (and BatchRenorm's limits) and every module's
    training flag are as before. If a batch raises, the buffers are restored too and the
    error propagates. Raises ValueError, before anything changes, if the model has no batch
    norm with running statistics or ``data`` yields no batch.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"recalibrate expects a torch.nn.Module, got {type(model).__name__}")
    bns = [
        m
        for m in model.modules()
        if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None
    ]
    if not bns:
        raise ValueError(
            "recalibrate found no batch norm with running statistics in the model "
            "(track_running_stats=True); nothing to recompute"
        )
    batches = iter(data)
    try:
        first = next(batches)
    except StopIteration:
        raise ValueError("recalibrate needs at least one batch, but data yielded none") from None
    _model_input(first, None)  # a bad batch type raises here, before anything moves

    modes = [(m, m.training) for m in model.modules()]
    saved = [(bn, bn.momentum, [b.clone() for b in _buffers(bn)]) for bn in bns]
    limits = [(bn, bn.r_max, bn.d_max) for bn in bns if isinstance(bn, _BatchRenorm)]
    finished = False
    try:
        model.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: factor 1 / num_batches_tracked
            bn.train()
        for bn, _, _ in limits:
            bn.r_max, bn.d_max = 1.0, 0.0
        total = _length(data)
        with torch.no_grad(), _progress(progress, total) as advance:
            for batch in itertools.chain([first], batches):
                model(_model_input(batch, device))
                advance()
        finished = True
    finally:
        for bn, momentum, buffers in saved:
            bn.momentum = momentum
            if not finished:  # leave the model as it was on error
                with torch.no_grad():
                    for b, old in zip(_buffers(bn), buffers):
                        b.copy_(old)
        for bn, r_max, d_max in limits:
            bn.r_max, bn.d_max = r_max, d_max
        for m, training in modes:
            m.training = training
    return model


def _buffers(bn: _BatchNorm) -> list[Tensor]:
    return [b for b in (bn.running_mean, bn.running_var, bn.num_batches_tracked) if b is not None]


def _model_input(batch: Any, device: torch.device | str | None) -> Any:
    """The model's input in a batch: the batch itself, or the first element of a tuple/list."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise ValueError(
                "recalibrate got an empty tuple/list as a batch; expected (input, ...)"
            )
        batch = batch[0]
    elif not isinstance(batch, Tensor):
        raise TypeError(
            f"recalibrate expects batches that are tensors or (input, target) tuples/lists, "
            f'got {type(batch).__name__}; pass e.g. (x["input"] for x in data)'
        )
    if device is not None and isinstance(batch, Tensor):
        batch = batch.to(device)
    return batch


def _length(data: Iterable[Any]) -> int | None:
    try:
        return len(data)  # type: ignore[arg-type]
    except TypeError:  # a generator: the bar counts without a total
        return None


class _progress:
    """A rich progress bar on stderr, or nothing; ``with _progress(show, total) as advance``."""

    def __init__(self, show: bool, total: int | None) -> None:
        self.show, self.total, self.bar = show, total, None

    def __enter__(self):
        if not self.show:
            return lambda: None
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        self.bar = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=Console(stderr=True),
        )
        self.bar.__enter__()
        task = self.bar.add_task("recalibrating batch norms", total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)
