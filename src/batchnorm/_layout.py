"""One canonical view for every input: ``(A, C, B)``, contiguous.

Batch norm reduces over every axis but C, so any input can be seen as a 3-D tensor whose
middle axis is the channel:

* NCHW-contiguous ``(N, C, *spatial)`` -> ``(N, C, S)`` with ``S = prod(spatial)``;
* channels_last ``(N, C, *spatial)`` (stored as ``(N, *spatial, C)``) -> ``(N * S, C, 1)``;
* ``(N, C)`` -> ``(N, C, 1)``, which is the channels-last case too.

Both are views, no copy. A kernel therefore sees one shape with two regimes: ``B > 1``
(each channel a run of B contiguous values) and ``B == 1`` (channels interleaved). Other
strides are copied to contiguous first (documented in the README). Outputs are produced in
the canonical view and mapped back, so they keep the input's memory format.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# the channels-last memory format of each tensor rank that has one
CHANNELS_LAST_FORMAT = {4: torch.channels_last, 5: torch.channels_last_3d}


@dataclass(frozen=True)
class Layout:
    shape: torch.Size  # the user's (N, C, *spatial)
    channels_last: bool  # stored as (N, *spatial, C)

    def to_canonical(self, t: Tensor) -> Tensor:
        """A tensor of ``self.shape`` (already in this layout's memory format) -> (A, C, B)."""
        N, C, S = self.shape[0], self.shape[1], math.prod(self.shape[2:])
        if self.channels_last:
            # (N, C, *spatial) with channels-last strides -> (N, *spatial, C) contiguous
            perm = (0, *range(2, t.dim()), 1)
            return t.permute(perm).reshape(N * S, C, 1)
        return t.reshape(N, C, S)

    def from_canonical(self, t3: Tensor) -> Tensor:
        """(A, C, B) contiguous -> a tensor of ``self.shape`` in this layout's memory format."""
        if self.channels_last:
            # empty: the strides torch gives it
            if t3.numel() == 0 and len(self.shape) in CHANNELS_LAST_FORMAT:
                fmt = CHANNELS_LAST_FORMAT[len(self.shape)]
                return torch.empty(self.shape, dtype=t3.dtype, device=t3.device,
                                   memory_format=fmt)  # fmt: skip
            spatial = tuple(self.shape[2:])
            nhwc = t3.reshape(self.shape[0], *spatial, self.shape[1])
            k = len(spatial)
            return nhwc.permute(0, k + 1, *range(1, k + 1))
        return t3.reshape(self.shape)


def canonical(x: Tensor) -> tuple[Tensor, Layout]:
    """``(x3, layout)``: x as a contiguous (A, C, B) tensor and how to map results back."""
    if x.dim() == 2 or (x.is_contiguous() and not (x.numel() == 0 and _channels_last_empty(x))):
        layout = Layout(x.shape, channels_last=x.dim() == 2)
        return layout.to_canonical(x.contiguous()), layout
    perm = (0, *range(2, x.dim()), 1)
    if x.permute(perm).is_contiguous():
        layout = Layout(x.shape, channels_last=True)
        return layout.to_canonical(x), layout
    # any other strides: one copy to NCHW-contiguous
    layout = Layout(x.shape, channels_last=False)
    return layout.to_canonical(x.contiguous()), layout


def _channels_last_empty(x: Tensor) -> bool:
    """For an empty x (contiguous in every memory format): whether its strides say channels
    last (channels adjacent, the last spatial dim further apart), as torch's empty_like keeps
    them, so the output must too."""
    return (
        x.dim() in CHANNELS_LAST_FORMAT and x.shape[1] > 1 and x.stride(1) == 1 and x.stride(-1) > 1
    )


def like_canonical(t: Tensor, layout: Layout) -> Tensor:
    """Another tensor of the input's shape (dy, a residual) in the same canonical view,
    copied only if its strides differ from the input's."""
    if layout.channels_last and t.dim() > 2:
        nhwc = t.permute(0, *range(2, t.dim()), 1)  # (N, *spatial, C): the memory order
        if not nhwc.is_contiguous():
            nhwc = nhwc.contiguous()
        return nhwc.reshape(math.prod(nhwc.shape[:-1]), layout.shape[1], 1)  # (C may be 0)
    return layout.to_canonical(t.contiguous())
