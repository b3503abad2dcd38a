"""Bitwise determinism of the numba backend whatever the thread count.

The same script runs in two fresh processes, with 1 and with 2 threads (torch's thread count,
which the numba backend follows), and hashes the bytes of every output, gradient and buffer.
The shapes are above ``numba_cpu.PARALLEL_MIN`` so the parallel kernels run; each process
also reports the numba pool size it used, so the test cannot pass by running serially twice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
]
for shape, cl, dtype in cases:
    g = torch.Generator().manual_seed(0)
    pd = torch.float64 if dtype == torch.float64 else torch.float32
    x = (torch.randn(shape, generator=g, dtype=pd) * 3 + 1).to(dtype)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else
                         torch.channels_last_3d)
    C = shape[1]
    w = (torch.rand(C, generator=g, dtype=pd) + 0.5).requires_grad_(True)
    b = torch.randn(C, generator=g, dtype=pd).requires_grad_(True)
    res = torch.randn(shape, generator=g, dtype=pd).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=pd).to(dtype)
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


def _run(threads: int) -> dict:
    env = dict(os.environ, NUMBA_NUM_THREADS="2", OMP_NUM_THREADS=str(threads))
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
