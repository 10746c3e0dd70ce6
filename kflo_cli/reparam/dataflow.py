"""Following a model's data flow: which BatchNorm alone consumes a convolution's output (ACNet folds a bias into
it), read from the autograd graph of one forward pass, or from a ``torch.fx`` trace when that forward fails."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any, Iterator, NamedTuple

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm


def tensors_in(out: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a model's output: a tensor, or dicts, lists and tuples of them (nested)."""
    if isinstance(out, torch.Tensor):
        yield out
    elif isinstance(out, dict):
        for v in out.values():
            yield from tensors_in(v)
    elif isinstance(out, (list, tuple)):
        for v in out:
            yield from tensors_in(v)


NOT_CONSUMED = "its output is not consumed by a BatchNorm alone"


def _is_foldable_bn(module: nn.Module) -> bool:
    """BatchNorms whose eval-mode output depends on ``running_mean`` as ``(x - running_mean) * scale + shift``."""
    if isinstance(module, _BatchNorm):
        return True
    try:
        from torchvision.ops.misc import FrozenBatchNorm2d
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return False
    return isinstance(module, FrozenBatchNorm2d)


class Consumer(NamedTuple):
    """The BatchNorm that alone consumes a convolution's output (``bn``), or why there is none (``reason``)."""

    bn: str | None
    reason: str = ""


def _consumers_by_autograd(model: nn.Module, names: list[str], input_size: tuple[int, ...]) -> dict[str, Consumer]:
    """Run one eval-mode forward and read the autograd graph.

    A convolution's output node must be referenced exactly once in the whole graph (no other use, not a model
    output), and that one reference must come from a BatchNorm module whose input is that node; both modules
    must run exactly once.
    """
    bns = {n: m for n, m in model.named_modules() if _is_foldable_bn(m)}
    conv_nodes: dict[str, list] = defaultdict(list)
    bn_inputs: dict[str, list] = defaultdict(list)
    handles = []
    for n in names:
        handles.append(model.get_submodule(n).register_forward_hook(
            lambda mod, inp, out, n=n: conv_nodes[n].append(out.grad_fn if isinstance(out, torch.Tensor) else None)))
    for n, m in bns.items():
        handles.append(m.register_forward_pre_hook(
            lambda mod, inp, n=n: bn_inputs[n].append(inp[0].grad_fn if inp and isinstance(inp[0], torch.Tensor) else None)))
    param = next(model.parameters())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((1, *input_size), generator=gen).to(device=param.device, dtype=param.dtype).requires_grad_(True)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            out = model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    uses: Counter = Counter()
    stack = [t.grad_fn for t in tensors_in(out) if t.grad_fn is not None]
    uses.update(stack)
    seen = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for nxt, _ in node.next_functions:
            if nxt is not None:
                uses[nxt] += 1
                stack.append(nxt)
    result = {}
    for n in names:
        calls = conv_nodes.get(n, [])
        if len(calls) != 1:
            result[n] = Consumer(None, f"it runs {len(calls)} times in one forward pass")
            continue
        node = calls[0]
        readers = [b for b, inputs in bn_inputs.items() if any(g is node for g in inputs)]
        if node is None:
            result[n] = Consumer(None, "its output carries no gradient, so its consumers cannot be followed")
        elif uses[node] != 1 or len(readers) != 1:
            result[n] = Consumer(None, NOT_CONSUMED)
        elif len(bn_inputs[readers[0]]) != 1:
            result[n] = Consumer(None, f"the BatchNorm '{readers[0]}' after it runs {len(bn_inputs[readers[0]])} times")
        else:
            result[n] = Consumer(readers[0])
    return result


def _consumers_by_fx(model: nn.Module, names: list[str]) -> dict[str, Consumer]:
    """Trace the model symbolically (convolutions and BatchNorms as leaves) and read the graph's users."""
    import torch.fx

    class LeafTracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, nn.Conv2d) or _is_foldable_bn(m) or super().is_leaf_module(m, qualname)

    graph = LeafTracer().trace(model)
    calls: dict[str, list] = defaultdict(list)
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target].append(node)
    result = {}
    for n in names:
        if len(calls[n]) != 1:
            result[n] = Consumer(None, f"it runs {len(calls[n])} times in one forward pass")
            continue
        users = list(calls[n][0].users)
        target = users[0].target if len(users) == 1 and users[0].op == "call_module" else None
        if target is None or not _is_foldable_bn(model.get_submodule(target)):
            result[n] = Consumer(None, NOT_CONSUMED)
        elif len(calls[target]) != 1:
            result[n] = Consumer(None, f"the BatchNorm '{target}' after it runs {len(calls[target])} times")
        else:
            result[n] = Consumer(target)
    return result


def find_bn_consumers(model: nn.Module, names: list[str], input_size: tuple[int, ...] | None = None) -> dict[str, Consumer]:
    """For each named ``Conv2d``: the BatchNorm that alone consumes its output, or why there is none.

    The data flow is read from the autograd graph of one eval-mode forward pass at ``input_size`` (default: the
    model's configured input size); if that forward fails, from a ``torch.fx`` symbolic trace. If both fail,
    every layer gets the reason.
    """
    from ..models import default_input_size

    size = tuple(input_size) if input_size else default_input_size(model)
    try:
        return _consumers_by_autograd(model, names, size)
    except Exception as forward_error:  # noqa: BLE001  (any model code may fail on a dummy input)
        try:
            return _consumers_by_fx(model, names)
        except Exception as trace_error:  # noqa: BLE001
            reason = (f"the model's data flow could not be followed (forward at {size}: "
                      f"{type(forward_error).__name__}; torch.fx: {type(trace_error).__name__})")
            return {n: Consumer(None, reason) for n in names}


__all__ = ["Consumer", "NOT_CONSUMED", "find_bn_consumers", "tensors_in"]
