"""Bitwise determinism of the numba backend whatever the thread count, cache state and CPU.

The same script runs in fresh processes, with 1 and with 2 threads (torch's thread count,
which the numba backend follows), and hashes the bytes of every output, gradient and buffer.
Most shapes are above ``numba_cpu.PARALLEL_MIN`` so the parallel kernels run; each process
also reports the numba pool size it used, so the test cannot pass by running serially twice.

The kernels are compiled without fast-math, so the bytes must not depend on how they were
compiled either: a run that compiles everything afresh (an empty ``NUMBA_CACHE_DIR``) for
another CPU (``NUMBA_CPU_NAME=generic``: SSE2 vectors instead of this machine's) must give the
same digests, and so must the next run, which loads those kernels from that cache. (With
``reassoc`` a fresh compile and a cache load were seen to differ in sum_dy's last bits.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from batchnorm.backends import numba_cpu as nb

SCRIPT = r"""
import hashlib, json, sys
import numba, torch
import batchnorm.functional as BF

torch.set_num_threads(int(sys.argv[1]))
digests, pools = {}, set()
cases = [
    ((4, 24, 37, 41), False, torch.float32),  # NCHW, one channel per work item
    ((3, 7, 61, 67), False, torch.float64),
    ((8, 48, 23, 29), True, torch.float32),  # channels-last, blocks of rows
    ((5000, 37), False, torch.float32),  # (N, C)
    ((4, 24, 37, 41), True, torch.bfloat16),
    ((2, 6, 9, 40, 41), True, torch.float32),  # 3d channels-last
    ((2, 2, 300, 300), False, torch.float32),  # a channel over L2_BUDGET: chunked moments
    ((8, 32, 3, 3), False, torch.float32),  # small: serial kernels, eval in one direct call
    ((8, 32, 3, 3), True, torch.float64),
    ((67, 40, 7, 7), False, torch.float32),  # short runs, N prime > FLUSH_ROWS: 4-sample steps
    ((2, 1031, 5, 7), True, torch.float32),  # channels-last, C > 512
    ((74, 64, 30, 30), False, torch.float32),  # over 16 MiB, runs of 900: next runs prefetched
    ((8, 40, 17, 19), False, torch.float16),  # above PARALLEL_MIN, as the two below
    ((5, 24, 31, 37), "transposed", torch.float32),  # a view, copied to NCHW first
]
for shape, cl, dtype in cases:
    g = torch.Generator().manual_seed(0)
    pd = torch.float64 if dtype == torch.float64 else torch.float32
    x = (torch.randn(shape, generator=g, dtype=pd) * 3 + 1).to(dtype)
    if cl is True:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else
                         torch.channels_last_3d)
    C = shape[1]
    w = (torch.rand(C, generator=g, dtype=pd) + 0.5).requires_grad_(True)
    b = torch.randn(C, generator=g, dtype=pd).requires_grad_(True)
    res = torch.randn(shape, generator=g, dtype=pd).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=pd).to(dtype)
    if cl == "transposed":
        x, res, dy = x.transpose(2, 3), res.transpose(2, 3), dy.transpose(2, 3)
    rm, rv = torch.zeros(C, dtype=pd), torch.ones(C, dtype=pd)
    outs = []
    for activation, residual in ((None, None), ("relu", res)):
        xg = x.clone().requires_grad_(True)
        y = BF.batch_norm(xg, rm, rv, w, b, training=True, momentum=0.1, backend="numba",
                          residual=residual, activation=activation)
        dx, dw, db = torch.autograd.grad(y, (xg, w, b), dy)
        y_eval = BF.batch_norm(x, rm, rv, w, b, training=False, backend="numba")
        outs += [y, dx, dw, db, rm, rv, y_eval]
    pools.add(numba.get_num_threads())
    h = hashlib.sha256()
    for t in outs:
        h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
    digests[f"{shape}-{cl}-{dtype}"] = h.hexdigest()
print(json.dumps({"digests": digests, "pools": sorted(pools)}))
"""


def _run(threads: int, **extra_env: str) -> dict:
    env = dict(os.environ, NUMBA_NUM_THREADS="2", OMP_NUM_THREADS=str(threads), **extra_env)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(threads)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_one_and_two_threads_give_identical_bytes():
    one = _run(1)
    two = _run(2)
    assert one["pools"] == [1]
    assert two["pools"] == [2]
    assert one["digests"].keys() == two["digests"].keys()
    differing = [k for k in one["digests"] if one["digests"][k] != two["digests"][k]]
    assert not differing, f"outputs differ between 1 and 2 threads for {differing}"


def test_fresh_compile_for_another_cpu_and_cache_load_give_identical_bytes(tmp_path):
    here = _run(2)
    cache = {"NUMBA_CACHE_DIR": str(tmp_path), "NUMBA_CPU_NAME": "generic"}
    fresh = _run(2, **cache)
    assert any(tmp_path.rglob("*.nbi")), "the fresh run wrote no numba cache"
    loaded = _run(2, **cache)
    for label, other in (("a fresh generic-CPU compile", fresh), ("its cache load", loaded)):
        assert other["digests"].keys() == here["digests"].keys()
        differing = [k for k in here["digests"] if here["digests"][k] != other["digests"][k]]
        assert not differing, f"{label} differs from this process's kernels for {differing}"


# --- the split functions (SyncBatchNorm's path) on examples/ddp_cpu.py's shapes -------------
#
# A report of non-reproducible DDP runs (examples/ddp_cpu.py) suspected uninitialised scratch
# or per-thread thread-count state. These pin both down for the split functions: outputs must
# not depend on what the memory held before, nor on the Python thread that calls them.

# (A, C, B): the example's two batch norms on a rank's shard of 32 and in eval on 500 (NCHW),
# the first above numba_cpu.PARALLEL_MIN; and channels-last views (B == 1), serial and parallel.
SPLIT_SHAPES = [(32, 16, 144), (32, 32, 25), (500, 16, 144), (4608, 16, 1), (800, 32, 1)]


def _split_outputs(shape) -> list[bytes]:
    A, C, B = shape
    g = torch.Generator().manual_seed(5)
    x3 = torch.randn(shape, generator=g) * 3 + 1
    dy3 = torch.randn(shape, generator=g)
    w = torch.rand(C, generator=g) + 0.5
    b = torch.randn(C, generator=g)
    mean, var = nb.batch_stats(x3)
    invstd = 1 / torch.sqrt(var + 1e-5)
    y3 = nb.normalize(x3, mean, invstd, w, b)
    sum_dy, sum_dy_xhat = nb.grad_sums(dy3, x3, mean, invstd)
    dx3 = nb.grad_input(dy3, x3, mean, invstd, w, sum_dy, sum_dy_xhat, A * B, True)
    return [t.contiguous().view(torch.uint8).numpy().tobytes()
            for t in (mean, var, y3, sum_dy, sum_dy_xhat, dx3)]  # fmt: skip


@pytest.mark.parametrize("shape", SPLIT_SHAPES, ids=str)
def test_split_functions_ignore_leftover_memory(shape, monkeypatch):
    clean = _split_outputs(shape)
    # every new float tensor (our outputs) starts as NaN, and the heap that numba's scratch
    # comes from is full of freed NaN blocks: a value read before it is written would show
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    for n in (64, 1024, 4096, 65536, 300_000):
        blocks = [np.full(n, np.nan, np.float32) for _ in range(4)]
        blocks += [np.full(n, np.nan, np.float64) for _ in range(4)]
        del blocks
    assert _split_outputs(shape) == clean


@pytest.mark.parametrize("shape", SPLIT_SHAPES[:3], ids=str)
def test_split_functions_give_the_same_bytes_on_another_thread(shape):
    # autograd and DDP hooks may call the kernels from threads where torch's and numba's
    # thread counts were never set; the bytes must not change
    main = _split_outputs(shape)
    out = {}
    t = threading.Thread(target=lambda: out.update(other=_split_outputs(shape)))
    t.start()
    t.join()
    assert out["other"] == main
