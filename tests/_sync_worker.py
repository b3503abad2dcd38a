"""What the processes of tests/test_sync.py run: one gloo group on 127.0.0.1 per world size,
many cases inside it (each spawn costs seconds; a case costs milliseconds).

Not a test module: it lives beside the tests so that spawned processes can import it by name.
Each rank returns a dict of plain tensors/strings that the parent compares with one
``torch.nn.BatchNorm*d`` over the concatenated batch.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
import traceback

import torch
import torch.autograd.forward_ad as fwad
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from batchnorm import SyncBatchNorm

# Collectives give up after this long, so a test that would hang fails instead.
GROUP_TIMEOUT_S = 30
SPAWN_TIMEOUT_S = 240

C = 3
SPATIAL = {"2d": (), "3d": (5,), "4d": (3, 2), "4d_cl": (2, 3), "5d": (2, 1, 3)}
TORCH_CLASS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


def _case(shards, layout, momentum, backend, dtype=torch.float64, channels=C, **kw) -> dict:
    name = f"{'-'.join(map(str, shards))}_{layout}_m{momentum}_{backend}_{str(dtype)[6:]}"
    if channels != C:
        name += f"_C{channels}"
    for k, v in kw.items():
        name += f"_{k}{v}"
    return dict(
        id=name, shards=shards, layout=layout, momentum=momentum, backend=backend,
        dtype=dtype, channels=channels, affine=kw.get("affine", True),
        track=kw.get("track", True),
    )  # fmt: skip


def parity_cases(world: int) -> list[dict]:
    """The grid each world size runs: shard sizes x layouts x momentum x backend, + extras."""
    shard_sets = {2: [(3, 5)], 3: [(2, 0, 4), (1, 1, 1)]}[world]
    cases = []
    for shards in shard_sets:
        for backend in ("torch", "auto"):
            for layout in SPATIAL:
                cases.append(_case(shards, layout, 0.1, backend))
            # momentum only changes the buffers' update: two layouts are enough
            for layout in ("2d", "4d_cl"):
                for momentum in (None, 1.0):
                    cases.append(_case(shards, layout, momentum, backend))
        cases.append(_case(shards, "4d_cl", 0.1, "auto", torch.float32))
        cases.append(_case(shards, "3d", 0.1, "auto", torch.float32, channels=7))
        cases.append(_case(shards, "4d", 0.1, "torch", channels=1))
        cases.append(_case(shards, "4d", 0.1, "auto", affine=False))
        cases.append(_case(shards, "3d", 0.1, "auto", track=False))
    return cases


def case_data(case: dict, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, dy)`` of the whole batch, float64: off-centre, a different scale per channel."""
    g = torch.Generator().manual_seed(1000 * step + sum(map(ord, case["id"])))
    shape = (sum(case["shards"]), case["channels"], *SPATIAL[case["layout"]])
    per_channel = torch.linspace(0.5, 2.0, case["channels"], dtype=torch.float64)
    per_channel = per_channel.view((1, -1) + (1,) * (len(shape) - 2))
    x = torch.randn(shape, generator=g, dtype=torch.float64) * per_channel + 3.0
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    return x, dy


def case_params(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-trivial weight and bias (float64; cast to the parameter dtype by the user)."""
    g = torch.Generator().manual_seed(7)
    return (
        torch.rand(case["channels"], generator=g, dtype=torch.float64) + 0.5,
        torch.randn(case["channels"], generator=g, dtype=torch.float64),
    )


def param_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def shard_of(t: torch.Tensor, shards, rank: int) -> torch.Tensor:
    lo = sum(shards[:rank])
    return t[lo : lo + shards[rank]]


def to_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "4d_cl":
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


# ---------------------------------------------------------------- what each rank runs


def _run_case(case: dict, rank: int, group=None) -> dict:
    pd = param_dtype(case["dtype"])
    bn = SyncBatchNorm(
        case["channels"], momentum=case["momentum"], affine=case["affine"],
        track_running_stats=case["track"], process_group=group, dtype=pd,
        backend=case["backend"],
    )  # fmt: skip
    if case["affine"]:
        w, b = case_params(case)
        with torch.no_grad():
            bn.weight.copy_(w)
            bn.bias.copy_(b)
    out: dict = {"steps": []}
    for step in range(2):
        x_full, dy_full = case_data(case, step)
        x = to_layout(shard_of(x_full, case["shards"], rank), case["layout"])
        x = x.to(case["dtype"]).requires_grad_()
        dy = to_layout(shard_of(dy_full, case["shards"], rank), case["layout"])
        y = bn(x)
        y.backward(dy.to(case["dtype"]))
        rec = {"y": y.detach().clone(), "dx": x.grad.clone()}
        rec["channels_last"] = y.is_contiguous(memory_format=torch.channels_last)
        if case["affine"]:
            rec["dw"], rec["db"] = bn.weight.grad.clone(), bn.bias.grad.clone()
            bn.weight.grad = bn.bias.grad = None
        out["steps"].append(rec)
    if case["track"]:
        out["running_mean"] = bn.running_mean.clone()
        out["running_var"] = bn.running_var.clone()
        out["num_batches_tracked"] = bn.num_batches_tracked.clone()
    # eval: local running buffers; ranks evaluate different shards with no collective
    bn.eval()
    x_full, _ = case_data(case, 2)
    with torch.no_grad():
        x = to_layout(shard_of(x_full, case["shards"], rank), case["layout"])
        out["y_eval"] = bn(x.to(case["dtype"])).clone()
    return out


def _expect_error(fn) -> dict:
    """Run ``fn``; the exception type and message it raised (or "no error")."""
    try:
        fn()
    except Exception as err:  # noqa: BLE001 - the test inspects whatever came out
        return {"type": type(err).__name__, "message": str(err)}
    return {"type": "no error", "message": ""}


def _error_cases(rank: int, world: int) -> dict:
    out = {}
    # one value per channel over the whole group: rank 0 has 1 row, the others none
    bn = SyncBatchNorm(C, dtype=torch.float64)
    x = torch.randn(1 if rank == 0 else 0, C, dtype=torch.float64)
    out["single_value"] = _expect_error(lambda: bn(x))
    out["single_value_state"] = (bn.num_batches_tracked.clone(), bn.running_mean.clone())

    # rank 1 passes 4 channels to a 3-channel layer
    bn = SyncBatchNorm(C, dtype=torch.float64)
    x = torch.randn(4, 4 if rank == 1 else C, 2, dtype=torch.float64)
    out["channels"] = _expect_error(lambda: bn(x))
    out["channels_nbt"] = bn.num_batches_tracked.clone()

    # rank 1 passes a 1D tensor: not even (N, C)
    bn = SyncBatchNorm(C)
    x = torch.randn(5) if rank == 1 else torch.randn(4, C)
    out["dims"] = _expect_error(lambda: bn(x))

    # valid on every rank alone, but the dtypes differ (float32 params take bfloat16 input)
    bn = SyncBatchNorm(C)
    x = torch.randn(4, C, dtype=torch.bfloat16 if rank == world - 1 else torch.float32)
    out["dtype"] = _expect_error(lambda: bn(x))
    out["dtype_nbt"] = bn.num_batches_tracked.clone()

    # layers built with different num_features
    bn = SyncBatchNorm(C + rank % 2)
    x = torch.randn(4, C + rank % 2)
    out["num_features"] = _expect_error(lambda: bn(x))

    # double backward through the collective: first order only, like torch's
    bn = SyncBatchNorm(C, dtype=torch.float64)
    x = torch.randn(4, C, dtype=torch.float64, requires_grad=True)

    def double_backward():
        (dx,) = torch.autograd.grad((bn(x) ** 2).sum(), x, create_graph=True)
        dx.sum().backward()

    out["double_backward"] = _expect_error(double_backward)

    # a forward-mode tangent on rank 0 only, then vmap on every rank: refused everywhere
    bn = SyncBatchNorm(C, dtype=torch.float64)
    x = torch.randn(4, C, 2, dtype=torch.float64)

    def forward_ad():
        with fwad.dual_level():
            bn(fwad.make_dual(x, torch.ones_like(x)) if rank == 0 else x)

    out["forward_ad"] = _expect_error(forward_ad)
    out["vmap"] = _expect_error(lambda: torch.func.vmap(bn)(x.unsqueeze(0).expand(2, -1, -1, -1)))
    out["transforms_nbt"] = bn.num_batches_tracked.clone()

    # after all that, the group is still in step: a normal step works
    case = _case((2,) * world, "4d", 0.1, "torch")
    out["after_errors"] = _run_case(case, rank)
    return out


def _subgroup_cases(rank: int, world: int) -> dict:
    out = {}
    # a group of one process: plain BatchNorm, no communication
    singles = [dist.new_group([r]) for r in range(world)]
    case = _case((3, 4, 2)[:world], "4d", None, "auto")
    case["id"] += "_alone"
    out["alone"] = _run_case(case, rank, group=singles[rank])
    # a group of ranks 0 and world-1 only
    pair = dist.new_group([0, world - 1])
    case = _case((2, 5), "3d", 0.1, "torch")
    case["id"] += "_pair"
    if rank in (0, world - 1):
        out["pair"] = _run_case(case, 0 if rank == 0 else 1, group=pair)
    else:
        out["outside"] = _expect_error(
            lambda: SyncBatchNorm(C, process_group=pair)(torch.ones(2, C))
        )
    return out


def ddp_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),  # modifies the synced output in place, as in ResNets
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, 3),
        nn.BatchNorm1d(3),
    ).double()


def ddp_data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + step)
    x = torch.randn(8, 2, 5, 5, generator=g, dtype=torch.float64) + 1.0
    target = torch.randn(8, 3, generator=g, dtype=torch.float64)
    return x, target


DDP_STEPS = 3


def _ddp_case(rank: int, world: int) -> dict:
    """DDP over equal shards: its averaged gradients equal one process's over the batch."""
    model = SyncBatchNorm.convert_sync_batchnorm(ddp_model())
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    per_rank = 8 // world
    for step in range(DDP_STEPS):
        x, target = ddp_data(step)
        lo = rank * per_rank
        loss = ((ddp(x[lo : lo + per_rank]) - target[lo : lo + per_rank]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def main(rank: int, world: int) -> dict:
    results = {"cases": {}}
    for case in parity_cases(world):
        results["cases"][case["id"]] = _run_case(case, rank)
    results["errors"] = _error_cases(rank, world)
    results["subgroups"] = _subgroup_cases(rank, world)
    if world == 2:
        results["ddp"] = _ddp_case(rank, world)
    return results


# ---------------------------------------------------------------- spawning


def _entry(rank: int, world: int, port: int, outdir: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)  # world size 3 on 2 cores: no oversubscription
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S),
    )  # fmt: skip
    try:
        result = main(rank, world)
    except Exception:
        result = {"crash": traceback.format_exc()}
    torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    # No destroy_process_group(): after DDP it sometimes aborts the process in torch 2.13
    # (see examples/ddp_cpu.py); the group goes away with the process.
    dist.barrier()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_group(world: int) -> list[dict]:
    """Spawn ``world`` processes running :func:`main`; their results, rank by rank."""
    with tempfile.TemporaryDirectory() as outdir:
        ctx = mp.start_processes(
            _entry, args=(world, free_port(), outdir), nprocs=world, join=False,
            start_method="spawn",
        )  # fmt: skip
        deadline = time.monotonic() + SPAWN_TIMEOUT_S
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"the {world} spawned processes did not finish in time")
        return [torch.load(os.path.join(outdir, f"rank{r}.pt")) for r in range(world)]
