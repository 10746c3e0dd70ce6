"""The linear chain of one ExpandNet layer (Guo, Alvarez & Salzmann, *ExpandNets*, NeurIPS 2020).

A layer with weight ``W`` (``n x m/g x k...``) becomes a chain of ``L`` layers ("links") whose widths grow inside
the chain: ``m -> w_1 -> ... -> w_{L-1} -> n``, all grouped with the layer's ``g`` groups. Composing the links
gives back one layer of the original shape:

* weights: the kernel of link ``i+1`` composed with that of link ``i`` is the full (true) convolution of the two
  kernels, summed over the shared channels within each group; 1-tap links reduce to grouped matrix products;
* bias (every link has one when the layer has one): ``b <- sum_taps(W_{i+1}) b + b_{i+1}`` from the first link on.
  The layer's padding goes on the first link and every later link is a valid (unpadded) convolution, so a
  constant channel stays constant through the chain, padded border included, and the composition is exact.

:class:`ExpandChain` owns the factors (``factors.<i>.weight`` / ``factors.<i>.bias``) and is the layer's
``weight`` parametrization in both execution forms; :class:`ComposedBias` parametrizes ``bias`` from the same
factors. :meth:`ExpandChain.run` is the feature-filtering form (real chained convolutions).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import ParamRole
from .layers import round_half_up

#: Activations of the nonlinear counterpart (ExpandNets supplementary A, "+Init"), between consecutive links.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "leaky_relu": F.leaky_relu,
    "gelu": F.gelu,
    "silu": F.silu,
    "tanh": torch.tanh,
}

#: The gain :func:`torch.nn.init.calculate_gain` uses for each activation's He initialisation (GELU and SiLU are
#: treated like ReLU, their large-input behaviour).
HE_GAIN = {"relu": "relu", "leaky_relu": "leaky_relu", "gelu": "relu", "silu": "relu", "tanh": "tanh"}

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def chain_width(rate: float, channels: int, groups: int) -> int:
    """``rate * channels`` rounded half up per group, at least one per group, so a multiple of ``groups``."""
    return groups * max(1, round_half_up(rate * channels / groups))


class Link(nn.Module):
    """The factors of one chained layer: ``weight`` (``out x in/groups x kernel``, or ``out x in``) and ``bias``."""

    def __init__(self, out: int, in_per_group: int, kernel: tuple[int, ...], bias: bool,
                 device: torch.device | None, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out, in_per_group, *kernel, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out, device=device, dtype=dtype)) if bias else None

    @torch.no_grad()
    def reset_random(self, activation: str | None = None) -> None:
        """A fresh layer's initialisation.

        Linear chains get PyTorch's default for a Conv/Linear layer of this shape (what the paper's code gets).
        Links of the nonlinear counterpart, which sit between activations, get He initialisation for that
        activation (normal, fan-in, zero bias): with PyTorch's default every link divides the signal's variance
        by about 6, and a chained network without normalisation layers (LeNet-5) then never leaves chance level.
        """
        if activation is None:
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.weight[0].numel())
                nn.init.uniform_(self.bias, -bound, bound)
            return
        gain = nn.init.calculate_gain(HE_GAIN.get(activation, "relu"))
        nn.init.normal_(self.weight, 0.0, gain / math.sqrt(self.weight[0].numel()))
        if self.bias is not None:
            nn.init.zeros_(self.bias)


def compose(first: torch.Tensor, second: torch.Tensor, groups: int) -> torch.Tensor:
    """The kernel of ``second`` applied after ``first`` (both grouped with ``groups``), as one kernel.

    ``first`` is ``p x c x Ka`` and ``second`` ``q x p/groups x Kb``; the result is ``q x c x (Ka + Kb - 1)``:
    ``C[o, i, t] = sum_{a in group} sum_{u + s = t} second[o, a, u] first[a, i, s]``.
    """
    dims = first.dim() - 2
    p, cin = first.shape[:2]
    q = second.shape[0]
    ka, kb = tuple(first.shape[2:]), tuple(second.shape[2:])
    if all(k == 1 for k in kb):  # 1-tap second link (also every Linear): a grouped matrix product
        out = torch.bmm(second.reshape(groups, q // groups, p // groups), first.reshape(groups, p // groups, -1))
        return out.reshape(q, cin, *ka)
    if all(k == 1 for k in ka):
        out = torch.einsum("gqps,gpc->gqcs", second.reshape(groups, q // groups, p // groups, -1),
                           first.reshape(groups, p // groups, cin))
        return out.reshape(q, cin, *kb)
    # Full convolution: the first kernel's input channels become the batch, the second kernel is flipped.
    flipped = second.flip(list(range(2, 2 + dims)))
    out = _CONV[dims](first.transpose(0, 1), flipped, padding=[k - 1 for k in kb], groups=groups)
    return out.transpose(0, 1).contiguous()


class ExpandChain(nn.Module):
    """The ``weight`` parametrization of an expanded layer: owns the links' factors and composes them.

    Args:
        widths: channels ``[m, w_1, ..., w_{L-1}, n]`` (multiples of ``groups``).
        kernels: each link's kernel size (``()`` for Linear chains).
        strides: each link's stride (ignored for Linear chains).
        groups: the layer's groups (every link uses them).
        bias: whether every link has a bias (exactly when the layer has one).
        dilation: the layer's dilation (every link uses it; for a chain of dilated kernels the composition is the
            dilated composition of the undilated kernels).
        activation: ``None`` for the linear ExpandNet, or a key of :data:`ACTIVATIONS` for the nonlinear
            counterpart (feature form only; not collapsible).
    """

    def __init__(self, widths: Sequence[int], kernels: Sequence[tuple[int, ...]], strides: Sequence[tuple[int, ...]],
                 groups: int, bias: bool, dilation: tuple[int, ...], activation: str | None,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.widths = list(widths)
        self.kernels = [tuple(k) for k in kernels]
        self.strides = [tuple(s) for s in strides]
        self.groups = groups
        self.dilation = tuple(dilation)
        self.activation = activation
        self.linear = len(self.kernels[0]) == 0
        self.factors = nn.ModuleList(
            Link(widths[i + 1], widths[i] // groups, self.kernels[i], bias, device, dtype) for i in range(len(kernels))
        )
        #: False when ``init`` asked for a function-preserving start that these widths cannot give exactly.
        self.exact_start = False

    def forward(self) -> torch.Tensor:
        weight = self.factors[0].weight
        for link in self.factors[1:]:
            weight = compose(weight, link.weight, self.groups)
        return weight

    def composed_bias(self) -> torch.Tensor:
        """The chain's bias: a constant input channel stays constant through every (valid) link."""
        bias = self.factors[0].bias
        g = self.groups
        for link in self.factors[1:]:
            taps = link.weight.flatten(2).sum(2) if link.weight.dim() > 2 else link.weight
            out, per_group = taps.shape
            bias = torch.einsum("goi,gi->go", taps.reshape(g, out // g, per_group), bias.reshape(g, per_group))
            bias = bias.reshape(out) + link.bias
        return bias

    def right_inverse(self, weight: torch.Tensor) -> tuple[()]:
        """Keep no copy of the original weight: the expanding recipe sets the factors itself (see
        :meth:`reset_random` and :meth:`init_preserving`), because the start also depends on the bias."""
        return ()

    def run(self, x: torch.Tensor, padding: int | tuple[int, ...], crop: Any = None) -> torch.Tensor:
        """The feature-filtering form: apply the links one after the other (``padding`` on the first only; with
        ``crop``, for :attr:`croppable` chains, on the multi-tap link, which runs on the live taps only)."""
        last = len(self.factors) - 1
        act = ACTIVATIONS[self.activation] if self.activation else None
        padded, _ = self._padded_link(crop)
        for i, link in enumerate(self.factors):
            if self.linear:
                x = F.linear(x, link.weight, link.bias)
            else:
                weight = link.weight if crop is None or i != padded else link.weight[(slice(None), slice(None), *crop.taps)]
                x = _CONV[len(self.dilation)](x, weight, link.bias, self.strides[i], padding if i == padded else 0,
                                              self.dilation, self.groups)
            if act is not None and i < last:
                x = act(x)
        return x

    def roles(self) -> dict[str, ParamRole]:
        return {name: ParamRole("expandnet-factor") for name, _ in self.named_parameters()}

    # -- the execution forms (kflo_cli.reparam.execution.Factored) --------------------------------------------

    #: set by the recipe: the run's decay goes on the composed kernel, so training composes it every step
    decay_composed = False

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The composed kernel's shape: ``(n, m / groups, *composed kernel)``."""
        kernel = tuple(sum(k[d] - 1 for k in self.kernels) + 1 for d in range(len(self.kernels[0])))
        return (self.widths[-1], self.widths[0] // self.groups, *kernel)

    @property
    def croppable(self) -> bool:
        """Whether the layer may run on its live taps only (:func:`~kflo_cli.reparam.execution.live_taps`), exactly:
        a linear chain without biases whose one multi-tap link has only 1-tap, stride-1 links before it (ExpandNet-CL).

        Then padding the input of the links before it equals padding their output, so the multi-tap link can take
        the padding and drop the taps that read only padding. With biases the padded border of an earlier link holds
        its bias, which those taps do read; a chain of several multi-tap links (CK) spreads the padding over them.
        """
        if self.linear or self.activation is not None or self.factors[0].bias is not None:
            return False
        spatial = [i for i, k in enumerate(self.kernels) if math.prod(k) > 1]
        return len(spatial) == 1 and all(all(s == 1 for s in self.strides[i]) for i in range(spatial[0]))

    def _padded_link(self, crop: Any) -> tuple[int, list[tuple[int, ...]]]:
        """The link that takes the layer's padding, and every link's kernel size: the first link and the kernels as
        they are; with ``crop`` (:attr:`croppable` chains) the multi-tap link, cut to ``crop``'s taps."""
        if crop is None:
            return 0, list(self.kernels)
        spatial = next(i for i, k in enumerate(self.kernels) if math.prod(k) > 1)
        kernels = list(self.kernels)
        kernels[spatial] = tuple(len(range(*t.indices(k))) for t, k in zip(crop.taps, self.kernels[spatial]))
        return spatial, kernels

    def compose_taps(self, crop: Any) -> torch.Tensor:
        """The composed kernel on the live taps only (:attr:`croppable` chains): the chain composed with its
        multi-tap link cut to those taps, which is the slice ``W'[:, :, taps]`` at a fraction of the cost."""
        spatial, _ = self._padded_link(crop)
        weights = [link.weight for link in self.factors]
        weights[spatial] = weights[spatial][(slice(None), slice(None), *crop.taps)]
        weight = weights[0]
        for nxt in weights[1:]:
            weight = compose(weight, nxt, self.groups)
        return weight

    def run_features(self, module: nn.Module, x: torch.Tensor, padding: Any, crop: Any = None) -> torch.Tensor:
        return self.run(x, padding, crop)

    def feature_macs(self, module: nn.Module, x_shape: tuple[int, ...], crop: Any = None) -> float:
        """Each link's MACs at the resolution it runs at (padding on the first link, each link's own stride; with
        ``crop``, the multi-tap link cropped and padded as :meth:`run` runs it)."""
        from .execution import conv_output_size, samples

        if self.linear or len(x_shape) != len(self.kernels[0]) + 2:
            return samples(module, x_shape) * float(sum(link.weight.numel() for link in self.factors))
        padded, kernels = self._padded_link(crop)
        spatial = list(x_shape[2:])
        padding = crop.padding if crop is not None else getattr(module, "padding", 0)
        if isinstance(padding, str):  # "same"/"valid": the input is padded before the chain, see padded_input
            padding = (0,) * len(spatial)
            if module.padding == "same":
                spatial = [s + d * (k - 1) for s, d, k in zip(spatial, self.dilation, self.weight_shape[2:])]
        total = 0.0
        for i, link in enumerate(self.factors):
            pad = padding if i == padded else (0,) * len(spatial)
            spatial = [conv_output_size(s, k, st, p, d) for s, k, st, p, d
                       in zip(spatial, kernels[i], self.strides[i], pad, self.dilation)]
            total += math.prod(spatial) * link.weight.shape[0] * link.weight.shape[1] * math.prod(kernels[i])
        return samples(module, x_shape) * total

    def composition_macs(self, crop: Any = None) -> float:
        """Composing link by link: each step convolves the kernel so far with the next link's kernel (with
        ``crop``, the multi-tap link cropped to the live taps)."""
        _, kernels = self._padded_link(crop)
        total, size = 0.0, list(kernels[0])
        for i, link in enumerate(self.factors[1:], start=1):
            inner = self.widths[i] // self.groups
            after = [a + b - 1 for a, b in zip(size, kernels[i])]
            if math.prod(size) == 1 or math.prod(kernels[i]) == 1:  # compose's matrix products: each tap pair once
                taps = math.prod(size) * math.prod(kernels[i])
            else:  # compose's full convolution: every output tap against the whole next kernel, padding included
                taps = math.prod(after) * math.prod(kernels[i])
            total += self.widths[i + 1] * inner * (self.widths[0] // self.groups) * taps
            size = after
        return total

    def composition_paid(self) -> bool:
        return self.decay_composed

    @torch.no_grad()
    def reset_random(self) -> None:
        """The paper's start: every link initialised as a fresh layer of its shape (He initialisation for the
        nonlinear counterpart, see :meth:`Link.reset_random`)."""
        for link in self.factors:
            link.reset_random(self.activation)
        self.exact_start = False

    @torch.no_grad()
    def init_preserving(self, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
        """Set the factors so that the chain composes to ``weight`` and ``bias`` exactly, if these widths allow.

        One link (the "piece") carries the layer's kernel, cut into pieces; the links before it copy each input
        channel at a few shifts, the links after it sum shifted pieces back into each output channel (for 1-tap
        links a shift is the identity). Rows and columns this construction does not use keep random values and
        are disconnected by zeros in the neighbouring link, so every factor receives gradients once training
        starts. Returns False (factors untouched) when no arrangement fits the widths.
        """
        plan = self._preserving_plan()
        if plan is None:
            return False
        piece, offsets, nesting = plan
        self.reset_random()
        g = self.groups
        m, n = self.widths[0] // g, self.widths[-1] // g
        counts = [math.prod(len(o) for o in offs) if i != piece else 1 for i, offs in enumerate(offsets)]
        kernel = weight.reshape(g, n, m, *weight.shape[2:]).to(self.factors[0].weight.dtype)
        links = [link.weight.reshape(g, link.weight.shape[0] // g, *link.weight.shape[1:]) for link in self.factors]
        # Before the piece: channel (c, b_0, ..., b_i), c most significant; link i adds b_i.
        used = m
        for i in range(piece):
            rows = used * counts[i]
            links[i][:, :rows].zero_()
            for col in range(used):
                for b, pos in enumerate(itertools.product(*offsets[i])):
                    links[i][(slice(None), col * counts[i] + b, col) + pos] = 1
            self._zero_bias(i, rows)
            used = rows
        after = math.prod(counts[piece + 1:])
        rows = n * after
        links[piece][:, :rows].zero_()
        self._fill_piece(links[piece], kernel, offsets, nesting, piece, counts, m, n)
        if bias is not None:
            b = self.factors[piece].bias.view(g, -1)
            b[:, :rows].zero_()
            b[:, :rows:after].copy_(bias.reshape(g, n).to(b.dtype))
        # After the piece: channel (o, a_{i}, ..., a_{L-1}), o most significant; link i consumes a_i.
        for i in range(piece + 1, len(self.factors)):
            rest = math.prod(counts[i + 1:])
            out_rows = n * rest
            links[i][:, :out_rows].zero_()
            for row in range(out_rows):
                o, r = divmod(row, rest)
                for a, pos in enumerate(itertools.product(*offsets[i])):
                    links[i][(slice(None), row, (o * counts[i] + a) * rest + r) + pos] = 1
            self._zero_bias(i, out_rows)
        self.exact_start = True
        return True

    def _zero_bias(self, index: int, rows: int) -> None:
        bias = self.factors[index].bias
        if bias is not None:
            bias.view(self.groups, -1)[:, :rows].zero_()

    def _fill_piece(self, target: torch.Tensor, kernel: torch.Tensor, offsets: list, nesting: list[int], piece: int,
                    counts: list[int], m: int, n: int) -> None:
        """Copy each tap of the layer's kernel to the piece entry whose shifts add up to it (exactly one)."""
        after = math.prod(counts[piece + 1:])
        before = math.prod(counts[:piece])
        o_idx = torch.arange(n, device=target.device)[:, None]
        c_idx = torch.arange(m, device=target.device)[None, :]
        for tap in itertools.product(*(range(s) for s in kernel.shape[3:])):
            rest = list(tap)
            chosen: dict[int, list[int]] = {}
            for i in reversed(nesting):  # outermost shift first
                idx = []
                for d, offs in enumerate(offsets[i]):
                    j = max(k for k, s in enumerate(offs) if s <= rest[d])
                    idx.append(j)
                    rest[d] -= offs[j]
                chosen[i] = idx
            b_index = _radix([_flat_index(chosen[i], offsets[i]) for i in range(piece)], counts[:piece])
            a_index = _radix([_flat_index(chosen[i], offsets[i]) for i in range(piece + 1, len(counts))],
                             counts[piece + 1:])
            rows = o_idx * after + a_index
            cols = c_idx * before + b_index
            target[(slice(None), rows, cols) + tuple(rest)] = kernel[(slice(None), slice(None), slice(None)) + tap]

    def _preserving_plan(self) -> tuple[int, list[list[list[int]]], list[int]] | None:
        """The feasible arrangement that needs the fewest channels: (piece link, per-link per-dim shift offsets,
        nesting order of the shift links), or None."""
        g = self.groups
        m, n = self.widths[0] // g, self.widths[-1] // g
        links = len(self.kernels)
        dims = len(self.kernels[0])
        best = None
        for piece in range(links):
            nesting = list(range(piece - 1, -1, -1)) + list(range(piece + 1, links))
            offsets: list[list[list[int]]] = [[[0]] * dims for _ in range(links)]
            for d in range(dims):
                size = self.kernels[piece][d]
                for i in nesting:
                    total = size + self.kernels[i][d] - 1
                    offs = [0]
                    while offs[-1] + size < total:
                        offs.append(min(offs[-1] + size, total - size))
                    offsets[i][d] = offs
                    size = total
            counts = [math.prod(len(o) for o in offs) if i != piece else 1 for i, offs in enumerate(offsets)]
            needed = [m * math.prod(counts[: i + 1]) for i in range(piece)]
            needed += [n * math.prod(counts[i + 1:]) for i in range(piece, links - 1)]
            if all(w // g >= need for w, need in zip(self.widths[1:-1], needed)):
                cost = sum(needed)
                if best is None or cost < best[0]:
                    best = (cost, piece, offsets, nesting)
        return None if best is None else best[1:]


def _flat_index(idx: list[int], offsets: list[list[int]]) -> int:
    return _radix(idx, [len(o) for o in offsets])


def _radix(digits: list[int], bases: list[int]) -> int:
    value = 0
    for digit, base in zip(digits, bases):
        value = value * base + digit
    return value


class ComposedBias(nn.Module):
    """The ``bias`` parametrization: the chain's composed bias. Holds the chain without registering it, so the
    factors appear once in the state dict (under the weight's parametrization)."""

    def __init__(self, chain: ExpandChain) -> None:
        super().__init__()
        object.__setattr__(self, "chain", chain)

    def forward(self) -> torch.Tensor:
        return self.chain.composed_bias()

    def right_inverse(self, bias: torch.Tensor) -> tuple[()]:
        """The bias lives in the chain's factors; keep no copy."""
        return ()


__all__ = ["ACTIVATIONS", "ComposedBias", "ExpandChain", "Link", "chain_width", "compose"]
