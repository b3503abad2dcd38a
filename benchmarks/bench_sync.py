"""SyncBatchNorm on gloo/CPU: time per training step at world size 1 and 2, and the bytes
each batch-norm layer communicates per step.

    .venv/bin/python benchmarks/bench_sync.py [--repeats 7] [--steps 20]

Each world size is a fresh group of spawned processes on 127.0.0.1, one thread each (the
team machine has 2 cores, so world size 2 uses both). The per-rank batch is fixed (weak
scaling): at world size 2 each step normalises twice as many samples in total. Rows:

* ``SyncBatchNorm fwd+bwd``: one layer, float32 ``(16, 64, 28, 28)`` per rank;
* ``BatchNorm2d fwd+bwd``: the same layer without synchronisation (the local work alone);
* ``collectives alone``: the forward all_gather and backward all_reduce of one layer's payload;
* ``CNN step (DDP)``: examples/ddp_cpu.py's model, 32 images of 12x12 per rank, forward,
  backward (DDP's gradient all_reduce included) and an SGD step.

Times are medians of ``--repeats`` blocks of ``--steps`` steps, measured on rank 0 between
barriers. The machine is shared: run it when it is otherwise idle, and read the spread.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import batchnorm
from batchnorm import SyncBatchNorm
from batchnorm.sync import _all_gather

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import ddp_cpu  # noqa: E402

SHAPE = (16, 64, 28, 28)  # per rank
HEADER = 5  # values in SyncBatchNorm's forward header (see batchnorm.sync)


def payload_bytes(channels: int, world: int, acc_bytes: int = 4) -> dict[str, int]:
    """Bytes one rank sends and receives per step for one layer (payload, no framing)."""
    fwd = (HEADER + 2 * channels) * 8  # float64 row of the all_gather
    bwd = 2 * channels * acc_bytes  # [sum_dy, sum_dy_xhat] in the accumulation dtype
    return {
        "forward all_gather, sent": fwd if world > 1 else 0,
        "forward all_gather, received": fwd * (world - 1),
        "backward all_reduce, buffer": bwd if world > 1 else 0,
    }


def _timed(fn, steps: int, repeats: int) -> tuple[float, float]:
    """(median, max - min) in ms per step over ``repeats`` blocks of ``steps`` calls."""
    fn()  # warm-up (allocations, the once-per-layer num_features check)
    blocks = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        dist.barrier()
        blocks.append((time.perf_counter() - start) * 1000 / steps)
    return statistics.median(blocks), max(blocks) - min(blocks)


def _layer_step(bn: nn.Module, x: torch.Tensor, dy: torch.Tensor):
    def step():
        x.grad = None
        bn(x).backward(dy)

    return step


def _collectives_step(channels: int, world: int):
    row = torch.zeros(HEADER + 2 * channels, dtype=torch.float64)
    sums = torch.zeros(2 * channels)

    def step():
        if world > 1:  # the same calls as SyncBatchNorm's
            _all_gather(row, None, world)
            dist.all_reduce(sums)

    return step


def _cnn_step(world: int, rank: int):
    torch.manual_seed(0)
    net = SyncBatchNorm.convert_sync_batchnorm(ddp_cpu.model())
    ddp = nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    x, labels = ddp_cpu.make_batch(rank, 32)

    def step():
        loss = nn.functional.cross_entropy(ddp(x), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def _worker(rank: int, world: int, port: int, outdir: str, steps: int, repeats: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )  # fmt: skip
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(SHAPE, generator=g).requires_grad_()
    dy = torch.randn(SHAPE, generator=g)
    C = SHAPE[1]
    rows = {
        "SyncBatchNorm fwd+bwd": _layer_step(SyncBatchNorm(C), x, dy),
        "BatchNorm2d fwd+bwd (no sync)": _layer_step(batchnorm.BatchNorm2d(C), x, dy),
        "collectives alone": _collectives_step(C, world),
        "CNN step (DDP, 2 SyncBatchNorm)": _cnn_step(world, rank),
    }
    result = {name: _timed(fn, steps, repeats) for name, fn in rows.items()}
    if rank == 0:
        torch.save(result, os.path.join(outdir, "result.pt"))
    dist.barrier()  # no destroy_process_group(): it can abort after DDP (examples/ddp_cpu.py)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--worlds", default="1,2")
    args = parser.parse_args()
    worlds = [int(w) for w in args.worlds.split(",")]

    results = {}
    for world in worlds:
        with tempfile.TemporaryDirectory() as outdir:
            mp.spawn(
                _worker, args=(world, _free_port(), outdir, args.steps, args.repeats),
                nprocs=world,
            )  # fmt: skip
            results[world] = torch.load(os.path.join(outdir, "result.pt"))

    print(
        f"per-rank input {SHAPE} float32 for the layer rows; gloo on 127.0.0.1; "
        f"{os.cpu_count()} cores; median of {args.repeats} x {args.steps} steps (± half range)"
    )
    head = "| step | " + " | ".join(f"world size {w} (ms)" for w in worlds) + " |"
    print(head)
    print("|" + "---|" * (len(worlds) + 1))
    for name in results[worlds[0]]:
        cells = [f"{results[w][name][0]:.2f} (±{results[w][name][1] / 2:.2f})" for w in worlds]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print()
    print("bytes per step per batch-norm layer, per rank (C channels; payload only):")
    for C in (SHAPE[1], 256):
        for world in worlds:
            parts = payload_bytes(C, world)
            text = ", ".join(f"{k} {v} B" for k, v in parts.items())
            print(f"  C={C}, world size {world}: {text}")


if __name__ == "__main__":
    main()
