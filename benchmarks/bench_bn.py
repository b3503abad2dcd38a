"""The benchmark of the README: ``make bench`` runs this, the same code as ``batchnorm bench``.

Example::

    $ python benchmarks/bench_bn.py                  # full table into benchmarks/results/
    $ python benchmarks/bench_bn.py --compile        # plus torch.compile rows (minutes)
    $ python benchmarks/bench_bn.py --quick --out /tmp/bench

Any option of ``batchnorm bench --help`` works; ``--out`` defaults to benchmarks/results.
"""

from __future__ import annotations

import sys
from pathlib import Path

from batchnorm.cli import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--out" not in argv:
        argv += ["--out", str(Path(__file__).resolve().parent / "results")]
    raise SystemExit(main(["bench", *argv]))
