"""``batchnorm explain`` through the installed command: values, options, diagnosis, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from batchnorm.diagnose import PRIORITY, candidates

BATCHNORM = str(Path(sys.executable).parent / "batchnorm")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [BATCHNORM, "explain", *args], capture_output=True, text=True, timeout=120
    )


def run_json(*args: str) -> dict:
    p = run(*args, "--json")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def seed_input(shape=(1, 2, 3, 3), seed=0) -> torch.Tensor:
    """The input the command makes for --shape and --seed."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def expected(x: np.ndarray, momentum, eps: float, steps: int) -> dict[str, np.ndarray]:
    """Recomputed here in float64 closed forms, independently of batchnorm.reference: the
    same input repeated K+1 times makes the running averages geometric sums."""
    axes = (0, *range(2, x.ndim))
    n = x.size // x.shape[1]
    mean = x.mean(axis=axes)
    var = x.var(axis=axes)  # numpy's default ddof=0: biased
    var_unbiased = x.var(axis=axes, ddof=1)
    col = (1, -1) + (1,) * (x.ndim - 2)
    if momentum is None:  # cumulative average of K+1 equal batches, the first replacing (0, 1)
        keep = 0.0
    else:
        keep = (1 - momentum) ** (steps + 1)  # weight left on the initial buffers
    running_mean = (1 - keep) * mean
    running_var = keep * 1.0 + (1 - keep) * var_unbiased
    xhat = (x - mean.reshape(col)) / np.sqrt(var.reshape(col) + eps)
    return {
        "n": n,
        "mean": mean,
        "var": var,
        "var_unbiased": var_unbiased,
        "invstd": 1 / np.sqrt(var + eps),
        "running_mean": running_mean,
        "running_var": running_var,
        "output": xhat,
        "grad_bias": np.full(x.shape[1], float(n)),
        "grad_weight": xhat.sum(axis=axes),
        "eval_output": (x - running_mean.reshape(col)) / np.sqrt(running_var.reshape(col) + eps),
    }


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    "shape, momentum, eps, steps, extra",
    [
        ((1, 2, 3, 3), 0.1, 1e-5, 0, []),  # the defaults
        ((1, 2, 3, 3), 1.0, 1e-5, 0, ["--momentum", "1"]),  # the seed notebook's case
        ((5, 3), None, 1e-5, 3, ["--shape", "5,3", "--momentum", "none", "--steps", "3"]),
        ((2, 1, 7), 0.3, 1e-3, 2, ["--shape", "2,1,7", "--momentum", "0.3", "--eps", "1e-3",
                                   "--steps", "2"]),
        ((1, 3, 2, 2, 3), 0.1, 0.5, 1, ["--shape", "1,3,2,2,3", "--eps", "0.5", "--steps", "1",
                                        "--seed", "7"]),
        ((3, 2, 1, 1), 0.5, 1e-5, 0, ["--shape", "3,2,1,1", "--momentum", "0.5"]),
    ],
)  # fmt: skip
def test_json_values_recomputed(shape, momentum, eps, steps, extra):
    data = run_json(*extra, "--eval")
    x = np.array(data["input"])
    seed = int(extra[extra.index("--seed") + 1]) if "--seed" in extra else 0
    np.testing.assert_array_equal(x, seed_input(shape, seed).numpy())
    want = expected(x, momentum, eps, steps)
    assert data["n"] == want["n"]
    assert data["num_batches_tracked"] == steps + 1
    for key in ("mean", "var", "var_unbiased", "invstd"):  # float64 reference values
        np.testing.assert_allclose(data[key], want[key], rtol=1e-12, atol=1e-12, err_msg=key)
    for key in ("running_mean", "running_var", "output", "grad_bias", "eval_output"):
        np.testing.assert_allclose(data[key], want[key], rtol=2e-5, atol=2e-6, err_msg=key)
    np.testing.assert_allclose(data["grad_weight"], want["grad_weight"], atol=1e-5)
    np.testing.assert_allclose(data["grad_input"], 0.0, atol=1e-5)  # loss y.sum(): dx = 0
    diffs = data["torch_max_abs_diff"]
    assert set(diffs) >= {"output", "running_mean", "running_var", "grad_weight", "grad_bias",
                          "grad_input", "eval_output"}  # fmt: skip
    assert max(diffs.values()) < 1e-5, diffs


def test_seed_case_running_var_is_nine_eighths_of_var():
    data = run_json("--shape", "1,2,3,3", "--momentum", "1")
    np.testing.assert_allclose(np.array(data["running_var"]) / data["var"], 9 / 8, rtol=1e-6)
    y = np.array(data["output"])
    np.testing.assert_allclose(y[0].reshape(2, -1).var(axis=1, ddof=1), 1.125, rtol=1e-4)


@pytest.mark.parametrize("suffix, dtype", [(".npy", np.float64), (".pt", np.float32)])
def test_input_file_overrides_shape_and_seed(tmp_path, suffix, dtype):
    x = np.random.default_rng(3).normal(2.0, 3.0, size=(4, 3, 5)).astype(dtype)
    path = tmp_path / f"x{suffix}"
    if suffix == ".npy":
        np.save(path, x)
    else:
        torch.save(torch.from_numpy(x), path)
    data = run_json("--input", str(path), "--shape", "9,9", "--seed", "5", "--steps", "2")
    assert data["shape"] == [4, 3, 5]
    assert data["dtype"] == ("float64" if dtype == np.float64 else "float32")
    np.testing.assert_array_equal(np.array(data["input"]), x)
    want = expected(x.astype(np.float64), 0.1, 1e-5, 2)
    rtol = 1e-10 if dtype == np.float64 else 2e-5
    for key in ("running_mean", "running_var", "output"):
        np.testing.assert_allclose(data[key], want[key], rtol=rtol, atol=rtol, err_msg=key)
    assert max(data["torch_max_abs_diff"].values()) < (1e-9 if dtype == np.float64 else 1e-4)


def test_integer_input_file_is_read_as_float32(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.arange(24, dtype=np.int64).reshape(2, 3, 4))
    data = run_json("--input", str(path))
    assert data["dtype"] == "float32"
    np.testing.assert_allclose(data["mean"], [7.5, 11.5, 15.5])  # (0..3, 12..15), ...


# ----------------------------------------------------------------------------- human output


def test_human_output_seed_case():
    p = run("--shape", "1,2,3,3", "--momentum", "1")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    for text in ("channel 0", "channel 1", "var_unbiased", "invstd", "running_var",
                 "num_batches_tracked", "grad_weight", "grad_bias", "vs torch", "9/8 = 1.125",
                 "seed notebook", "0 differ"):  # fmt: skip
        assert text in out, text
    # the values the tables show are the recomputed ones
    x = seed_input().double().numpy()
    assert f"{x[0, 0].mean():.6g}" in out
    assert f"{x[0, 1].var(ddof=1):.6g}" in out
    assert "eval y" not in out


def test_human_output_eval_and_many_channels():
    p = run("--shape", "2,6,3", "--eval", "--steps", "4")
    assert p.returncode == 0, p.stderr
    assert "eval y" in p.stdout
    assert "channel 3" in p.stdout and "channel 4" not in p.stdout
    assert "2 more channels" in p.stdout
    assert "4 earlier steps + 1" in p.stdout


def test_plot_written_and_not_trivial(tmp_path):
    import matplotlib.image

    path = tmp_path / "explain.png"
    p = run("--shape", "4,3,5,5", "--plot", str(path), "--json")
    assert p.returncode == 0, p.stderr
    json.loads(p.stdout)  # --json output stays one clean object
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    assert img.shape[0] > 600 and img.shape[1] > 1000
    rgb = img[..., :3].reshape(-1, 3)
    assert len(np.unique(rgb, axis=0)) > 200  # bars, curves, text in several colours


# ----------------------------------------------------------------------------- --yours


def _mean_var(x: torch.Tensor):
    dims = (0, *range(2, x.dim()))
    return x.mean(dims, keepdim=True), x.var(dims, unbiased=False, keepdim=True)


def _yours_training(name: str, x: torch.Tensor, momentum: float, steps: int) -> torch.Tensor:
    """The user's hand computation in float32, done the wrong way ``name`` says."""
    eps = 1e-5
    mean, var = _mean_var(x)
    dims = (0, *range(2, x.dim()))
    if name == "match":
        return (x - mean) / torch.sqrt(var + eps)
    if name == "unbiased_variance":
        return (x - mean) / torch.sqrt(x.var(dims, keepdim=True) + eps)  # unbiased by default
    if name == "eval_mode_running_stats":
        bn = torch.nn.BatchNorm2d(x.shape[1], momentum=momentum)
        for _ in range(steps + 1):
            bn(x)
        col = (1, -1, 1, 1)
        return (x - bn.running_mean.view(col)) / torch.sqrt(bn.running_var.view(col) + bn.eps)
    if name == "eps_outside_sqrt":
        return (x - mean) / (torch.sqrt(var) + eps)
    if name == "no_eps":
        return (x - mean) / torch.sqrt(var)
    raise AssertionError(name)


def _yours_eval(name: str, x: torch.Tensor, momentum: float, steps: int) -> torch.Tensor:
    eps = 1e-5
    dims = (0, 2, 3)
    mean, var = _mean_var(x)
    var_unbiased = x.var(dims, keepdim=True)
    rm, rv = torch.zeros_like(mean), torch.ones_like(mean)
    kerm, kerv = torch.zeros_like(mean), torch.ones_like(mean)
    for _ in range(steps + 1):
        rm = (1 - momentum) * rm + momentum * mean
        rv = (1 - momentum) * rv + momentum * var_unbiased
        kerm = momentum * kerm + (1 - momentum) * mean  # momentum read as a decay
        kerv = momentum * kerv + (1 - momentum) * var_unbiased
    if name == "match":
        return (x - rm) / torch.sqrt(rv + eps)
    if name == "batch_stats_in_eval":
        return (x - mean) / torch.sqrt(var + eps)
    if name == "keras_momentum":
        return (x - kerm) / torch.sqrt(kerv + eps)
    if name == "eps_outside_sqrt":
        return (x - rm) / (torch.sqrt(rv) + eps)
    if name == "no_eps":
        return (x - rm) / torch.sqrt(rv)
    raise AssertionError(name)


@pytest.fixture(scope="module")
def default_input(tmp_path_factory) -> tuple[torch.Tensor, Path]:
    x = seed_input()
    path = tmp_path_factory.mktemp("in") / "x.npy"
    np.save(path, x.numpy())
    return x, path


@pytest.mark.parametrize(
    "name, mode, momentum, steps",
    [
        ("match", "training", 0.1, 0),
        ("unbiased_variance", "training", 0.1, 0),
        ("eval_mode_running_stats", "training", 0.1, 2),
        ("eps_outside_sqrt", "training", 0.1, 0),
        ("no_eps", "training", 0.1, 0),
        ("match", "eval", 0.1, 2),
        ("batch_stats_in_eval", "eval", 0.1, 2),
        ("keras_momentum", "eval", 0.1, 2),
        ("eps_outside_sqrt", "eval", 0.1, 2),
        ("no_eps", "eval", 0.1, 2),
    ],
)
def test_diagnosis_names_the_mistake(tmp_path, default_input, name, mode, momentum, steps):
    x, _ = default_input
    build = _yours_training if mode == "training" else _yours_eval
    yours = build(name, x, momentum, steps)
    path = tmp_path / "yours.pt"
    torch.save(yours, path)
    args = ["--yours", str(path), "--momentum", str(momentum), "--steps", str(steps)]
    args += ["--eval"] if mode == "eval" else []
    data = run_json(*args)  # default --shape and --seed: the same x
    d = data["diagnosis"]
    assert d["name"] == name, d["max_abs_diff"]
    assert d["mode"] == mode
    assert d["max_abs_diff"][name] == min(d["max_abs_diff"].values())


def test_diagnosis_seed_notebook_case(tmp_path, default_input):
    """The notebook: bn = BatchNorm2d(C, momentum=1); y = bn(x); normalise with running_var."""
    x, xpath = default_input
    bn = torch.nn.BatchNorm2d(2, momentum=1)
    bn(x)
    n = (x[:, 0] - bn.running_mean[0]) / torch.sqrt(bn.running_var[0] + bn.eps)
    c1 = (x[:, 1] - bn.running_mean[1]) / torch.sqrt(bn.running_var[1] + bn.eps)
    path = tmp_path / "yours.npy"
    np.save(path, torch.stack([n, c1], dim=1).detach().numpy())
    p = run("--input", str(xpath), "--momentum", "1", "--yours", str(path))
    assert p.returncode == 0, p.stderr
    assert "unbiased_variance" in p.stdout
    assert "Fix:" in p.stdout and "n - 1" in p.stdout


def test_diagnosis_unknown_and_human_panel(tmp_path, default_input):
    _, xpath = default_input
    path = tmp_path / "yours.npy"
    np.save(path, np.random.default_rng(1).standard_normal((1, 2, 3, 3)).astype(np.float32))
    data = run_json("--input", str(xpath), "--yours", str(path))
    assert data["diagnosis"]["name"] == "unknown"
    assert set(data["diagnosis"]["max_abs_diff"]) == {
        "match", "unbiased_variance", "eval_mode_running_stats", "eps_outside_sqrt", "no_eps"
    }  # fmt: skip


def test_candidates_distinguishable_at_default_shape():
    """Each pair of candidates differs by far more than float32 rounding of the output."""
    x = seed_input().double().numpy()
    for mode, steps in (("training", 0), ("eval", 2)):
        cands = candidates(x, momentum=0.1, eps=1e-5, steps=steps, mode=mode)
        assert list(cands) == [k for k in PRIORITY if k in cands]
        names = list(cands)
        for i, a in enumerate(names):
            for b in names[i + 1 :]:
                assert np.abs(cands[a] - cands[b]).max() > 1e-6, (mode, a, b)


# ----------------------------------------------------------------------------- bad input


def _garbage(tmp_path: Path, name: str, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


def _saved(tmp_path: Path, name: str, obj) -> str:
    path = tmp_path / name
    if name.endswith(".npy"):
        np.save(path, obj)
    else:
        torch.save(obj, path)
    return str(path)


# The bad inputs the issue lists, through the installed command ...
BAD = {
    "missing file": lambda t: ["--input", str(t / "nope.npy")],
    "garbage npy": lambda t: ["--input", _garbage(t, "g.npy", b"not numpy at all")],
    "garbage pt": lambda t: ["--input", _garbage(t, "g.pt", b"\x80\x04garbage")],
    "wrong suffix": lambda t: ["--input", _garbage(t, "x.csv", b"1,2,3\n")],
    "pt holding a dict": lambda t: ["--input", _saved(t, "d.pt", {"x": torch.ones(2, 2)})],
    "1-d input": lambda t: ["--input", _saved(t, "v.npy", np.ones(5))],
    "shape not ints": lambda t: ["--shape", "1,x,3"],
    "shape one dim": lambda t: ["--shape", "4"],
    "one value per channel": lambda t: ["--shape", "1,3,1,1"],
    "momentum zero": lambda t: ["--momentum", "0"],
    "momentum above one": lambda t: ["--momentum", "1.5"],
    "yours other shape": lambda t: ["--yours", _saved(t, "y.npy", np.ones((1, 2, 3, 4)))],
    "plot no dir": lambda t: ["--plot", str(t / "no" / "dir.png")],
}

# ... and more of them in-process through cli.main, the same code path minus the script.
MORE_BAD = {
    "object npy": lambda t: ["--input", _saved(t, "o.npy", np.array([{}, 1], dtype=object))],
    "6-d input": lambda t: ["--input", _saved(t, "v.npy", np.ones((2,) * 6))],
    "nan input": lambda t: ["--input", _saved(t, "nan.npy", np.full((2, 2), np.nan))],
    "complex input": lambda t: ["--input", _saved(t, "c.npy", np.ones((2, 2), np.complex64))],
    "empty input": lambda t: ["--input", _saved(t, "e.npy", np.ones((0, 2)))],
    "one value per channel file": lambda t: ["--input", _saved(t, "o.pt", torch.ones(1, 3))],
    "shape six dims": lambda t: ["--shape", "1,2,3,3,3,3"],
    "shape zero": lambda t: ["--shape", "0,2,3"],
    "shape empty": lambda t: ["--shape", ""],
    "one value per channel 2d": lambda t: ["--shape", "1,3"],
    "momentum word": lambda t: ["--momentum", "fast"],
    "momentum nan": lambda t: ["--momentum", "nan"],
    "eps negative": lambda t: ["--eps", "-1e-5"],
    "eps zero": lambda t: ["--eps", "0"],  # torch refuses it in training
    "eps inf": lambda t: ["--eps", "inf"],
    "steps negative": lambda t: ["--steps", "-1"],
    "steps huge": lambda t: ["--steps", "10000000"],
    "seed not int": lambda t: ["--seed", "1.5"],
    "yours missing": lambda t: ["--yours", str(t / "nope.pt")],
    "yours garbage": lambda t: ["--yours", _garbage(t, "y.npy", b"\x93NUMPY broken")],
    "plot not png": lambda t: ["--plot", str(t / "x.jpg")],
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_exit_2(tmp_path, case):
    p = run(*BAD[case](tmp_path))
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("batchnorm"), p.stderr
    assert p.stdout == ""


@pytest.mark.parametrize("case", list(MORE_BAD))
def test_more_bad_input_one_line_exit_2(tmp_path, capsys, case):
    from batchnorm.cli import main

    try:
        rc = main(["explain", *MORE_BAD[case](tmp_path)])
    except SystemExit as e:  # argparse's errors
        rc = e.code
    out, err = capsys.readouterr()
    assert rc == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("batchnorm"), err
    assert out == ""
