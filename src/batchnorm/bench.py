"""``batchnorm bench``: our batch norm against torch eager, torch.compile and the copy floor.

Example::

    $ batchnorm bench --quick                      # a few small shapes, seconds
    $ batchnorm bench --out benchmarks/results     # the full table, markdown + CSV
    $ batchnorm bench --compile --shapes 8,64,112,112 --passes forward-train

Every method of a row is timed in the same process, interleaved (ours, torch, compile, copy,
ours, torch, ...), and the median of ``--repeat`` samples is reported, so a noisy neighbour
slows all of them alike. Each sample runs the call ``inner`` times (enough for about 2 ms)
and reports the per-call time, which makes tiny shapes measurable.

* ours: ``batchnorm.functional.batch_norm(..., backend=--backend)`` (the public API,
  including validation, autograd.Function and the running-statistics update);
* torch: ``torch.nn.functional.batch_norm`` (eager);
* compile: ``torch.compile`` of that same call (``--compile``; compile time reported apart);
* copy: ``out.copy_(x)`` into a preallocated tensor of the same size: one read and one write,
  the floor of forward-eval and of a cache-fused forward-train.

Backward rows time ``torch.autograd.grad(y, (x, weight, bias), dy, retain_graph=True)`` on
one recorded graph, so only the backward kernels (and the autograd engine) are measured.
Outputs are fresh tensors in every method but copy; tensors over 32 MiB (glibc's largest
mmap threshold) may be mapped fresh on a call, so their rows can pay a page fault per 4 KiB
of output, in one method or both, varying from run to run, which the copy floor does not.
Smaller ones come from the heap once glibc has raised its threshold, which a training
process has done long ago; the benchmark does it first (one 31 MiB block freed), or the
first rows would pay page faults too.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

PASSES = ("forward-train", "forward-eval", "backward")
LAYOUTS = ("nchw", "channels_last")
# ResNet-50 layers at batch 8 and 32, a BatchNorm1d, and a tiny one for per-call overhead.
SHAPES = (
    (8, 64, 112, 112),
    (8, 256, 56, 56),
    (32, 256, 56, 56),
    (32, 256, 28, 28),
    (32, 512, 28, 28),
    (64, 512, 7, 7),
    (32, 2048, 7, 7),
    (65536, 64),
    (8, 32, 3, 3),
)
QUICK_SHAPES = ((8, 64, 56, 56), (32, 256, 14, 14), (16384, 64), (8, 32, 3, 3))
PAGE_FAULT_BYTES = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
SAMPLE_SECONDS = 2e-3
WARM_SECONDS = 0.05


@dataclass
class Row:
    shape: str
    layout: str
    pass_: str
    mib: float
    ours_ms: float
    torch_ms: float
    copy_ms: float
    compile_ms: float = math.nan
    compile_s: float = math.nan  # seconds spent compiling this row's function
    page_faults: bool = False
    extra: dict = field(default_factory=dict)  # min_<method>_ms: the fastest sample

    @property
    def speedup_torch(self) -> float:
        return self.torch_ms / self.ours_ms

    @property
    def speedup_compile(self) -> float:
        return self.compile_ms / self.ours_ms

    @property
    def ratio_copy(self) -> float:
        return self.ours_ms / self.copy_ms


def parse_shapes(text: str) -> tuple[tuple[int, ...], ...]:
    """``"8,64,112,112;65536,64"`` -> ((8, 64, 112, 112), (65536, 64))."""
    shapes = []
    for part in text.split(";"):
        try:
            shape = tuple(int(v) for v in part.split(","))
        except ValueError:
            shape = ()
        if len(shape) < 2 or min(shape) < 1:
            raise ValueError(
                f"--shapes: expected shapes like 8,64,112,112;65536,64 (N, C, *spatial, "
                f"every size >= 1), got {part!r}"
            )
        shapes.append(shape)
    return tuple(shapes)


def _choices(text: str, allowed: tuple[str, ...], option: str) -> tuple[str, ...]:
    picked = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in picked if p not in allowed]
    if bad or not picked:
        raise ValueError(f"{option}: expected a comma list of {', '.join(allowed)}, got {text!r}")
    return picked


def _make(shape, layout, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype) * 2 + 0.5
    if layout == "channels_last":
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        elif x.dim() == 5:
            x = x.contiguous(memory_format=torch.channels_last_3d)
    return x


def _per_call(fns: dict, repeat: int, inner: int) -> tuple[dict, dict]:
    """Interleaved samples; (median, min) per-call seconds of each method."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner):
                f()
            samples[k].append((time.perf_counter() - t0) / inner)
    med = {k: statistics.median(v) for k, v in samples.items()}
    return med, {k: min(v) for k, v in samples.items()}


def _callables(shape, layout, pass_, backend, use_compile, dtype):
    """{method: zero-arg callable} for one row, and the compile time in seconds."""
    import torch.nn.functional as F

    import batchnorm.functional as BF

    C = shape[1]
    x = _make(shape, layout, dtype)
    out = torch.empty_like(x)
    weight = torch.rand(C, dtype=dtype) + 0.5
    bias = torch.randn(C, dtype=dtype)
    rm, rv = torch.zeros(C, dtype=dtype), torch.ones(C, dtype=dtype)
    training = pass_ != "forward-eval"

    def ours_fn(x, rm, rv, w, b):
        return BF.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5, backend=backend)

    def torch_fn(x, rm, rv, w, b):
        return F.batch_norm(x, rm, rv, w, b, training, 0.1, 1e-5)

    impls = {"ours": ours_fn, "torch": torch_fn}
    compile_s = math.nan
    if use_compile:
        torch._dynamo.reset()
        impls["compile"] = torch.compile(torch_fn, dynamic=False)

    fns = {}
    if pass_ == "backward":
        dy = _make(shape, layout, dtype, seed=1)
        for name, impl in impls.items():
            xg = x.clone().requires_grad_(True)
            wg = weight.clone().requires_grad_(True)
            bg = bias.clone().requires_grad_(True)
            t0 = time.perf_counter()
            y = impl(xg, rm.clone(), rv.clone(), wg, bg)
            torch.autograd.grad(y, (xg, wg, bg), dy, retain_graph=True)
            if name == "compile":
                compile_s = time.perf_counter() - t0

            def step(y=y, xg=xg, wg=wg, bg=bg):
                torch.autograd.grad(y, (xg, wg, bg), dy, retain_graph=True)

            fns[name] = step
    else:
        for name, impl in impls.items():
            rmi, rvi = rm.clone(), rv.clone()
            t0 = time.perf_counter()
            impl(x, rmi, rvi, weight, bias)
            if name == "compile":
                compile_s = time.perf_counter() - t0
            fns[name] = lambda impl=impl, rmi=rmi, rvi=rvi: impl(x, rmi, rvi, weight, bias)
    fns["copy"] = lambda: out.copy_(x)
    return fns, compile_s


def _allocator_warmup() -> None:
    block = torch.empty((PAGE_FAULT_BYTES - (1 << 20)) // 4, dtype=torch.float32)
    block[::1024] = 0  # touch it
    del block


def measure(
    shapes,
    passes=PASSES,
    layouts=LAYOUTS,
    repeat: int = 15,
    backend: str = "numba",
    use_compile: bool = False,
    dtype: torch.dtype = torch.float32,
    log=print,
) -> list[Row]:
    rows = []
    # glibc serves allocations at or above its mmap threshold with fresh pages (a fault per
    # 4 KiB on first touch) and raises the threshold to the size of each mmapped block freed,
    # up to 32 MiB. A long-running training process has long since raised it; free one block
    # just under 32 MiB so that this process starts in that steady state too, instead of the
    # first rows paying page faults depending on what ran before them.
    _allocator_warmup()
    for shape in shapes:
        for layout in layouts:
            if layout == "channels_last" and len(shape) not in (4, 5) and "nchw" in layouts:
                continue  # (N, C) and (N, C, L) have one layout; report it once
            for pass_ in passes:
                fns, compile_s = _callables(shape, layout, pass_, backend, use_compile, dtype)
                for f in fns.values():  # warm: first calls (allocator, thread pools) out of
                    t0 = time.perf_counter()  # the samples, at least 3 calls and 50 ms each
                    for i in range(1000):
                        f()
                        if i >= 2 and time.perf_counter() - t0 > WARM_SECONDS:
                            break
                t0 = time.perf_counter()
                fns["torch"]()
                one = max(time.perf_counter() - t0, 1e-7)
                inner = max(1, min(1000, int(SAMPLE_SECONDS / one)))
                med, best = _per_call(fns, repeat, inner)
                nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
                row = Row(
                    shape="x".join(map(str, shape)),
                    layout=layout if len(shape) in (4, 5) else "(N,C)/(N,C,L)",
                    pass_=pass_,
                    mib=nbytes / 2**20,
                    ours_ms=med["ours"] * 1e3,
                    torch_ms=med["torch"] * 1e3,
                    copy_ms=med["copy"] * 1e3,
                    compile_ms=med.get("compile", math.nan) * 1e3,
                    compile_s=compile_s,
                    page_faults=nbytes > PAGE_FAULT_BYTES,
                    extra={f"min_{k}_ms": v * 1e3 for k, v in best.items()},
                )
                rows.append(row)
                log(_text_line(row, use_compile))
    return rows


def _text_line(r: Row, use_compile: bool) -> str:
    line = (
        f"{r.shape:>16} {r.layout:>13} {r.pass_:>13}  ours {r.ours_ms:8.3f} ms  "
        f"torch {r.torch_ms:8.3f} ms ({r.speedup_torch:5.2f}x)  copy {r.copy_ms:7.3f} ms "
        f"(ours/copy {r.ratio_copy:5.2f})"
    )
    if use_compile:
        line += (
            f"  compile {r.compile_ms:8.3f} ms ({r.speedup_compile:5.2f}x, compiled in"
            f" {r.compile_s:.1f} s)"
        )
    return line + ("  [page faults]" if r.page_faults else "")


def _threading_layer() -> str:
    import numba

    try:
        return numba.threading_layer()  # known once a parallel kernel has run
    except ValueError:
        return f"{numba.config.THREADING_LAYER} (not started yet)"


def machine() -> dict[str, str]:
    """Where the numbers come from."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import numba

    info = {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "numba threading layer": _threading_layer(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numba": numba.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    try:
        info["load average (1, 5, 15 min)"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        pass
    return info


def to_markdown(rows: list[Row], info: dict[str, str], command: str, use_compile: bool) -> str:
    lines = [
        "# Benchmark: batchnorm (numba) vs torch eager"
        + (", torch.compile" if use_compile else ""),
        "",
        f"Command: `{command}`",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        "",
        "Times are medians of interleaved samples, ms per call; speedup > 1 means ours is "
        "faster; ours/copy is our time over a `copy_` of the same tensor (1 read + 1 write). "
        "PF: the tensor is over 32 MiB, so fresh outputs pay page faults (torch and ours).",
        "",
    ]
    head = ["shape", "layout", "pass", "MiB", "ours ms", "torch ms", "vs torch"]
    if use_compile:
        head += ["compile ms", "vs compile", "compile s"]
    head += ["copy ms", "ours/copy", "PF"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.shape, r.layout, r.pass_, f"{r.mib:.1f}", f"{r.ours_ms:.3f}",
                 f"{r.torch_ms:.3f}", f"{r.speedup_torch:.2f}x"]  # fmt: skip
        if use_compile:
            cells += [f"{r.compile_ms:.3f}", f"{r.speedup_compile:.2f}x", f"{r.compile_s:.1f}"]
        cells += [f"{r.copy_ms:.3f}", f"{r.ratio_copy:.2f}", "PF" if r.page_faults else ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(rows, out: Path, info, command, use_compile) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    md = out / "bench.md"
    md.write_text(to_markdown(rows, info, command, use_compile))
    path_csv = out / "bench.csv"
    with path_csv.open("w", newline="") as f:
        w = csv.writer(f)
        fields = [k for k in asdict(rows[0]) if k != "extra"] if rows else []
        extras = sorted({k for r in rows for k in r.extra})
        w.writerow(fields + ["speedup_torch", "speedup_compile", "ours_over_copy"] + extras)
        for r in rows:
            d = asdict(r)
            derived = [r.speedup_torch, r.speedup_compile, r.ratio_copy]
            w.writerow([d[k] for k in fields] + derived + [r.extra.get(k, "") for k in extras])
    return md, path_csv


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench",
        help="time ours vs torch eager, torch.compile and the copy floor",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--quick", action="store_true", help="a few small shapes, 3 samples")
    p.add_argument("--compile", action="store_true", help="add torch.compile rows (slow)")
    p.add_argument("--shapes", help="e.g. 8,64,112,112;65536,64 (default: ResNet-50 layers)")
    p.add_argument("--passes", default=",".join(PASSES), help="comma list of " + ", ".join(PASSES))
    p.add_argument("--layouts", default=",".join(LAYOUTS), help="comma list of nchw, channels_last")
    p.add_argument("--repeat", type=int, default=15, help="samples per method (median)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (numba follows it)")
    p.add_argument("--backend", default="numba", choices=("numba", "torch", "auto"))
    p.add_argument("--dtype", default="float32", choices=("float32", "float64", "bfloat16"))
    p.add_argument("--out", help="folder for bench.md and bench.csv")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    from .cli import UsageError

    try:
        shapes = parse_shapes(args.shapes) if args.shapes else None
        passes = _choices(args.passes, PASSES, "--passes")
        layouts = _choices(args.layouts, LAYOUTS, "--layouts")
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.repeat < 1:
        raise UsageError(f"--repeat: expected a count >= 1, got {args.repeat}")
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads: expected a count >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        # checked before the minutes of measuring, not after
        raise UsageError(f"--out: expected a folder, but {args.out} is a file")
    if shapes is None:
        shapes = QUICK_SHAPES if args.quick else SHAPES
    repeat = min(args.repeat, 3) if args.quick else args.repeat
    dtype = getattr(torch, args.dtype)
    command = "batchnorm bench " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["bench"] else (
        " ".join(sys.argv)
    )  # fmt: skip
    info = machine()
    print("; ".join(f"{k}: {v}" for k, v in info.items()), flush=True)
    log = lambda s: print(s, flush=True)  # noqa: E731
    rows = measure(shapes, passes, layouts, repeat, args.backend, args.compile, dtype, log)
    info = {**machine(), "load average at the start": info.get("load average (1, 5, 15 min)", "")}
    if args.out:
        try:
            md, path_csv = write_results(rows, Path(args.out), info, command, args.compile)
        except OSError as e:
            raise UsageError(f"--out: cannot write the results to {args.out}: {e}") from None
        print(f"wrote {md} and {path_csv}")
    return 0
