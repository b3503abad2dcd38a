"""``batchnorm bench``: the command runs, prints a row per (shape, layout, pass) and writes the
same rows to bench.md and bench.csv; bad options exit 2 with one line. Timings are not judged
here (speed lives in benchmarks/): only that each is a positive time and the derived columns
are computed from them."""

from __future__ import annotations

import csv
import math

import pytest

from batchnorm.cli import main

PASSES = ("forward-train", "forward-eval", "backward")


def test_bench_prints_and_writes_every_row(tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["bench", "--shapes", "4,3,5,5;6,4", "--repeat", "2", "--out", str(out)]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if " ours " in line]
    expected = [("4x3x5x5", layout, p) for layout in ("nchw", "channels_last") for p in PASSES] + [
        ("6x4", "(N,C)/(N,C,L)", p) for p in PASSES
    ]  # (N, C) has one layout
    assert [tuple(line.split()[:3]) for line in printed] == expected

    with (out / "bench.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["shape"], r["layout"], r["pass_"]) for r in rows] == expected
    for r in rows:
        ours, torch_ms, copy = (float(r[k]) for k in ("ours_ms", "torch_ms", "copy_ms"))
        assert all(0 < t < 1e3 and math.isfinite(t) for t in (ours, torch_ms, copy)), r
        assert float(r["speedup_torch"]) == pytest.approx(torch_ms / ours)
        assert float(r["ours_over_copy"]) == pytest.approx(ours / copy)
        numel = 4 * 3 * 5 * 5 if r["shape"] == "4x3x5x5" else 6 * 4
        assert float(r["mib"]) == pytest.approx(numel * 4 / 2**20)
        assert r["page_faults"] == "False"  # under 32 MiB
        assert math.isnan(float(r["compile_ms"]))  # no --compile

    md = (out / "bench.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ") and "shape" not in line]
    assert [tuple(c.strip() for c in line.split("|")[1:4]) for line in table] == expected
    assert "Command: `" in md and "cpu: " in md


def test_bench_compile_column(tmp_path, capsys):
    """--compile times torch.compile of the same call beside the others, and reports its
    compile time apart (printed, and in the CSV)."""
    out = tmp_path / "results"
    args = ["bench", "--compile", "--shapes", "4,3,5,5", "--layouts", "nchw", "--passes",
            "forward-eval", "--repeat", "2", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if " ours " in x]
    assert " compile " in line and "compiled in" in line
    with (out / "bench.csv").open() as f:
        (row,) = list(csv.DictReader(f))
    compile_ms, ours = float(row["compile_ms"]), float(row["ours_ms"])
    assert 0 < compile_ms < 1e3 and float(row["compile_s"]) > 0
    assert float(row["speedup_compile"]) == pytest.approx(compile_ms / ours)
    assert "vs compile" in (out / "bench.md").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--shapes", "4,x"], "--shapes: expected shapes like"),
        (["--shapes", "4"], "--shapes: expected shapes like"),
        (["--passes", "sideways"], "--passes: expected a comma list of forward-train"),
        (["--layouts", "nhwc"], "--layouts: expected a comma list of nchw, channels_last"),
        (["--repeat", "0"], "--repeat: expected a count >= 1"),
    ],
)
def test_bench_bad_options_exit_2_with_one_line(args, message, capsys):
    assert main(["bench", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("batchnorm bench: error: " + message) and "\n" not in err


def test_bench_out_must_be_a_folder(tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("")
    assert main(["bench", "--shapes", "4,3", "--out", str(f)]) == 2
    assert "--out: expected a folder" in capsys.readouterr().err
