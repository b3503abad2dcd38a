"""``batchnorm demo`` through the installed command: one short epoch, the plot, bad options."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BATCHNORM = str(Path(sys.executable).parent / "batchnorm")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([BATCHNORM, "demo", *args], capture_output=True, text=True, timeout=300)


def test_one_epoch_with_plot(tmp_path):
    import matplotlib.image

    path = tmp_path / "loss.png"
    p = run("--epochs", "1", "--plot", str(path))
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    # the epoch row: epoch, loss torch, loss ours, acc torch, acc ours, |Δ| ours, control, s, s
    row = re.search(
        r"^\s*1\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)%\s+([\d.]+)%\s+([\d.e+-]+)\s+([\d.e+-]+)"
        r"\s+([\d.]+)\s+([\d.]+)\s*$",
        p.stdout,
        re.M,
    )
    assert row, p.stdout
    loss_torch, loss_ours, acc_torch, acc_ours, diff, control = map(float, row.groups()[:6])
    # one epoch at this learning rate stays in the regime where the runs agree to rounding
    assert abs(loss_torch - loss_ours) < 1e-4
    assert diff < 1e-4
    assert 0 < loss_torch < 2.3  # below log(10), the loss of a uniform guess: it learned
    assert abs(acc_torch - acc_ours) < 1.0  # percent: at most a few test images of 360
    assert acc_torch > 40  # ten classes: chance is 10%
    assert "45 steps each" in p.stdout and "Largest difference" in p.stdout
    # same weights, same first batch: the first losses are bitwise equal
    same = re.search(r"the first (\d+) losses of ours and torch are bitwise equal", p.stdout)
    assert same and int(same.group(1)) >= 1, p.stdout
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    assert img.shape[0] > 500 and img.shape[1] > 700
    assert len(np.unique(img[..., :3].reshape(-1, 3), axis=0)) > 100


@pytest.mark.parametrize(
    "args",
    [["--epochs", "0"], ["--epochs", "two"], ["--plot", "/no/such/dir/loss.png"],
     ["--plot", "loss.svg"]],
)  # fmt: skip
def test_bad_options_one_line_exit_2(args):
    p = run(*args)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("batchnorm"), p.stderr
