"""ExpandNets CL, CK and FC (Guo, Alvarez & Salzmann, *ExpandNets: Linear Over-parameterization to Train Compact
Convolutional Networks*, NeurIPS 2020), in two execution forms of the same linear function.

* ``expandnet-cl`` (paper 3.1, "expanding convolutional layers"): a convolution whose kernel has more than one
  tap becomes ``1x1 (m -> r*m)``, ``k x k (-> r*n)``, ``1x1 (-> n)``; stride on the middle link.
* ``expandnet-ck`` ("expanding convolutional kernels"): a convolution with an odd kernel dimension larger than 3
  becomes ``l = (k_max - 1) / 2`` chained 3-tap convolutions (1-tap along dimensions that are already covered),
  widths ``r*m`` then ``r*n``; stride on the last link.
* ``expandnet-fc`` (paper 3.3): a Linear layer becomes ``L`` Linear layers ``m -> r*m -> r*n ... -> n``.

Padding goes on the first link, the layer's groups and dilation on every link (paper 3.2). The factors are
owned by an :class:`~kflo_cli.reparam.expandnet_chain.ExpandChain` registered as the layer's ``weight``
parametrization (and the composed bias as its ``bias`` parametrization) in both forms, so checkpoints have the
same keys whichever form wrote them. ``mode=kernel`` runs the layer's own forward on the composed kernel;
``mode=feature`` runs the chain of real layers (and allows the nonlinear counterpart of the "+Init" scheme);
``mode=auto`` (the default) picks the cheaper form per layer (:mod:`kflo_cli.reparam.execution`).
See docs/expandnet.md.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch.nn as nn

from ..errors import KfloError
from .base import CONV_TYPES, LayerContext, Param, ParamRole, WeightRecipe
from .execution import MODES, form_class
from .expandnet_chain import ACTIVATIONS, ComposedBias, ExpandChain, chain_width
from .layers import padding_kind, weight_space_problem
from .registry import register_recipe

NONLINEAR = ("none", *ACTIVATIONS)
INITS = ("auto", "preserve", "random")
DECAYS = ("factors", "composed")


#: Bounds of r and L (docs/recipes.md, "Parameter bounds"): the paper uses r = 4 and L = 3 (FC); at either ceiling,
#: with the other parameter at its default, the chain of a 512 x 512 x 3 x 3 convolution (CL) or of a 512 x 512
#: Linear (FC) holds fewer than 2^31 elements.
MAX_RATE = 16.0
MAX_LAYERS = 16


def _common_params() -> dict[str, Param]:
    return {
        "rate": Param(float, 4.0, f"r, the expansion rate: inner widths are r*m and r*n (a number > 0 and at most "
                      f"{MAX_RATE:g})", low=0.0, high=MAX_RATE, low_open=True),
        "mode": Param(str, "auto", "kernel: compose the chain's kernel and run the layer on it; feature: run the "
                      "chain of real layers (the paper's form); auto: the cheaper of the two for the input shape each "
                      "layer sees (docs/performance.md)", choices=MODES),
        "nonlinear": Param(str, "none", "an activation between the chained layers (mode=feature): the nonlinear "
                           "counterpart of the +Init scheme, not collapsible", choices=NONLINEAR),
        "init": Param(str, "auto", "preserve: start from the layer's own weight and bias where the widths allow an "
                      "exact factorisation; random: the paper's fresh-layer initialisation; auto: preserve for the "
                      "linear ExpandNet, random for the nonlinear counterpart", choices=INITS),
        "decay": Param(str, "factors", "where the run's weight decay goes: factors (each factor, the official code) "
                       "or composed (the composed kernel, Arora et al.'s product-L2 form)", choices=DECAYS),
    }


def _stem_param() -> Param:
    return Param(str, "keep", "keep: the first width of an RGB stem (the model's first convolution, 3 input "
                 "channels) stays m, as in the official code and the paper's tables; expand: r*m everywhere "
                 "(the paper's formula)", choices=("keep", "expand"))


def is_stem(module: nn.Module, model: nn.Module) -> bool:
    """Whether ``module`` is the model's first convolution (module order) and reads 3 (RGB) channels."""
    first = next((m for m in model.modules() if isinstance(m, CONV_TYPES)), None)
    return first is module and module.in_channels == 3


def logit_layer(model: nn.Module) -> nn.Module | None:
    """The model's classifier: timm's ``get_classifier()`` if that is a Linear, else the last Linear layer."""
    try:
        head = model.get_classifier() if callable(getattr(model, "get_classifier", None)) else None
    except Exception:  # noqa: BLE001  (any model code may fail; fall back to module order)
        head = None
    if isinstance(head, nn.Linear):
        return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


NONLINEAR_COLLAPSE = (
    "layer '{name}' runs the nonlinear counterpart (nonlinear={act}), which no single layer computes, so it cannot "
    "be collapsed; this is the first half of ExpandNets' +Init scheme: train it, transfer its factors to the linear "
    "ExpandNet (`kflo expand MODEL --init-from-expanded THIS.safetensors -o linear.safetensors`), train that, and "
    "collapse the linear one"
)


class ExpandNetRecipe(WeightRecipe):
    """What CL, CK and FC share: the chain (a weight parametrization, plus the composed bias), its two forms and
    its initialisation. Collapse is :class:`WeightRecipe`'s."""

    layer_types: ClassVar[tuple[type[nn.Module], ...]] = CONV_TYPES
    size_params = ("rate",)

    def validate(self) -> None:
        v = self.values
        if v["nonlinear"] != "none" and v["mode"] != "feature":
            raise KfloError(f"recipe '{self.name}': nonlinear={v['nonlinear']} needs mode=feature (the nonlinear "
                            "counterpart runs real chained layers); add mode=feature")
        if v["nonlinear"] != "none" and v["init"] == "preserve":
            raise KfloError(f"recipe '{self.name}': init=preserve cannot preserve a function through "
                            f"nonlinear={v['nonlinear']}; use init=random (or auto)")

    @classmethod
    def counterpart_params(cls, values: dict[str, Any]) -> dict[str, Any]:
        """+Init, second step: the linear ExpandNet of a nonlinear counterpart (``mode=kernel``, the same linear
        function and usually cheaper; ``init=random``, the transferred tensors replace the start anyway)."""
        values = dict(values)
        if values.get("nonlinear", "none") != "none":
            values.update(nonlinear="none", mode="kernel", init="random")
        return values

    def considers(self, module: nn.Module) -> bool:
        return isinstance(module, self.layer_types)

    def links(self, module: nn.Module, model: nn.Module) -> tuple[list[int], list[tuple[int, ...]], list[tuple[int, ...]]]:
        """The chain's widths ``[m, ..., n]``, each link's kernel size and each link's stride."""
        raise NotImplementedError

    def shape_problem(self, module: nn.Module, model: nn.Module) -> str | None:
        """Why this recipe leaves the layer alone (``None``: it expands it)."""
        return None

    def skip_reason(self, layer: LayerContext) -> str | None:
        module = layer.module
        problem = weight_space_problem(module) or self.shape_problem(module, layer.model)
        if problem is None and self.values["mode"] == "feature" and padding_kind(module) is None:
            problem = (f"mode=feature cannot run a chain inside {type(module).__name__}'s own forward (it may "
                       "transform the weight); use mode=kernel")
        return problem

    def factor_count(self, layer: LayerContext) -> int:
        """Every link's ``weight`` (``w_{i+1} x w_i/groups x kernel``) and, when the layer has a bias, its bias."""
        module = layer.module
        widths, kernels, _ = self.links(module, layer.model)
        groups = getattr(module, "groups", 1)
        bias = module.bias is not None
        return sum(widths[i + 1] * (widths[i] // groups) * math.prod(kernel) + (widths[i + 1] if bias else 0)
                   for i, kernel in enumerate(kernels))

    def make_parametrization(self, layer: LayerContext) -> nn.Module:
        module = layer.module
        widths, kernels, strides = self.links(module, layer.model)
        act = None if self.values["nonlinear"] == "none" else self.values["nonlinear"]
        chain = ExpandChain(widths, kernels, strides, getattr(module, "groups", 1), module.bias is not None,
                            tuple(getattr(module, "dilation", ())), act)
        chain.decay_composed = self.values["decay"] == "composed"
        return chain

    def make_bias_parametrization(self, layer: LayerContext, weight_parametrization: nn.Module) -> nn.Module | None:
        return ComposedBias(weight_parametrization)

    def forward_class(self, layer: LayerContext) -> type | None:
        mode = self.values["mode"]
        if padding_kind(layer.module) is None:
            return None  # the layer's own forward on the composed kernel
        # the kernel form too runs through execution.py: a croppable chain (CL without bias) drops the taps that
        # only read padding (execution.live_taps)
        return form_class(type(layer.module), mode)

    def initialize(self, layer: LayerContext, parametrization: nn.Module) -> str | None:
        """``init=preserve`` (``auto`` for the linear chain): the layer's own weight and bias, where the widths allow
        an exact factorisation; otherwise (and for ``init=random``) the paper's fresh-layer initialisation."""
        chain: ExpandChain = parametrization
        module = layer.module
        init = self.values["init"]
        if init == "auto":
            init = "random" if chain.activation else "preserve"
        bias = module.bias.detach() if module.bias is not None else None
        if init == "preserve" and chain.init_preserving(module.weight.detach(), bias):
            return None
        chain.reset_random()
        if init != "preserve":
            return None
        return (f"{self.name}: layer '{layer.name}' (widths {' -> '.join(map(str, chain.widths))}, groups {chain.groups}) has "
                "no exact function-preserving factorisation, so it starts from the paper's random initialisation; "
                "pass init=random to say so, or raise the rate (or stem=expand) to preserve it")

    def collapse_problem(self, layer: LayerContext) -> str | None:
        chain: ExpandChain = self.parametrization(layer.module)
        return NONLINEAR_COLLAPSE.format(name=layer.name, act=chain.activation) if chain.activation else None

    def roles(self, module: nn.Module) -> dict[str, ParamRole]:
        roles = super().roles(module)
        if self.values["decay"] == "composed":
            roles = {k: ParamRole(r.kind, r.weight_decay, decay_target="composed") for k, r in roles.items()}
        return roles

    def _first_width(self, module: nn.Module, model: nn.Module) -> int:
        m, groups = module.in_channels, module.groups
        if self.values.get("stem") == "keep" and is_stem(module, model):
            return m
        return chain_width(self.values["rate"], m, groups)


@register_recipe
class ExpandNetCL(ExpandNetRecipe):
    """ExpandNet-CL: ``k x k`` -> ``1x1 (r*m)``, ``k x k (r*n)``, ``1x1``."""

    name = "expandnet-cl"
    description = "ExpandNet-CL (Guo et al.): every conv with a kernel larger than 1 -> 1x1 (r*m), k x k (r*n), 1x1"
    params = {**_common_params(), "stem": _stem_param()}

    def shape_problem(self, module: nn.Module, model: nn.Module) -> str | None:
        if all(k == 1 for k in module.kernel_size):
            return "1-tap kernel: CL expands kernels larger than 1 (a 1x1 convolution keeps its receptive field)"
        return None

    def links(self, module: nn.Module, model: nn.Module) -> tuple[list[int], list[tuple[int, ...]], list[tuple[int, ...]]]:
        ones = (1,) * len(module.kernel_size)
        widths = [module.in_channels, self._first_width(module, model),
                  chain_width(self.values["rate"], module.out_channels, module.groups), module.out_channels]
        return widths, [ones, tuple(module.kernel_size), ones], [ones, tuple(module.stride), ones]


@register_recipe
class ExpandNetCK(ExpandNetRecipe):
    """ExpandNet-CK: an odd ``k x k`` kernel with ``k > 3`` -> ``(k - 1) / 2`` chained 3x3 convolutions."""

    name = "expandnet-ck"
    description = "ExpandNet-CK (Guo et al.): every conv with an odd kernel dimension > 3 -> chained 3x3 convs (r*m, r*n, ...)"
    params = {**_common_params(), "stem": _stem_param()}

    def shape_problem(self, module: nn.Module, model: nn.Module) -> str | None:
        kernel = tuple(module.kernel_size)
        shown = "x".join(map(str, kernel))
        if max(kernel) <= 3:
            return f"kernel {shown}: CK expands kernels with a dimension larger than 3 (use expandnet-cl)"
        even = [k for k in kernel if k % 2 == 0]
        if even:
            return f"kernel {shown}: even size {even[0]} cannot be reached by chained 3-tap kernels (use expandnet-cl)"
        return None

    def links(self, module: nn.Module, model: nn.Module) -> tuple[list[int], list[tuple[int, ...]], list[tuple[int, ...]]]:
        kernel = tuple(module.kernel_size)
        count = (max(kernel) - 1) // 2
        # Along each dimension the first (k_d - 1) / 2 links have 3 taps and the rest 1: per-dimension decomposition.
        kernels = [tuple(3 if i < (k - 1) // 2 else 1 for k in kernel) for i in range(count)]
        ones = (1,) * len(kernel)
        strides = [ones] * (count - 1) + [tuple(module.stride)]
        inner = chain_width(self.values["rate"], module.out_channels, module.groups)
        widths = [module.in_channels, self._first_width(module, model)] + [inner] * (count - 2) + [module.out_channels]
        return widths, kernels, strides


@register_recipe
class ExpandNetFC(ExpandNetRecipe):
    """ExpandNet-FC: a Linear layer ``m -> n`` -> ``L`` Linear layers ``m -> r*m -> r*n ... -> n``."""

    name = "expandnet-fc"
    description = "ExpandNet-FC (Guo et al.): every Linear -> L linear layers m -> r*m -> r*n ... -> n"
    params = {
        **_common_params(),
        "layers": Param(int, 3, f"L, the number of linear layers each Linear becomes: an integer from 2 to {MAX_LAYERS}",
                        low=2, high=MAX_LAYERS),
        "classifier": Param(str, "auto", "the model's classifier (logit layer): keep it plain (the official code), "
                            "expand it, or auto: keep it unless it is the model's only Linear layer",
                            choices=("auto", "keep", "expand")),
    }
    layer_types = (nn.Linear,)
    size_params = ("rate", "layers")

    def shape_problem(self, module: nn.Module, model: nn.Module) -> str | None:
        choice = self.values["classifier"]
        if choice == "expand" or module is not logit_layer(model):
            return None
        if choice == "auto" and sum(isinstance(m, nn.Linear) for m in model.modules()) == 1:
            return None
        return "the classifier (logit layer) stays plain, as in the official code; classifier=expand expands it"

    def links(self, module: nn.Module, model: nn.Module) -> tuple[list[int], list[tuple[int, ...]], list[tuple[int, ...]]]:
        rate, count = self.values["rate"], self.values["layers"]
        m, n = module.in_features, module.out_features
        widths = [m, chain_width(rate, m, 1)] + [chain_width(rate, n, 1)] * (count - 2) + [n]
        return widths, [()] * count, [()] * count


__all__ = [
    "ExpandNetCK",
    "ExpandNetCL",
    "ExpandNetFC",
    "ExpandNetRecipe",
    "MAX_LAYERS",
    "MAX_RATE",
    "is_stem",
    "logit_layer",
]
