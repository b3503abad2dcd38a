"""Folding eval-mode batch norms into the Conv or Linear before them, for inference.

Example::

    >>> import torch, batchnorm
    >>> model = torch.nn.Sequential(
    ...     torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8), torch.nn.ReLU()
    ... ).eval()
    >>> folded = batchnorm.fold(model)
    >>> folded
    Sequential(
      (0): Conv2d(3, 8, kernel_size=(3, 3), stride=(1, 1))
      (1): Identity()
      (2): ReLU()
    )
    >>> x = torch.randn(2, 3, 8, 8)
    >>> torch.allclose(folded(x), model(x), atol=1e-5)
    True

In eval mode a batch norm is an affine map per channel, ``y = (x - running_mean) * s + b``
with ``s = w / sqrt(running_var + eps)``, so after ``x = W @ u + c`` it folds into the
weights: ``W' = W * s`` per output channel and ``c' = (c - running_mean) * s + b`` (a bias
is created when the layer has none). The arithmetic is done in float64 and cast back to the
layer's dtype.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

__all__ = ["fold"]

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def fold(model: nn.Module) -> nn.Module:
    """A copy of the eval-mode ``model`` with every batch norm that directly follows a
    Conv1d/2d/3d or Linear merged into that layer.

    Example::

        folded = batchnorm.fold(model.eval())
        torch.testing.assert_close(folded(x), model(x))  # to float tolerance

    * Batch norms are this package's (``BatchNorm*d``, ``BatchRenorm*d``,
      ``GhostBatchNorm*d``, whose eval is BatchNorm's) or torch's (anything deriving from
      ``torch.nn.modules.batchnorm._BatchNorm``), in eval mode, with running buffers.
    * Inside ``nn.Sequential`` (nested too) a folded batch norm is replaced by
      ``nn.Identity()``, or ``nn.ReLU()`` when it had ``activation="relu"``; the model keeps
      its class. Pairs elsewhere (``self.bn1(self.conv1(x))`` in a ``forward``) are found by
      tracing with ``torch.fx``; the result is then a ``torch.fx.GraphModule`` with the same
      inputs and outputs. If tracing fails, those pairs stay unfolded and a warning says why.
    * A pair is left alone where folding would change anything else: a layer subclass
      with its own ``forward``, a layer whose output is also used elsewhere, a layer or
      batch norm shared by several places or carrying hooks or parametrizations, a batch
      norm called with ``residual=``, channels that do not match, or lazy modules not yet
      initialised.
    * Linear + BatchNorm1d assumes the usual ``(N, features)`` input, where the batch
      norm's channels are the Linear's outputs.

    The original model is not modified. Raises ValueError if the model or any batch norm in
    it is in training mode (call ``model.eval()`` first: only eval-mode batch norms are
    fixed affine maps).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold expects a torch.nn.Module, got {type(model).__name__}")
    training = [
        name or "the model"
        for name, m in model.named_modules()
        if m.training and (m is model or isinstance(m, _BatchNorm))
    ]
    if training:
        raise ValueError(
            f"fold needs an eval-mode model, but {training[0]} is in training mode "
            f"(batch norms only fold with fixed running statistics); call model.eval() first"
        )
    folded = copy.deepcopy(model)
    uses = Counter(id(m) for _, m in folded.named_modules(remove_duplicate=False))
    _fold_sequentials(folded, uses)
    if not any(_foldable_bn(m) for m in folded.modules()):
        return folded
    try:
        graph_module = _trace(folded)
    except Exception as e:  # fx raises many types; the Sequential folding still stands
        warnings.warn(
            f"fold: torch.fx could not trace {type(model).__name__} ({type(e).__name__}: {e}); "
            "batch norms outside nn.Sequential were left unfolded",
            stacklevel=2,
        )
        return folded
    if _fold_graph(graph_module, uses):
        return graph_module
    return folded


def _foldable_bn(m: nn.Module) -> bool:
    return (
        isinstance(m, _BatchNorm)
        and not m.training
        and m.running_mean is not None
        and m.running_var is not None
        and not _is_lazy(m)
        and not _has_hooks(m)
    )


def _plain_layer(layer: nn.Module) -> bool:
    """A Conv1d/2d/3d or Linear computing what its class does: a subclass that overrides
    ``forward`` (weight standardisation, a scaled output) is not the affine map folding
    assumes."""
    return isinstance(layer, _LAYERS) and any(
        type(layer).forward is base.forward for base in _LAYERS if isinstance(layer, base)
    )


def _foldable_pair(layer: nn.Module, bn: nn.Module, uses: Counter) -> bool:
    if not (_plain_layer(layer) and _foldable_bn(bn)):
        return False
    if _is_lazy(layer) or _has_hooks(layer) or parametrize.is_parametrized(layer):
        return False
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    # a layer used in two places would change the other use too
    return out == bn.num_features and uses[id(layer)] == 1 and uses[id(bn)] == 1


def _is_lazy(m: nn.Module) -> bool:
    return any(
        isinstance(t, nn.parameter.UninitializedTensorMixin)
        for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))
    )


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def _replacement(bn: nn.Module) -> nn.Module:
    """What stays in the batch norm's place: its fused activation, or nothing."""
    return nn.ReLU() if getattr(bn, "activation", None) == "relu" else nn.Identity()


@torch.no_grad()
def _fold_pair(layer: nn.Module, bn: _BatchNorm) -> None:
    """In place: ``layer`` becomes ``bn(layer(.))``; computed in float64."""
    weight = layer.weight
    f64 = dict(dtype=torch.float64, device=weight.device)
    C = bn.num_features
    bn_weight = torch.ones(C, **f64) if bn.weight is None else bn.weight.to(**f64)
    bn_bias = torch.zeros(C, **f64) if bn.bias is None else bn.bias.to(**f64)
    scale = bn_weight / torch.sqrt(bn.running_var.to(**f64) + bn.eps)  # (C,)
    bias = torch.zeros(C, **f64) if layer.bias is None else layer.bias.to(**f64)
    new_bias = (bias - bn.running_mean.to(**f64)) * scale + bn_bias  # (C,)
    # (C_out, C_in / groups, *kernel) or (out_features, in_features): scale along dim 0
    new_weight = weight.to(torch.float64) * scale.view(-1, *([1] * (weight.dim() - 1)))
    layer.weight = nn.Parameter(new_weight.to(weight.dtype), requires_grad=weight.requires_grad)
    layer.bias = nn.Parameter(new_bias.to(weight.dtype), requires_grad=weight.requires_grad)


def _fold_sequentials(module: nn.Module, uses: Counter) -> None:
    for child in module.children():
        _fold_sequentials(child, uses)
    if not isinstance(module, nn.Sequential):
        return
    keys = list(module._modules)
    for prev_key, key in zip(keys, keys[1:]):
        layer, bn = module._modules[prev_key], module._modules[key]
        if _foldable_pair(layer, bn, uses):
            _fold_pair(layer, bn)
            module._modules[key] = _replacement(bn)


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with every batch norm a leaf: ours are not in ``torch.nn``, and
    their forward (validation, a custom autograd.Function) must not be traced into."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, _BatchNorm) or super().is_leaf_module(m, module_qualified_name)


def _trace(model: nn.Module) -> fx.GraphModule:
    graph = _Tracer().trace(model)
    graph_module = fx.GraphModule(model, graph, class_name=type(model).__name__)
    graph_module.training = model.training
    return graph_module


def _fold_graph(gm: fx.GraphModule, uses: Counter) -> bool:
    """Fold every (layer -> batch norm) pair of the graph in place; whether any was."""
    modules = dict(gm.named_modules())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    folded_any = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue  # a batch norm called with residual= does not fold into one layer
        prev = node.args[0]
        if not isinstance(prev, fx.Node) or prev.op != "call_module" or len(prev.users) != 1:
            continue
        layer, bn = modules[prev.target], modules[node.target]
        if calls[prev.target] != 1 or not _foldable_pair(layer, bn, uses):
            continue
        _fold_pair(layer, bn)
        if isinstance(_replacement(bn), nn.ReLU):
            with gm.graph.inserting_after(node):
                out = gm.graph.call_function(torch.relu, (prev,))
        else:
            out = prev
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        folded_any = True
    if folded_any:
        gm.graph.lint()
        gm.recompile()
        gm.delete_all_unused_submodules()
    return folded_any
