"""``batchnorm demo``: train one small CNN twice, with torch's BatchNorm2d and with this package's.

Example::

    $ batchnorm demo                       # a few epochs on scikit-learn's 8x8 digits
    $ batchnorm demo --epochs 3 --plot loss.png

Both runs start from the same weights (a deep copy) and see the same batches in the same
order; the only difference is which batch norm runs. Their losses agree to float32 rounding at
first; then, as in any training with ReLU and max-pooling at this learning rate, rounding-level
differences grow. So a third run, the control, shows how much: torch's own model again, in the
channels_last memory format, where torch's convolution and batch norm run other kernels that
round differently (the same math, equally valid float32). Ours should stay about as close to
torch as torch's own channels-last run does.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .cli import UsageError, check_png

__all__ = ["DemoResult", "make_model", "load_data", "train", "add_parser", "run"]

DEFAULT_EPOCHS = 8
BATCH_SIZE = 32
LEARNING_RATE = 0.03  # higher rates make training chaotic sooner (see the control)
SEED = 0
# torch's BN, ours, and the control: torch's model again, computed by its channels-last kernels
RUNS = ("torch", "ours", "control")


def make_model() -> nn.Sequential:
    """Three conv-BN-ReLU blocks on (N, 1, 8, 8) digits, then a linear classifier.

    The convolutions have no bias: the batch norm's ``bias`` takes that role.
    """
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False),  # (N, 16, 8, 8)
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False),  # (N, 32, 8, 8)
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.MaxPool2d(2),  # (N, 32, 4, 4)
        nn.Conv2d(32, 64, 3, padding=1, bias=False),  # (N, 64, 4, 4)
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),  # (N, 64)
        nn.Linear(64, 10),
    )


def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits (1797 images, 8x8, shipped with it: no download), split
    1437 / 360 with a fixed permutation. Pixels 0..16 are scaled to 0..1."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UsageError("needs scikit-learn: pip install 'batchnorm[demo]'") from None
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    y = torch.tensor(digits.target, dtype=torch.int64)  # (1797,)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(SEED))
    x, y = x[order], y[order]
    n_test = 360
    return x[n_test:], y[n_test:], x[:n_test], y[:n_test]


@dataclass
class DemoResult:
    """Per step training losses and per epoch test accuracy and seconds, of both runs."""

    loss: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in RUNS})
    accuracy: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in RUNS})
    seconds: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in RUNS})
    steps_per_epoch: int = 0

    def max_loss_diff(self, run: str = "ours") -> float:
        """max over steps so far of |loss of ``run`` - loss of torch's run|."""
        a, b = np.asarray(self.loss["torch"]), np.asarray(self.loss[run])
        return float(np.abs(a - b).max()) if a.size else 0.0

    def identical_steps(self) -> int:
        """Steps from the start whose two losses are bitwise equal."""
        same = np.asarray(self.loss["torch"]) == np.asarray(self.loss["ours"])
        return int(same.size if same.all() else np.argmin(same))


def _train_epoch(model, optimizer, x, y, order, on_step) -> tuple[list[float], float]:
    model.train()
    losses = []
    start = time.perf_counter()
    for i in range(0, len(order), BATCH_SIZE):
        idx = order[i : i + BATCH_SIZE]
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        on_step()
    return losses, time.perf_counter() - start


@torch.no_grad()
def _accuracy(model, x, y) -> float:
    model.eval()  # the running buffers, not the batch, normalise here
    return float((model(x).argmax(dim=1) == y).float().mean())


def train(epochs: int, on_step=lambda: None, on_epoch=lambda epoch, result: None) -> DemoResult:
    """Train the torch-BN model and its converted copy for ``epochs`` on the same batches."""
    from . import convert

    x_train, y_train, x_test, y_test = load_data()
    torch.manual_seed(SEED)
    models = {"torch": make_model()}
    models["ours"] = convert(copy.deepcopy(models["torch"]))
    # the same weights and math, other kernels (other rounding): torch's own drift
    models["control"] = copy.deepcopy(models["torch"]).to(memory_format=torch.channels_last)
    optimizers = {
        k: torch.optim.SGD(m.parameters(), lr=LEARNING_RATE, momentum=0.9)
        for k, m in models.items()
    }
    _warm_up(models, x_train[:BATCH_SIZE])
    g = torch.Generator().manual_seed(SEED + 1)
    result = DemoResult(steps_per_epoch=-(-len(y_train) // BATCH_SIZE))
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(y_train), generator=g)  # one order, used by both runs
        for name, model in models.items():
            losses, seconds = _train_epoch(
                model, optimizers[name], x_train, y_train, order, on_step
            )
            result.loss[name] += losses
            result.seconds[name].append(seconds)
            result.accuracy[name].append(_accuracy(model, x_test, y_test))
        on_epoch(epoch, result)
    return result


def _warm_up(models: dict[str, nn.Module], x: torch.Tensor) -> None:
    """One forward and backward of a throwaway copy of each model, so that one-time costs (a
    kernel's JIT compilation, allocator growth) do not land in the first epoch's time."""
    for model in models.values():
        scratch = copy.deepcopy(model).train()
        scratch(x).sum().backward()


def _epochs(text: str) -> int:
    try:
        e = int(text)
    except ValueError:
        e = 0
    if not 1 <= e <= 1000:
        raise argparse.ArgumentTypeError(f"expected an integer in [1, 1000], got {text!r}")
    return e


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``batchnorm demo``."""
    p = subparsers.add_parser(
        "demo",
        help="train a small CNN on digits with torch's BatchNorm2d and with ours, side by side",
        description=__doc__.splitlines()[0],
    )
    p.add_argument(
        "--epochs", type=_epochs, default=DEFAULT_EPOCHS, help=f"default {DEFAULT_EPOCHS}"
    )
    p.add_argument("--plot", metavar="FILE.png", help="write both loss curves to a PNG")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    """``batchnorm demo``: see the module docstring."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    if args.plot is not None:
        check_png(args.plot)
    load_data()  # fail early, before the progress bar, if scikit-learn is missing

    console = Console(width=None if sys.stdout.isatty() else max(Console().width, 100))
    console.print(
        "[bold]batchnorm demo[/]: a 3-block conv-BN-ReLU CNN on scikit-learn's 8x8 digits "
        f"(1437 train / 360 test), SGD lr {LEARNING_RATE} momentum 0.9, batch {BATCH_SIZE}; "
        "trained twice from the same initialisation and batch order: with "
        "torch.nn.BatchNorm2d, and with batchnorm.BatchNorm2d (batchnorm.convert); a control "
        "run is torch's again in channels_last (its other kernels, other rounding). Loss: "
        "mean training loss of the epoch; acc: test accuracy in eval mode; max|Δloss|: largest "
        "difference from torch's loss curve so far."
    )
    header = (
        f"{'epoch':>5} {'loss torch':>11} {'loss ours':>11} {'acc torch':>9} {'acc ours':>9} "
        f"{'max|Δloss| ours':>16} {'control':>8} {'s torch':>8} {'s ours':>7}"
    )
    console.print(header, style="bold", highlight=False)

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        spe = -(-1437 // BATCH_SIZE)
        task = progress.add_task(
            "training torch, ours, control", total=len(RUNS) * spe * args.epochs
        )

        def on_epoch(epoch: int, r: DemoResult) -> None:
            last = slice(-r.steps_per_epoch, None)
            progress.console.print(
                f"{epoch:>5} {np.mean(r.loss['torch'][last]):>11.5f} "
                f"{np.mean(r.loss['ours'][last]):>11.5f} {r.accuracy['torch'][-1]:>9.1%} "
                f"{r.accuracy['ours'][-1]:>9.1%} {r.max_loss_diff('ours'):>16.1e} "
                f"{r.max_loss_diff('control'):>8.1e} {r.seconds['torch'][-1]:>8.2f} "
                f"{r.seconds['ours'][-1]:>7.2f}",
                highlight=False,
            )

        result = train(args.epochs, on_step=lambda: progress.advance(task), on_epoch=on_epoch)

    d, dc = result.max_loss_diff("ours"), result.max_loss_diff("control")
    total_torch, total_ours = sum(result.seconds["torch"]), sum(result.seconds["ours"])
    console.print(
        f"{len(result.loss['torch'])} steps each; the first {result.identical_steps()} losses "
        f"of ours and torch are bitwise equal. Largest difference between the two loss curves: "
        f"{d:.2e}; torch against itself in channels_last (other kernels): {dc:.2e}. "
        f"Training time: torch {total_torch:.2f} s, ours {total_ours:.2f} s."
    )
    if args.plot is not None:
        from . import _plot

        title = (
            f"digits CNN, {args.epochs} epoch(s): torch.nn.BatchNorm2d vs batchnorm.BatchNorm2d "
            f"(max |Δloss| {d:.1e})"
        )
        try:
            _plot.demo_figure(args.plot, result.loss, result.steps_per_epoch, title)
        except OSError as err:
            raise UsageError(f"--plot {args.plot}: cannot write it ({err.strerror})") from None
        console.print(f"wrote {args.plot}")
    return 0
