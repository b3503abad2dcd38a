"""Fused relu (and relu(bn(x) + z)) against batch norm then relu: medians, one process, a table.

Example::

    .venv/bin/python benchmarks/bench_activation.py --shape 32,64,56,56 --repeats 20

Three ways to compute ``relu(bn(x))`` (and ``relu(bn(x) + z)`` with ``--residual``):

* ``ours fused``: ``batchnorm.BatchNorm2d(C, activation="relu")``, one pass in the kernel;
* ``ours bn, torch.relu``: our BatchNorm2d, then ``torch.relu`` (an extra read and write);
* ``torch bn, torch.relu``: ``torch.nn.BatchNorm2d`` then ``torch.relu``, the baseline.

Each is timed in three modes: forward in training mode, forward in eval mode (both under
``torch.no_grad``, as inference and the statistics pass run), and forward + backward in
training mode. Every timing is the median of ``--repeats`` runs after ``--warmup`` runs, all
in this one process, the variants taking turns run by run; the table gives the median and the
minimum in milliseconds and the ratio of medians to torch's bn then relu.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import torch

import batchnorm


def _medians_ms(
    fns: list[Callable[[], object]], repeats: int, warmup: int
) -> list[tuple[float, float]]:
    """(median, min) milliseconds of each function, timed round-robin: on a shared machine a
    burst of load then hits every variant alike, not just the one that happened to run."""
    for fn in fns:
        for _ in range(warmup):  # numba compiles, caches warm up
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [(1e3 * statistics.median(t), 1e3 * min(t)) for t in times]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _variants(C: int, backend: str, residual: bool, dtype: torch.dtype):
    """name -> (module or modules to set train/eval on, function of (x, z) -> y)."""
    fused = batchnorm.BatchNorm2d(C, activation="relu", backend=backend).to(dtype)
    ours = batchnorm.BatchNorm2d(C, backend=backend).to(dtype)
    theirs = torch.nn.BatchNorm2d(C).to(dtype)
    if residual:
        return {
            "ours fused": (fused, lambda x, z: fused(x, residual=z)),
            "ours bn, + z, torch.relu": (ours, lambda x, z: torch.relu(ours(x) + z)),
            "torch bn, + z, torch.relu": (theirs, lambda x, z: torch.relu(theirs(x) + z)),
        }
    return {
        "ours fused": (fused, lambda x, z: fused(x)),
        "ours bn, torch.relu": (ours, lambda x, z: torch.relu(ours(x))),
        "torch bn, torch.relu": (theirs, lambda x, z: torch.relu(theirs(x))),
    }


def run(args: argparse.Namespace) -> list[tuple[str, str, tuple[float, float]]]:
    shape = tuple(int(s) for s in args.shape.split(","))
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype)
    z = torch.randn(shape, generator=g).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    if args.channels_last:
        x, z, dy = (t.to(memory_format=torch.channels_last) for t in (x, z, dy))
    xg = x.clone().requires_grad_()
    zg = z.clone().requires_grad_() if args.residual else z

    labels, fns = [], []
    for name, (module, f) in _variants(shape[1], args.backend, args.residual, dtype).items():

        def train_fwd(module=module, f=f):
            module.train()
            with torch.no_grad():
                return f(x, z)

        def eval_fwd(module=module, f=f):
            module.eval()
            with torch.no_grad():
                return f(x, z)

        def train_fwd_bwd(module=module, f=f):
            module.train()
            xg.grad = None
            if args.residual:
                zg.grad = None
            f(xg, zg).backward(dy)

        for mode, fn in (
            ("forward, train", train_fwd),
            ("forward, eval", eval_fwd),
            ("forward + backward, train", train_fwd_bwd),
        ):
            labels.append((mode, name))
            fns.append(fn)
    medians = _medians_ms(fns, args.repeats, args.warmup)
    return [(mode, name, ms) for (mode, name), ms in zip(labels, medians)]


def table(rows: list[tuple[str, str, tuple[float, float]]]) -> str:
    """Markdown: median (the figure compared) and min (what a quiet machine approaches)."""
    base = {mode: ms[0] for mode, name, ms in rows if name.startswith("torch")}
    lines = [
        "| mode | variant | median ms | min ms | median vs torch bn then relu |",
        "|---|---|---:|---:|---:|",
    ]
    for mode in dict.fromkeys(m for m, _, _ in rows):
        for m, name, (med, low) in rows:
            if m == mode:
                lines.append(
                    f"| {mode} | {name} | {med:.2f} | {low:.2f} | {med / base[mode]:.2f}x |"
                )
    return "\n".join(lines)


def _check_agreement(args: argparse.Namespace) -> None:
    """The variants compute the same numbers (a benchmark of wrong code measures nothing)."""
    shape = (2, *(int(s) for s in args.shape.split(",")[1:]))
    x, z = torch.randn(shape), torch.randn(shape)
    outs = [
        f(x, z) for _, f in _variants(shape[1], args.backend, args.residual, torch.float32).values()
    ]
    for y in outs[1:]:
        if not torch.allclose(outs[0], y, rtol=1e-4, atol=1e-4):
            raise SystemExit("bench_activation: the variants disagree; not timing them")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="32,64,56,56", help="N,C,H,W (default 32,64,56,56)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    p.add_argument("--backend", default="auto", choices=list(batchnorm.backends.BACKENDS))
    p.add_argument("--residual", action="store_true", help="time relu(bn(x) + z) instead")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = p.parse_args(argv)
    try:
        shape = tuple(int(s) for s in args.shape.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1 or shape[0] * math.prod(shape[2:]) < 2:
        print(f"bench_activation: --shape must be N,C,H,W with N*H*W >= 2, got {args.shape!r}",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.repeats < 1 or args.warmup < 0:
        print("bench_activation: --repeats must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    _check_agreement(args)
    backend = batchnorm.backends.select(args.backend, torch.empty(1, 1, dtype=torch.float32))
    rows = run(args)
    layout = "channels_last" if args.channels_last else "NCHW"
    print(
        f"relu(bn(x){' + z' if args.residual else ''}), shape {args.shape}, {args.dtype}, "
        f"{layout}, backend {args.backend} ({backend.name}), median of {args.repeats}\n"
        f"{_cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, python {platform.python_version()}\n"
    )
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
