"""First-call cost in fresh processes, with numba's disk cache cold (an empty cache directory)
and warm (the same directory, second time).

    python benchmarks/first_call.py [--pairs 2]

Each measurement is a new ``python`` process that times, with ``time.perf_counter``: the
imports, then the first call of each kind on a ``(8, 64, 56, 56)`` float32 BatchNorm2d
(training forward with a graph, its backward, channels-last forward + backward, eval under
``torch.no_grad``), then a small eval (``(8, 32, 3, 3)``) in a process of its own. Prints one
line per process (seconds) and a cold/warm table of the ranges.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

MAIN = r"""
import json, time
t = time.perf_counter()
import torch, batchnorm
out = {"import torch + batchnorm": time.perf_counter() - t}
torch.manual_seed(0)
bn = batchnorm.BatchNorm2d(64)
x = torch.randn(8, 64, 56, 56, requires_grad=True)

def timed(name, fn):
    t = time.perf_counter()
    r = fn()
    out[name] = time.perf_counter() - t
    return r

y = timed("first forward-train, NCHW (with a graph)", lambda: bn(x))
timed("first backward, NCHW", lambda: y.backward(torch.ones_like(y)))
xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(True)
timed("first channels-last forward + backward", lambda: bn(xc).sum().backward())
bn.eval()
with torch.no_grad():
    timed("first eval, NCHW (no_grad)", lambda: bn(x))
print(json.dumps(out))
"""

SMALL = r"""
import json, time
import torch, batchnorm
bn = batchnorm.BatchNorm2d(32).eval()
x = torch.randn(8, 32, 3, 3)
with torch.no_grad():
    t = time.perf_counter()
    bn(x)
    seconds = time.perf_counter() - t
print(json.dumps({"first eval of (8, 32, 3, 3) in a process of its own": seconds}))
"""


def _run(code: str, cache: str) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"first_call: a measuring process failed: {done.stderr.strip()[-300:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2, help="cold/warm pairs (default 2)")
    args = parser.parse_args()
    rows: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.pairs):
        for code in (MAIN, SMALL):
            with tempfile.TemporaryDirectory() as cache:
                for state in ("cold", "warm"):
                    got = _run(code, cache)
                    print(state, json.dumps({k: round(v, 3) for k, v in got.items()}))
                    for name, seconds in got.items():
                        rows.setdefault(name, {"cold": [], "warm": []})[state].append(seconds)

    def span(v: list[float]) -> str:
        lo, hi = min(v), max(v)
        return f"{lo:.2f} s" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}-{hi:.2f} s"

    print("\n| | cold cache (compiles) | warm cache |\n|---|---|---|")
    for name, by_state in rows.items():
        print(f"| {name} | {span(by_state['cold'])} | {span(by_state['warm'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
