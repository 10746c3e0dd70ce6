"""DO-Conv: depthwise over-parameterized convolution (Cao et al., arXiv 2006.12030).

Every convolution with a spatial kernel of ``M = prod(k) > 1`` taps gets a conventional kernel ``W``
(``out x in/groups x D_mul``; stored per input channel, see :class:`DOConvParametrization`) and, per *true* input
channel ``c``, a depthwise matrix ``D_c`` (``M x D_mul``).
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
    """``W'_c = (D_c + I) @ K_c`` for every true input channel ``c``: one batched matrix product.

    ``K_c`` (``D_mul x out/groups``) is W's slice that channel ``c`` feeds, stored as such (see
    :class:`DOConvParametrization`), so the product runs with the output channels as its long dimension, which the
    CPU's GEMM vectorises (the ``(out x D_mul) @ (D_mul x taps)`` orientation that ``einsum`` picks has 9 columns
    and runs far below peak), and no operand needs a copy. The result is turned into the layer's
    ``out x in/groups x taps`` by one 2-D transpose per group; the backward transposes the incoming gradient back
    the same way. Measured on docs/performance.md's ResNet-18 case: the step from 1.29-1.37x to about 1.1x vanilla.
    """

    @staticmethod
    def forward(ctx, channel_kernels: torch.Tensor, a: torch.Tensor, groups: int) -> torch.Tensor:
        in_channels, _, per_out = channel_kernels.shape
        taps = a.shape[1]
        per_group = in_channels // groups
        ctx.save_for_backward(channel_kernels, a)
        ctx.groups = groups
        yt = torch.bmm(a, channel_kernels)  # in x taps x out/groups; under autocast in its reduced precision
        return _swap(yt.view(groups, per_group * taps, per_out)).view(groups * per_out, per_group, taps)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        channel_kernels, a = ctx.saved_tensors
        groups = ctx.groups
        out, per_group, taps = grad.shape
        grad_kernels = grad_a = None
        # The factors' gradients in their own dtype: a reduced-precision upstream gradient (autocast) is widened.
        with torch.autocast(grad.device.type, enabled=False):
            gt = _swap(grad.to(channel_kernels.dtype).reshape(groups, out // groups, per_group * taps))
            gt = gt.view(groups * per_group, taps, out // groups)
            if ctx.needs_input_grad[0]:
                grad_kernels = torch.bmm(a.transpose(1, 2), gt)
            if ctx.needs_input_grad[1]:
                grad_a = torch.bmm(gt, channel_kernels.transpose(1, 2))
        return grad_kernels, grad_a, None


def compose_doconv(channel_kernels: torch.Tensor, depthwise: torch.Tensor, groups: int) -> torch.Tensor:
    """DO-Conv's composed kernel ``W'`` as ``out x in/groups x taps`` from ``channel_kernels`` (``in x D_mul x
    out/groups``: W arranged per true input channel) and ``depthwise`` (``D + I``: ``in x taps x D_mul``)."""
    return _Compose.apply(channel_kernels, depthwise, groups)


def channel_kernels_of(kernel: torch.Tensor, groups: int) -> torch.Tensor:
    """W in the paper's ``out x in/groups x D_mul`` arranged as ``in x D_mul x out/groups`` (one matrix per true
    input channel), a contiguous copy."""
    out, per_group, dmul = kernel.shape
    grouped = kernel.reshape(groups, out // groups, per_group, dmul)
    return grouped.permute(0, 2, 3, 1).reshape(groups * per_group, dmul, out // groups).contiguous()


class DOConvParametrization(nn.Module):
    """Holds W and ``depthwise`` (D: ``in x M x D_mul``); ``forward()`` returns the layer-shaped kernel ``W'``.

    W (the paper's ``out x in/groups x D_mul``) is stored per true input channel, as ``channel_kernels``
    (``in x D_mul x out/groups``: the columns of W that channel ``c`` feeds), next to D, which is per input channel
    too: then ``W'_c = (D_c + I) @ K_c`` is one batched product without copies (:class:`_Compose`).
    :meth:`kernel` gives W in the paper's layout, and ``state_dict()`` holds that (key ``kernel``), so checkpoints keep
    the paper's layout and every file written before this storage loads unchanged.
    """

    #: the training-state layout since which W is stored per input channel (kflo_cli.train.run_dir.FACTOR_LAYOUT):
    #: optimizer states saved before follow the paper's layout and are refused on resume
    factor_layout = 2
    title = "DO-Conv"

    def __init__(self, weight_shape: torch.Size, in_channels: int, groups: int, depth_multiplier: int) -> None:
        super().__init__()
        out, per_group, *kernel = weight_shape
        taps = math.prod(kernel)
        if depth_multiplier < taps:
            # Below M the identity [I_M | 0] would lose taps: the public code silently zeroes them.
            raise KfloError(f"DO-Conv needs depth_multiplier >= {taps} (the kernel's taps), got {depth_multiplier}")
        self.weight_shape = tuple(weight_shape)
        self.groups = groups
        self.channel_kernels = nn.Parameter(torch.empty(in_channels, depth_multiplier, out // groups))
        self.depthwise = nn.Parameter(torch.empty(in_channels, taps, depth_multiplier))
        # Not persistent: a constant, rebuilt from the shapes, so it never appears in a checkpoint.
        self.register_buffer("eye", torch.eye(taps, depth_multiplier), persistent=False)

    def forward(self) -> torch.Tensor:
        return compose_doconv(self.channel_kernels, self.depthwise + self.eye, self.groups).reshape(self.weight_shape)

    def kernel(self) -> torch.Tensor:
        """W in the paper's layout, ``out x in/groups x D_mul`` (a copy)."""
        in_channels, dmul, per_out = self.channel_kernels.shape
        per_group = in_channels // self.groups
        grouped = self.channel_kernels.reshape(self.groups, per_group, dmul, per_out)
        return grouped.permute(0, 3, 1, 2).reshape(self.groups * per_out, per_group, dmul)

    @torch.no_grad()
    def right_inverse(self, weight: torch.Tensor) -> tuple[()]:
        """``D = 0``; ``W = [weight | random columns]``, so that ``W' = weight`` exactly.

        The extra columns (``D_mul > M``) are drawn like a fresh layer's weight (``U(-1/sqrt(fan_in), ..)``), in
        the paper's layout, so a seed draws what it drew before the per-channel layout: zero columns facing a zero
        ``D`` would receive zero gradient forever.
        """
        out, per_group, *_ = self.weight_shape
        taps, dmul = self.eye.shape
        bound = 1.0 / math.sqrt(per_group * taps)
        kernel = torch.empty(out, per_group, dmul, dtype=self.channel_kernels.dtype, device=self.channel_kernels.device)
        kernel.uniform_(-bound, bound)
        kernel[:, :, :taps] = weight.reshape(out, per_group, taps)
        self.channel_kernels.copy_(channel_kernels_of(kernel, self.groups))
        self.depthwise.zero_()
        return ()

    # Checkpoints hold W in the paper's layout, under "kernel", whatever the storage: files written before the
    # per-channel storage load unchanged, and a checkpoint reads as the paper defines the factors.

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        kernel = self.kernel()
        destination[prefix + "kernel"] = kernel if keep_vars else kernel.detach()
        destination[prefix + "depthwise"] = self.depthwise if keep_vars else self.depthwise.detach()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        kernel = state_dict.get(prefix + "kernel")
        if kernel is not None and tuple(kernel.shape) == (*self.weight_shape[:2], self.eye.shape[1]):
            state_dict[prefix + "channel_kernels"] = channel_kernels_of(state_dict.pop(prefix + "kernel"), self.groups)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def roles(self) -> dict[str, ParamRole]:
        return {"channel_kernels": ParamRole("doconv-kernel"), "depthwise": ParamRole("doconv-depthwise")}


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


__all__ = ["DOConv", "DOConvParametrization", "MAX_DEPTH_MULTIPLIER", "channel_kernels_of", "compose_doconv", "kernel_taps"]
