"""DO-Conv: depthwise over-parameterized convolution (Cao et al., arXiv 2006.12030).

Every convolution with a spatial kernel of ``M = prod(k) > 1`` taps gets a conventional kernel ``W``
(``out x in/groups x D_mul``) and, per *true* input channel ``c``, a depthwise matrix ``D_c`` (``M x D_mul``).
The effective kernel is

    W'[o, c, s] = sum_d (D + I)[c_true(o, c), s, d] * W[o, c, d],   I = [I_M | 0] (M x D_mul)

where ``c_true(o, c) = group(o) * in/groups + c`` is the input channel that tap ``(o, c)`` actually reads. ``D``
starts at zero and ``W``'s first ``M`` columns are the layer's kernel, so expansion is function-preserving.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import KfloError
from .base import CONV_TYPES, LayerContext, Param, ParamRole, WeightRecipe
from .layers import weight_space_problem
from .registry import register_recipe


def kernel_taps(module: nn.Module) -> int:
    """The number of spatial taps ``prod(kernel_size)`` of a convolution."""
    return math.prod(module.kernel_size)


def _swap(x: torch.Tensor) -> torch.Tensor:
    """``x`` (``groups x rows x cols``) transposed per group into a contiguous ``groups x cols x rows``.

    One group goes through a 2-D transpose, which PyTorch copies about twice as fast as the batched one.
    """
    if x.shape[0] == 1:
        return x[0].t().contiguous().unsqueeze(0)
    return x.transpose(1, 2).contiguous()


class _Compose(torch.autograd.Function):
    """``W'[g, o, c, s] = sum_d W[g, o, c, d] A[g, c, s, d]`` as one batched matrix product per input channel.

    The product runs with the output channels as its long dimension, ``(taps x D_mul) @ (D_mul x out)`` per
    channel: a ``(out x D_mul) @ (D_mul x taps)`` product (what ``einsum`` picks) has 9 columns, which the
    CPU's GEMM runs far below its peak. The layouts in between are made by 2-D transposes, and the backward
    uses the same orientation. Measured on one CPU thread (512 -> 512 3x3, forward and backward of the
    composition): 23 ms against einsum's 30 ms; docs/performance.md.
    """

    @staticmethod
    def forward(ctx, kernel: torch.Tensor, a: torch.Tensor, groups: int) -> torch.Tensor:
        out, per_group, dmul = kernel.shape
        taps = a.shape[1]
        wt = _swap(kernel.reshape(groups, out // groups, per_group * dmul)).view(groups * per_group, dmul, -1)
        # The kernel itself, not its transposed copy: that would hold a second copy of every kernel until backward.
        ctx.save_for_backward(kernel, a)
        ctx.groups = groups
        yt = torch.bmm(a, wt)  # under autocast in bfloat16 or float16, like any matrix product
        return _swap(yt.view(groups, per_group * taps, -1)).view(out, per_group, taps)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        kernel, a = ctx.saved_tensors
        groups = ctx.groups
        out, per_group, taps = grad.shape
        dmul = kernel.shape[2]
        grad_kernel = grad_a = None
        # The factors' gradients in their own dtype: a reduced-precision upstream gradient (autocast) is widened.
        with torch.autocast(grad.device.type, enabled=False):
            gt = _swap(grad.to(kernel.dtype).reshape(groups, out // groups, per_group * taps))
            gt = gt.view(groups * per_group, taps, -1)
            if ctx.needs_input_grad[0]:
                grad_wt = torch.bmm(a.transpose(1, 2), gt)
                grad_kernel = _swap(grad_wt.view(groups, per_group * dmul, -1)).view(out, per_group, dmul)
            if ctx.needs_input_grad[1]:
                # per channel: (taps x out) @ (out x D_mul), the kernel read in place (a view when groups == 1)
                w = kernel.view(groups, out // groups, per_group, dmul).transpose(1, 2)
                grad_a = torch.bmm(gt, w.reshape(groups * per_group, out // groups, dmul))
        return grad_kernel, grad_a, None


def compose_doconv(kernel: torch.Tensor, depthwise: torch.Tensor, groups: int) -> torch.Tensor:
    """DO-Conv's composed kernel ``W'`` as ``out x in/groups x taps`` from ``kernel`` (W: ``out x in/groups x
    D_mul``) and ``depthwise`` (``D + I``: ``in x taps x D_mul``)."""
    return _Compose.apply(kernel, depthwise, groups)


class DOConvParametrization(nn.Module):
    """Holds ``kernel`` (W: out x in/groups x D_mul) and ``depthwise`` (D: in x M x D_mul).

    ``forward()`` returns the layer-shaped kernel ``W'``.
    """

    def __init__(self, weight_shape: torch.Size, in_channels: int, groups: int, depth_multiplier: int) -> None:
        super().__init__()
        out, per_group, *kernel = weight_shape
        taps = math.prod(kernel)
        if depth_multiplier < taps:
            # Below M the identity [I_M | 0] would lose taps: the public code silently zeroes them.
            raise KfloError(f"DO-Conv needs depth_multiplier >= {taps} (the kernel's taps), got {depth_multiplier}")
        self.weight_shape = tuple(weight_shape)
        self.groups = groups
        self.kernel = nn.Parameter(torch.empty(out, per_group, depth_multiplier))
        self.depthwise = nn.Parameter(torch.empty(in_channels, taps, depth_multiplier))
        # Not persistent: a constant, rebuilt from the shapes, so it never appears in a checkpoint.
        self.register_buffer("eye", torch.eye(taps, depth_multiplier), persistent=False)

    def forward(self) -> torch.Tensor:
        return compose_doconv(self.kernel, self.depthwise + self.eye, self.groups).reshape(self.weight_shape)

    @torch.no_grad()
    def right_inverse(self, weight: torch.Tensor) -> tuple[()]:
        """``D = 0``; ``W = [weight | random columns]``, so that ``W' = weight`` exactly.

        The extra columns (``D_mul > M``) are drawn like a fresh layer's weight (``U(-1/sqrt(fan_in), ..)``):
        zero columns facing a zero ``D`` would receive zero gradient forever.
        """
        out, per_group, *_ = self.weight_shape
        taps = self.eye.shape[0]
        bound = 1.0 / math.sqrt(per_group * taps)
        self.kernel.uniform_(-bound, bound)
        self.kernel[:, :, :taps].copy_(weight.reshape(out, per_group, taps))
        self.depthwise.zero_()
        return ()

    def roles(self) -> dict[str, ParamRole]:
        return {"kernel": ParamRole("doconv-kernel"), "depthwise": ParamRole("doconv-depthwise")}


#: The ceiling of D_mul (docs/recipes.md, "Parameter bounds"): the paper uses the taps (9 for 3 x 3); 4096 covers
#: kernels up to 16 x 16 x 16 taps and keeps a 512 x 512 x 3 x 3 convolution's factors below 2^31 elements.
MAX_DEPTH_MULTIPLIER = 4096


@register_recipe
class DOConv(WeightRecipe):
    """DO-Conv on every Conv1d/2d/3d with more than one spatial tap (grouped and depthwise included)."""

    name = "doconv"
    description = "Depthwise over-parameterized convolution: W' = (D + I)^T o W per input channel (Cao et al.)"
    params = {
        "depth_multiplier": Param(
            int,
            0,
            "D_mul, columns per input channel: 0 = the kernel's number of taps prod(k); otherwise an integer from "
            f"prod(k) to {MAX_DEPTH_MULTIPLIER}",
            low=0,
            high=MAX_DEPTH_MULTIPLIER,
        ),
    }
    size_params = ("depth_multiplier",)

    def considers(self, module: nn.Module) -> bool:
        return isinstance(module, CONV_TYPES)

    def depth_multiplier(self, module: nn.Module) -> int:
        """D_mul for ``module``: the parameter, or the kernel's taps when it is 0."""
        return self.values["depth_multiplier"] or kernel_taps(module)

    def skip_reason(self, layer: LayerContext) -> str | None:
        problem = weight_space_problem(layer.module)
        if problem is None and kernel_taps(layer.module) == 1:
            return "1-tap kernel: no spatial taps to over-parameterize"
        return problem

    def check(self, layer: LayerContext) -> str | None:
        module = layer.module
        taps, dmul = kernel_taps(module), self.depth_multiplier(module)
        if dmul >= taps:
            return super().check(layer)
        return (f"doconv: layer '{layer.name}' has a {'x'.join(map(str, module.kernel_size))} kernel ({taps} taps) but "
                f"depth_multiplier={dmul}; use depth_multiplier >= {taps}, 0 for each kernel's own taps, "
                f"or --exclude '{layer.name}'")

    def factor_count(self, layer: LayerContext) -> int:
        """``out * in/groups * D_mul + in * M * D_mul`` (W and D) plus the ``M x D_mul`` identity buffer."""
        module = layer.module
        out, per_group = module.weight.shape[:2]
        taps, dmul = kernel_taps(module), self.depth_multiplier(module)
        return out * per_group * dmul + module.in_channels * taps * dmul + taps * dmul

    def make_parametrization(self, layer: LayerContext) -> nn.Module:
        module = layer.module
        return DOConvParametrization(module.weight.shape, module.in_channels, module.groups, self.depth_multiplier(module))


__all__ = ["DOConv", "DOConvParametrization", "MAX_DEPTH_MULTIPLIER", "compose_doconv", "kernel_taps"]
