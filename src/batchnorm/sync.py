"""``SyncBatchNorm``: batch statistics over every process of a ``torch.distributed`` group.

Example (under ``torchrun --nproc_per_node 2``, gloo on CPU or NCCL on GPUs)::

    dist.init_process_group("gloo")
    model = batchnorm.SyncBatchNorm.convert_sync_batchnorm(model)
    model = torch.nn.parallel.DistributedDataParallel(model)

Each rank normalises its own shard with the statistics of the whole batch, so the outputs,
``grad_input`` and running buffers are those of one process over the concatenated batch, for
uneven and empty shards too. Communication, per layer and training step:

* forward: one ``all_gather`` of ``(header, mean, M2)`` per rank, ``(5 + 2C)`` float64 values,
  merged exactly (Chan et al., 1979: ``M2 = sum M2_r + sum count_r (mean_r - mean)^2``). The
  header (count, channels, dtype, a validity flag) makes every rank take the same decision:
  a bad shard on one rank, a dtype that differs between ranks, or one value per channel over
  the whole group raise on *every* rank, before any buffer moves, instead of one rank raising
  and the others waiting in the next collective.
* backward: one ``all_reduce`` of ``[sum_dy, sum_dy_xhat]`` (2C values in the accumulation
  dtype), only when the input needs a gradient. ``weight``/``bias`` gradients stay local: the
  rank's own ``sum(dy * xhat)`` and ``sum(dy)``; DDP averages them like any other parameter.
* once per layer and group, before its first synchronised forward: an ``all_gather`` of
  ``num_features``, because collectives of different sizes abort gloo and hang NCCL. Layers
  built differently on two ranks raise a ValueError there.

Eval mode, no initialised process group, or a group of one process: ``BatchNorm``'s forward,
no communication. A rank that dies or stops calling the layer leaves the others blocked in the
collective until the process group's ``timeout`` (``init_process_group(timeout=...)``), where
they raise; the same holds if ranks disagree on ``train()``/``eval()`` or on which inputs need
gradients, as with any collective.
"""

from __future__ import annotations

from types import ModuleType

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from . import backends
from ._conventions import (
    FLOAT_DTYPES,
    acc_dtype,
    invstd_from_var,
    momentum_factor,
    update_running_stats,
    verify_batch_size,
)
from ._layout import Layout, canonical, like_canonical
from .functional import _transformed, _validate
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, _OurBatchNorm

__all__ = ["SyncBatchNorm"]

# The payload of the forward collective, float64 (exact for counts up to 2**53):
# [magic, status, channels, dtype code, count | mean (C) | M2 (C)]
_MAGIC = 7919.0  # a prime: a row without it was paired with somebody else's collective
_MAGIC_I, _STATUS_I, _CHANNELS_I, _DTYPE_I, _COUNT_I = range(5)
_HEADER = 5
_OK, _INVALID = 0.0, 1.0


def _all_gather(t: Tensor, group, world: int) -> Tensor:
    """``(world, *t.shape)``: every rank's ``t``; one collective."""
    out = t.new_empty(world * t.numel())  # gloo takes the concatenated form only
    # all_gather_single is the newer name (torch 2.10+) of all_gather_into_tensor
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, t.contiguous().view(-1), group=group)
    return out.view(world, *t.shape)


def _dtype_code(x: object) -> float:
    if isinstance(x, Tensor) and x.dtype in FLOAT_DTYPES:
        return float(FLOAT_DTYPES.index(x.dtype))
    return -1.0


def _dtype_name(code: float) -> str:
    return str(FLOAT_DTYPES[int(code)]) if code >= 0 else "a non-float dtype"


def _channels_name(channels: float) -> str:
    return f"{int(channels)} channels" if channels >= 0 else "no channel dim"


class _SyncBatchNormFunction(torch.autograd.Function):
    """``y = xhat * w + b`` with the group's ``mean``/``invstd``; backward all-reduces
    ``[sum_dy, sum_dy_xhat]`` so ``grad_input`` is the whole batch's."""

    @staticmethod
    def forward(
        ctx,
        x: Tensor,  # (N, C, *spatial), this rank's shard
        weight: Tensor | None,  # (C,)
        bias: Tensor | None,  # (C,)
        mean: Tensor,  # (C,) the group's, accumulation dtype
        invstd: Tensor,  # (C,) the group's
        count: int,  # values per channel over the group
        group,
        kernel: ModuleType,
    ) -> Tensor:
        x3, layout = canonical(x)  # (A, C, B)
        ctx.save_for_backward(x, x3, weight, mean, invstd)
        ctx.layout, ctx.count, ctx.group, ctx.kernel = layout, count, group, kernel
        ctx.bias_dtype = None if bias is None else bias.dtype
        if x3.numel() == 0:  # an empty shard: nothing to normalise, but it joins backward
            return torch.empty_like(x)
        y3 = kernel.normalize(x3, mean, invstd, weight, bias)  # (A, C, B)
        # detached: a view created inside a Function may not be modified in place, and
        # ReLU(inplace=True) after the batch norm does exactly that (see _function.py)
        return layout.from_canonical(y3).detach()

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x, x3, weight, mean, invstd = ctx.saved_tensors
        layout: Layout = ctx.layout
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        C = x3.shape[1]
        dy3 = like_canonical(dy, layout)  # (A, C, B)
        if x3.numel() == 0:
            sum_dy = torch.zeros(C, dtype=mean.dtype, device=mean.device)
            sum_dy_xhat = torch.zeros_like(sum_dy)
        else:
            sum_dy, sum_dy_xhat = ctx.kernel.grad_sums(dy3, x3, mean, invstd)  # (C,), (C,)
        dx = None
        if need_dx:
            # The one collective of backward: both sums in one buffer.
            sums = torch.cat([sum_dy, sum_dy_xhat])  # (2C,)
            dist.all_reduce(sums, group=ctx.group)
            if x3.numel() == 0:
                dx = torch.empty_like(x)
            else:
                dx3 = ctx.kernel.grad_input(
                    dy3, x3, mean, invstd, weight, sums[:C], sums[C:], ctx.count, True
                )
                dx = layout.from_canonical(dx3)
        # weight and bias: this rank's share only; DDP averages them over the ranks
        dweight = sum_dy_xhat.to(weight.dtype) if need_dw else None
        dbias = sum_dy.to(ctx.bias_dtype) if need_db else None
        return dx, dweight, dbias, None, None, None, None, None


class SyncBatchNorm(_OurBatchNorm):
    r"""Batch norm over 2D to 5D input with statistics over every process of a group;
    ``torch.nn.SyncBatchNorm``'s constructor, attributes and state_dict keys.

    Example::

        bn = batchnorm.SyncBatchNorm(16)   # in each process of the group
        y = bn(x_shard)                    # normalised with the whole batch's mean and var

    Unlike torch's, it trains on CPU tensors (gloo) as well as on GPUs (NCCL), and checks that
    every rank sent a valid shard before anyone moves on. Outputs, ``grad_input``, running
    buffers and ``num_batches_tracked`` equal one ``BatchNorm`` over the concatenated batch on
    every rank; ``weight.grad``/``bias.grad`` are the rank's own share (their sum over the
    ranks is the whole batch's gradient; DDP averages them).

    Args:
        num_features: C.
        eps, momentum, affine, track_running_stats: as :class:`batchnorm.BatchNorm1d`.
        process_group: the group to synchronise over; None for the default (WORLD) group.
        backend: (keyword) "auto", "torch" or "numba", for the local work. Default "auto".

    Shape: input ``(N, C, *spatial)`` with 0 to 3 spatial dims; ``N`` may differ between ranks
    and may be 0 on some. Output the same, in the input's memory format.
    """

    _dims = (2, 3, 4, 5)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype,
            backend=backend,
        )  # fmt: skip
        self.process_group = process_group
        # (id of the group, its size) once num_features has been compared over it
        self._agreed_on: tuple[int, int] | None = None

    def __getstate__(self):
        # a copy or an unpickled layer compares num_features again (the group may differ)
        return {**super().__getstate__(), "_agreed_on": None}

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("process_group", None)
        self.__dict__.setdefault("_agreed_on", None)

    def forward(self, input: Tensor) -> Tensor:
        """Normalise this rank's shard with the statistics of the group's whole batch."""
        if not self.training:  # running buffers (or local batch stats): no communication
            return super().forward(input)
        group, world = self._group_and_size()
        if world == 1:
            return super().forward(input)
        return self._forward_sync(input, group, world)

    def _group_and_size(self):
        if not (dist.is_available() and dist.is_initialized()):
            return None, 1
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        world = dist.get_world_size(group)
        if world < 1:  # torch answers -1 on a rank outside the group
            raise ValueError(
                f"this process (global rank {dist.get_rank()}) is not a member of "
                "SyncBatchNorm's process_group; call the layer only on the group's ranks "
                "or pass a group that contains this rank"
            )
        return group, world

    def _device(self, input: object) -> torch.device:
        """Where the collective runs: the input's device (NCCL needs CUDA tensors)."""
        if isinstance(input, Tensor):
            return input.device
        for t in (*self.parameters(), *self.buffers()):
            return t.device
        return torch.device("cpu")

    def _agree_num_features(self, group, world: int, device: torch.device) -> None:
        """Once per group: compare num_features, so the per-step payloads match in size."""
        key = (id(group), world)
        if self._agreed_on == key:
            return
        mine = torch.tensor([_MAGIC, float(self.num_features)], dtype=torch.float64, device=device)
        table = _all_gather(mine, group, world).cpu()  # (world, 2)
        if bool((table[:, 0] != _MAGIC).any()):
            raise RuntimeError(
                "SyncBatchNorm: another collective answered this layer's first exchange; "
                "every rank must run the same layers in the same order"
            )
        features = [int(v) for v in table[:, 1].tolist()]
        if len(set(features)) > 1:
            raise ValueError(
                f"SyncBatchNorm layers differ between ranks: num_features by rank {features}; "
                "build the same model on every rank"
            )
        self._agreed_on = key

    def _local_error(self, input: object) -> Exception | None:
        """This rank's validation, everything but the per-channel count (judged group-wide).

        The exception is returned, not raised: the rank still joins the collective so that
        every rank raises instead of waiting.
        """
        try:
            if _transformed(input, self.weight, self.bias):
                raise NotImplementedError(
                    "SyncBatchNorm over more than one process supports reverse-mode autograd "
                    "only: a forward-mode AD tangent or a torch.func transform (vmap, grad, "
                    "jvp, ...) reached it (torch's SyncBatchNorm has neither); run the "
                    "transform on a model without SyncBatchNorm, or outside the process group"
                )
            self._check_input_dim(input)
            track = self.track_running_stats
            nbt = self.num_batches_tracked if track else None
            rm, rv = (self.running_mean, self.running_var) if track else (None, None)
            try:
                verify_batch_size(input.shape)
                local_message = None
            except ValueError as err:  # one value here; the group may have more
                local_message = str(err)
            try:
                _validate(input, rm, rv, self.weight, self.bias, True, self.momentum, self.eps,
                          nbt, None, None)  # fmt: skip
            except ValueError as err:
                if str(err) != local_message:
                    raise
            backends.select(self.backend, input)
        except (TypeError, ValueError, NotImplementedError) as err:
            return err
        return None

    def _forward_sync(self, input: Tensor, group, world: int) -> Tensor:
        device = self._device(input)
        self._agree_num_features(group, world, device)
        C = self.num_features
        error = self._local_error(input)

        payload = torch.zeros(_HEADER + 2 * C, dtype=torch.float64, device=device)
        payload[_MAGIC_I] = _MAGIC
        payload[_DTYPE_I] = _dtype_code(input)
        has_channels = isinstance(input, Tensor) and input.dim() >= 2
        payload[_CHANNELS_I] = input.shape[1] if has_channels else -1
        if error is not None:
            payload[_STATUS_I] = _INVALID
        else:
            kernel = backends.select(self.backend, input)
            x3, _ = canonical(input)  # (A, C, B)
            count = x3.shape[0] * x3.shape[2]
            payload[_COUNT_I] = count
            if count > 0:
                # constants to autograd: the backward formula accounts for them
                with torch.no_grad():
                    mean, var = kernel.batch_stats(x3)  # (C,), (C,) biased
                    payload[_HEADER : _HEADER + C] = mean
                    payload[_HEADER + C :] = var.double() * count  # M2
        table = _all_gather(payload, group, world)  # (world, 5 + 2C)

        header = table[:, :_HEADER].cpu()  # (world, 5): every rank decides on the same table
        self._raise_on_bad_header(header, error, group, world)
        counts = header[:, _COUNT_I]  # (world,)
        total = int(counts.sum().item())
        if total == 1:
            try:
                verify_batch_size(torch.Size([1, C]))  # the one convention, group-wide
            except ValueError as err:
                by_rank = [int(v) for v in counts.tolist()]
                raise ValueError(
                    f"{err} over the whole process group of {world} (values per channel by "
                    f"rank: {by_rank}); SyncBatchNorm counts the group's batch, not one shard"
                ) from None

        acc = acc_dtype(input.dtype)
        if total == 0:  # every shard empty: torch leaves the statistics untouched
            mean = var = torch.zeros(C, dtype=acc, device=device)
        else:
            w = table[:, _COUNT_I : _COUNT_I + 1]  # (world, 1) float64
            means = table[:, _HEADER : _HEADER + C]  # (world, C)
            m2s = table[:, _HEADER + C :]  # (world, C)
            mean64 = (w * means).sum(0) / total  # (C,)
            m2 = m2s.sum(0) + (w * (means - mean64) ** 2).sum(0)  # (C,) exact merge
            mean, var = mean64.to(acc), (m2 / total).to(acc)
        invstd = invstd_from_var(var, self.eps)

        kernel = backends.select(self.backend, input)
        y = _SyncBatchNormFunction.apply(
            input, self.weight, self.bias, mean, invstd, total, group, kernel
        )
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
            factor = momentum_factor(self.momentum, self.num_batches_tracked)
            update_running_stats(self.running_mean, self.running_var, mean, var, total, factor)
        return y

    @staticmethod
    def _raise_on_bad_header(header: Tensor, error: Exception | None, group, world: int):
        """The same decision on every rank, from the gathered headers (world, 5)."""
        if bool((header[:, _MAGIC_I] != _MAGIC).any()):
            raise RuntimeError(
                "SyncBatchNorm: another collective answered this layer's exchange; every "
                "rank must run the same layers in the same order"
            )
        bad = [r for r in range(world) if header[r, _STATUS_I] != _OK]
        if bad:
            if error is not None:
                raise error
            details = ", ".join(
                f"rank {r}: {_channels_name(header[r, _CHANNELS_I].item())}, "
                f"{_dtype_name(header[r, _DTYPE_I].item())}"
                for r in bad
            )
            raise ValueError(
                f"SyncBatchNorm: invalid input on another rank ({details}); see the error "
                "raised there. Every rank raises so that none waits for the others"
            )
        codes = header[:, _DTYPE_I]
        if bool((codes != codes[0]).any()):
            by_rank = [_dtype_name(c) for c in codes.tolist()]
            raise ValueError(
                f"SyncBatchNorm: the ranks' inputs differ in dtype ({by_rank}); pass the same "
                "dtype on every rank"
            )

    @classmethod
    def convert_sync_batchnorm(
        cls, module: nn.Module, process_group=None, *, backend: str | None = None
    ) -> nn.Module:
        """Replace every BatchNorm1d/2d/3d (torch's or this package's) and torch's
        SyncBatchNorm in ``module`` with this SyncBatchNorm.

        Example::

            model = SyncBatchNorm.convert_sync_batchnorm(model)  # before wrapping in DDP

        Parameters and buffers are the same tensor objects, and each layer's training mode is
        kept. ``backend`` is None to keep a converted layer's own (``"auto"`` for torch's).
        Other subclasses of ``_BatchNorm`` (renorm, ghost batch norm) keep their own
        semantics and are left alone. Returns the (converted) module.
        """
        if backend is not None:
            backends.check_name(backend)
        if type(module) in _CONVERTIBLE:
            return cls._convert_one(module, process_group, backend)
        for name, child in module.named_children():
            converted = cls.convert_sync_batchnorm(child, process_group, backend=backend)
            if converted is not child:
                module.add_module(name, converted)
        return module

    @classmethod
    def _convert_one(cls, bn: _BatchNorm, process_group, backend: str | None) -> SyncBatchNorm:
        if getattr(bn, "activation", None) is not None:
            raise ValueError(
                f"cannot convert {bn!r}: SyncBatchNorm has no fused activation; build the "
                "layer with activation=None and apply the activation after it"
            )
        backend = backend or getattr(bn, "backend", "auto")
        new = cls(
            bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
            process_group, device="meta", backend=backend,
        )  # fmt: skip
        # the same Parameter and buffer objects: an optimizer built before keeps working
        for name, p in bn._parameters.items():
            new._parameters[name] = p
        for name, b in bn._buffers.items():
            new._buffers[name] = b
        new._non_persistent_buffers_set = set(bn._non_persistent_buffers_set)
        new.train(bn.training)
        if hasattr(bn, "qconfig"):
            new.qconfig = bn.qconfig
        return new


_CONVERTIBLE = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
)
