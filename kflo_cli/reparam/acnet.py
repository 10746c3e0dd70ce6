"""ACNet: asymmetric convolution blocks (Ding et al., ICCV 2019).

A square ``k x k`` convolution (odd ``k > 1``) becomes three branches, each with its own BatchNorm, whose
outputs are summed: the original ``k x k`` convolution, a ``1 x k`` and a ``k x 1`` convolution on the same
(padded) input, aligned with the square kernel's centre row and column. Collapse folds every branch BatchNorm
with its running statistics and adds the asymmetric kernels into the centre row and column: exact in eval mode.

The folded bias needs a slot. A convolution that has a bias keeps it there. A convolution without one passes it
to the BatchNorm that alone consumes its output (``running_mean -= bias``, exact in eval mode); that BatchNorm is
found by following the model's data flow (:func:`find_bn_consumers`). Layers without such a BatchNorm are
skipped with the reason in the plan, so the collapsed checkpoint always has the original architecture's keys.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import KfloError
from .base import LayerContext, Param, Recipe
from .dataflow import Consumer, find_bn_consumers
from .layers import padding_kind, weight_space_problem
from .registry import register_recipe

if TYPE_CHECKING:
    from ..record import LayerRecord

#: Branch BatchNorm weights (gamma) of the k x k, 1 x k and k x 1 branches for each ``bn_init``.
BN_INITS = {"standard": (1.0, 1.0, 1.0), "third": (1 / 3, 1 / 3, 1 / 3), "single": (1.0, 0.0, 0.0)}


def tf_same_pads(size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int],
                 dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """TensorFlow "SAME" padding as ``F.pad`` amounts ``(left, right, top, bottom)``: the output has
    ``ceil(size / stride)`` positions and the odd padding pixel goes to the end."""
    pads = []
    for i, k, s, d in zip(size, kernel, stride, dilation):
        total = max((math.ceil(i / s) - 1) * s + (k - 1) * d + 1 - i, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    return left, right, top, bottom


class ACBlock(nn.Module):
    """The training-time form of one ``k x k`` convolution: ``square`` (the original convolution module, moved
    in with its weight and bias), ``hor`` (``1 x k``) and ``ver`` (``k x 1``), each followed by its BatchNorm.

    All three branches read the same padded input, so the asymmetric kernels line up with the square kernel's
    centre row and column for every stride, dilation, grouping and padding mode.
    """

    def __init__(self, square: nn.Conv2d, *, affine: bool, bn_init: str, consumer: str | None) -> None:
        super().__init__()
        k = square.kernel_size[0]
        opts = dict(stride=square.stride, padding=0, dilation=square.dilation, groups=square.groups, bias=False,
                    device=square.weight.device, dtype=square.weight.dtype)
        self.square = square
        self.square_bn = self._bn(square, affine)
        self.hor = nn.Conv2d(square.in_channels, square.out_channels, (1, k), **opts)
        self.hor_bn = self._bn(square, affine)
        self.ver = nn.Conv2d(square.in_channels, square.out_channels, (k, 1), **opts)
        self.ver_bn = self._bn(square, affine)
        if affine:
            with torch.no_grad():
                for bn, gamma in zip(self.bns(), BN_INITS[bn_init]):
                    bn.weight.fill_(gamma)
        #: name of the BatchNorm that receives the folded bias when ``square`` has no bias slot.
        self.consumer = consumer
        self.tf_same = padding_kind(square) == "tf-same"
        self.train(square.training)  # new BatchNorms must not run in train mode inside an eval-mode model

    @staticmethod
    def _bn(conv: nn.Conv2d, affine: bool) -> nn.BatchNorm2d:
        bn = nn.BatchNorm2d(conv.out_channels, affine=affine, device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            # An untrained branch BN is then exactly gamma * z + beta in eval mode (sqrt(var + eps) == 1).
            bn.running_var.fill_(1.0 - bn.eps)
        return bn

    def bns(self) -> tuple[nn.BatchNorm2d, nn.BatchNorm2d, nn.BatchNorm2d]:
        """The branch BatchNorms of the k x k, 1 x k and k x 1 branches, in that order."""
        return self.square_bn, self.hor_bn, self.ver_bn

    def _offsets(self) -> tuple[int, int]:
        """Rows and columns between the receptive field's edge and the square kernel's centre tap."""
        k = self.square.kernel_size[0]
        dh, dw = self.square.dilation
        return dh * (k // 2), dw * (k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sq = self.square
        ch, cw = self._offsets()
        if self.tf_same:
            pads = tf_same_pads(tuple(x.shape[-2:]), sq.kernel_size, sq.stride, sq.dilation)
        else:
            pads = tuple(sq._reversed_padding_repeated_twice)
        left, right, top, bottom = pads
        if not self.tf_same and sq.padding_mode == "zeros" and left == right >= cw and top == bottom >= ch:
            # Symmetric zero padding at least as wide as the centre offset: let the convolutions pad.
            a = F.conv2d(x, sq.weight, sq.bias, sq.stride, (top, left), sq.dilation, sq.groups)
            h = F.conv2d(x, self.hor.weight, None, sq.stride, (top - ch, left), sq.dilation, sq.groups)
            v = F.conv2d(x, self.ver.weight, None, sq.stride, (top, left - cw), sq.dilation, sq.groups)
        else:
            mode = "constant" if self.tf_same or sq.padding_mode == "zeros" else sq.padding_mode
            xp = F.pad(x, pads, mode=mode) if any(pads) else x
            height, width = xp.shape[-2:]
            args = (sq.stride, 0, sq.dilation, sq.groups)
            a = F.conv2d(xp, sq.weight, sq.bias, *args)
            h = F.conv2d(xp[..., ch:height - ch, :], self.hor.weight, None, *args)
            v = F.conv2d(xp[..., :, cw:width - cw], self.ver.weight, None, *args)
        return self.square_bn(a) + self.hor_bn(h) + self.ver_bn(v)

    @torch.no_grad()
    def fused(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The eval-mode equivalent ``k x k`` kernel and bias, in float64."""
        k = self.square.kernel_size[0]
        c = k // 2
        kernel = torch.zeros_like(self.square.weight, dtype=torch.float64)
        bias = torch.zeros(self.square.out_channels, dtype=torch.float64, device=kernel.device)
        conv_bias = self.square.bias
        for conv, bn, rows, cols in ((self.square, self.square_bn, slice(None), slice(None)),
                                     (self.hor, self.hor_bn, slice(c, c + 1), slice(None)),
                                     (self.ver, self.ver_bn, slice(None), slice(c, c + 1))):
            mean, var = bn.running_mean.double(), bn.running_var.double()
            gamma = bn.weight.double() if bn.affine else torch.ones_like(mean)
            beta = bn.bias.double() if bn.affine else torch.zeros_like(mean)
            scale = gamma / torch.sqrt(var + bn.eps)
            kernel[:, :, rows, cols] += conv.weight.double() * scale[:, None, None, None]
            shift = beta - mean * scale
            if conv is self.square and conv_bias is not None:
                shift = shift + conv_bias.double() * scale
            bias += shift
        return kernel, bias


@register_recipe
class ACNet(Recipe):
    """ACNet on every square, odd, larger-than-1 ``Conv2d`` whose folded bias has somewhere to go."""

    name = "acnet"
    description = "Asymmetric convolution blocks: k x k + 1 x k + k x 1 branches with BatchNorms, folded on collapse (Ding et al.)"
    params = {
        "bn_init": Param(
            str, "standard",
            "branch BatchNorm gammas: standard (all 1), third (all 1/3), single (1, 0, 0: starts as the k x k branch)",
            choices=tuple(BN_INITS),
        ),
        "affine": Param(bool, True, "whether the branch BatchNorms have a learnable gamma and beta"),
    }

    def validate(self) -> None:
        if not self.values["affine"] and self.values["bn_init"] != "standard":
            raise KfloError(f"recipe 'acnet': bn_init={self.values['bn_init']} sets BatchNorm gammas, which "
                            "affine=false BatchNorms do not have; use affine=true or bn_init=standard")

    def considers(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Conv2d)

    def _shape_problem(self, module: nn.Conv2d) -> str | None:
        problem = weight_space_problem(module)
        if problem:
            return problem
        kh, kw = module.kernel_size
        if kh != kw:
            return f"{kh}x{kw} kernel is not square"
        if kh == 1:
            return "1x1 kernel: no asymmetric branches"
        if kh % 2 == 0:
            return f"{kh}x{kh} kernel has no centre row and column (even size)"
        if padding_kind(module) is None:
            return f"{type(module).__name__} has its own forward; ACNet handles nn.Conv2d and timm's Conv2dSame"
        return None

    def _consumers(self, layer: LayerContext) -> dict[str, Consumer]:
        """The data-flow analysis of the model, computed once per expansion for all bias-less candidate layers."""
        if "flow" not in layer.shared:
            names = [n for n, m in layer.model.named_modules()
                     if n and isinstance(m, nn.Conv2d) and m.bias is None and self._shape_problem(m) is None]
            layer.shared["flow"] = find_bn_consumers(layer.model, names) if names else {}
        return layer.shared["flow"]

    def skip_reason(self, layer: LayerContext) -> str | None:
        problem = self._shape_problem(layer.module)
        if problem or layer.module.bias is not None:
            return problem
        found = self._consumers(layer)[layer.name]
        return None if found.bn else f"no bias and {found.reason}, so the folded bias has nowhere to go"

    def expand_layer(self, layer: LayerContext) -> nn.Module:
        module = layer.module
        consumer = None if module.bias is not None else self._consumers(layer)[layer.name].bn
        return ACBlock(module, affine=self.values["affine"], bn_init=self.values["bn_init"], consumer=consumer)

    def collapse_layer(self, layer: LayerContext, original: "LayerRecord") -> nn.Module:
        block: ACBlock = layer.module
        kernel, bias = block.fused()
        conv = block.square
        conv.weight = nn.Parameter(kernel, requires_grad=conv.weight.requires_grad)
        if conv.bias is not None:
            conv.bias = nn.Parameter(bias, requires_grad=conv.bias.requires_grad)
        else:
            bn = layer.model.get_submodule(block.consumer)
            # Without running statistics the BatchNorm subtracts the batch mean, which cancels the bias exactly.
            if getattr(bn, "running_mean", None) is not None:
                bn.running_mean = bn.running_mean.double() - bias
        return conv


__all__ = ["ACBlock", "ACNet", "BN_INITS", "tf_same_pads"]
