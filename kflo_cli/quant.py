"""INT8 readiness of a deployed model (``kflo quant-check``): does over-parameterized training leave a model that
quantizes worse than vanilla training does?

Weights. Every filtering layer's weight (Conv1d/2d/3d, Linear) is fake-quantized per output channel, symmetric INT8
(PyTorch's ``torch.fake_quantize_per_channel_affine``: scale = max|w| / 127 per channel, zero point 0, range
[-127, 127]), the usual post-training weight quantization of deployment toolchains. Reported per layer: the weight
range, an outlier measure (max |w| / std of w: the larger, the coarser the grid is for the bulk of the weights) and
the relative quantization error ||w - q(w)|| / ||w||. BatchNorm is not folded into the weights first: kflo's
collapsed models keep their BatchNorm layers, and folding is a runtime's fusion step, outside this check.

Activations (with calibration data). The input of every filtering layer is quantized per tensor, as an integer
runtime feeds each quantized Conv/Linear: the network's input and the activations between layers. Ranges come from
PyTorch's observers (``torch.ao.quantization.observer``; MinMax by default, Histogram on request) run on calibration
batches; a layer whose calibration inputs are never negative (post-ReLU) gets an unsigned affine grid (quint8,
[0, 255]), any other a signed symmetric one (qint8, [-127, 127], zero point 0). A forward pre-hook on a copy of the
model applies ``torch.fake_quantize_per_tensor_affine`` with those parameters. Layer outputs are not quantized on
their own: each one reaches the next filtering layer's (quantized) input, and the model's output (the logits) stays
float, as runtimes dequantize it for the softmax/argmax. Residual additions and other non-filtering operations
run in float.

End to end: the relative error of the model's output with INT8 weights on random inputs (eval mode); with test
data, the test accuracy and the output error on the test images for float32, INT8 weights (W8), INT8 activations
(A8) and both (W8A8), and each layer's input quantization error on those images (clipping included).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from .errors import KfloError

FILTERING = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
QMIN, QMAX = -127, 127
#: Activation observers (``--observer``): MinMax keeps every calibration value on the grid; Histogram trades rare
#: outliers for a finer step (PyTorch's L2-optimal range search).
OBSERVERS = ("minmax", "histogram")
#: Calibration: ``--calib-batches`` batches of this many training images.
CALIB_BATCH_SIZE = 128
DEFAULT_CALIB_BATCHES = 8

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class ActivationQuant:
    """Per-tensor INT8 quantization of one layer's input: the calibrated grid and its error."""

    dtype: str  # "quint8" (inputs never negative in calibration: affine, [0, 255]) or "qint8" (symmetric)
    min: float  # the range the observer saw on the calibration batches
    max: float
    scale: float
    zero_point: int
    quant_min: int
    quant_max: int
    rel_error: float | None = None  # ||x - q(x)|| / ||x|| of the layer's float input on the test data
    clipped: float | None = None  # fraction of those values saturated: beyond the grid's ends by over half a step

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` fake-quantized on this grid (``torch.fake_quantize_per_tensor_affine``), in ``x``'s dtype."""
        q = torch.fake_quantize_per_tensor_affine(x.float(), self.scale, self.zero_point, self.quant_min,
                                                  self.quant_max)
        return q.to(x.dtype)

    @property
    def bounds(self) -> tuple[float, float]:
        """The smallest and largest representable values."""
        return (self.quant_min - self.zero_point) * self.scale, (self.quant_max - self.zero_point) * self.scale

    def saturated(self, x: torch.Tensor) -> torch.Tensor:
        """Where ``x`` lies beyond the grid's ends by more than half a step (clipped, not just rounded)."""
        low, high = self.bounds
        return (x < low - self.scale / 2) | (x > high + self.scale / 2)


@dataclass
class LayerQuant:
    """One layer's weight statistics and INT8 error, and its input's quantization when calibrated."""

    name: str
    shape: list[int]
    min: float
    max: float
    outlier: float  # max |w| / std(w)
    rel_error: float  # ||w - q(w)|| / ||w||
    activation: ActivationQuant | None = None


@dataclass
class EndToEnd:
    """One configuration measured on the test data."""

    accuracy: float
    output_rel_error: float  # ||f(x) - f_q(x)|| / ||f(x)|| over all test outputs


@dataclass
class QuantReport:
    """What :func:`quant_check` measured."""

    layers: list[LayerQuant] = field(default_factory=list)
    output_rel_error: float = 0.0  # INT8 weights, random inputs
    float_accuracy: float | None = None
    int8_accuracy: float | None = None  # INT8 weights
    #: with calibration: {"observer", "images", "batches"}; ``None`` when activations were not quantized.
    calibration: dict[str, Any] | None = None
    #: with test data: "float32", "w8" and, calibrated, "a8" and "w8a8".
    end_to_end: dict[str, EndToEnd] = field(default_factory=dict)

    @property
    def worst(self) -> LayerQuant | None:
        return max(self.layers, key=lambda r: r.rel_error, default=None)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [asdict(r) for r in self.layers], "output_rel_error": self.output_rel_error,
                "float_accuracy": self.float_accuracy, "int8_accuracy": self.int8_accuracy,
                "calibration": self.calibration,
                "end_to_end": {k: asdict(v) for k, v in self.end_to_end.items()}}


def fake_quantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric INT8 fake quantization (dimension 0), with PyTorch's own function."""
    w = weight.detach().float()
    amax = w.reshape(w.shape[0], -1).abs().amax(1)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, QMIN, QMAX).to(weight.dtype)


def quantized_copy(model: nn.Module) -> nn.Module:
    """A copy of a plain model with every filtering layer's weight fake-quantized."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for module in out.modules():
            if isinstance(module, FILTERING) and isinstance(getattr(module, "weight", None), torch.Tensor):
                module.weight.copy_(fake_quantize_weight(module.weight))
    return out


def filtering_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers quant-check quantizes: Conv/Linear modules with a weight of at least two values, in order."""
    found = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, FILTERING) and isinstance(weight, torch.Tensor) and weight.numel() >= 2:
            found.append((name, module))
    return found


def make_observer(kind: str, *, signed: bool) -> Any:
    """A per-tensor PyTorch observer of ``kind`` (see :data:`OBSERVERS`): signed symmetric qint8 [-127, 127] or
    unsigned affine quint8 [0, 255]."""
    from torch.ao.quantization.observer import HistogramObserver, MinMaxObserver

    if kind not in OBSERVERS:
        raise KfloError(f"--observer {kind} is not one of {', '.join(OBSERVERS)}")
    cls = MinMaxObserver if kind == "minmax" else HistogramObserver
    if signed:
        return cls(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, quant_min=QMIN, quant_max=QMAX)
    return cls(dtype=torch.quint8, qscheme=torch.per_tensor_affine, quant_min=0, quant_max=255)


def activation_params(observer: Any) -> ActivationQuant:
    """The grid an observer that has seen data chose (``calculate_qparams``), with the range it saw."""
    scale, zero = observer.calculate_qparams()
    return ActivationQuant(dtype="qint8" if observer.dtype == torch.qint8 else "quint8",
                           min=float(observer.min_val), max=float(observer.max_val), scale=float(scale.reshape(-1)[0]),
                           zero_point=int(zero.reshape(-1)[0]), quant_min=int(observer.quant_min),
                           quant_max=int(observer.quant_max))


def _first_tensor(args: tuple[Any, ...]) -> torch.Tensor | None:
    return args[0] if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point() else None


@torch.no_grad()
def calibrate_activations(model: nn.Module, batches: Iterable[Batch], observer: str = "minmax") -> dict[str, ActivationQuant]:
    """Observe the input of every filtering layer of ``model`` (eval mode) on ``batches`` and choose its grid.

    Each layer gets an unsigned and a signed observer that see the same inputs; the unsigned one's grid is used if
    no calibration input was negative. Layers that ``batches`` never reach are left out.
    """
    layers = filtering_layers(model)
    observers = {name: (make_observer(observer, signed=False), make_observer(observer, signed=True))
                 for name, _ in layers}

    def hook_for(pair: tuple[Any, Any]) -> Callable[..., None]:
        def observe(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = _first_tensor(args)
            if x is not None and x.numel():
                for obs in pair:
                    obs(x.detach().float())
        return observe

    was = model.training
    model.eval()
    handles = [module.register_forward_pre_hook(hook_for(observers[name])) for name, module in layers]
    seen = 0
    try:
        for images, _labels in batches:
            model(images)
            seen += 1
    finally:
        for handle in handles:
            handle.remove()
        model.train(was)
    if not seen:
        raise KfloError("no calibration batch to observe activations on; pass at least one batch")
    params = {}
    for name, (unsigned, signed) in observers.items():
        if not torch.isfinite(unsigned.min_val):
            continue
        params[name] = activation_params(unsigned if float(unsigned.min_val) >= 0 else signed)
    return params


def activation_quantized(model: nn.Module, params: Mapping[str, ActivationQuant], *, weights: bool = False) -> nn.Module:
    """A copy of ``model`` whose filtering layers fake-quantize their input with ``params`` (forward pre-hooks);
    ``weights=True`` also fake-quantizes their weights (W8A8)."""
    out = quantized_copy(model) if weights else copy.deepcopy(model)
    modules = dict(out.named_modules())
    for name, p in params.items():
        if name not in modules:
            raise KfloError(f"no layer named {name} in the model; calibrate this model, not another one")
        modules[name].register_forward_pre_hook(_quantizing_hook(p))
    return out


def _quantizing_hook(p: ActivationQuant) -> Callable[..., tuple[Any, ...] | None]:
    def quantize(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        x = _first_tensor(args)
        return None if x is None else (p.apply(x), *args[1:])
    return quantize


def calibration_batches(dataset: Any, batches: int = DEFAULT_CALIB_BATCHES, *, batch_size: int = CALIB_BATCH_SIZE,
                        seed: int = 0) -> list[Batch]:
    """``batches`` batches of ``batch_size`` distinct images of ``dataset`` (a training split), drawn at random with
    ``seed``: a calibration set that shares no image with the test split."""
    from torch.utils.data import DataLoader, Subset

    from .train.loader import iterate

    if batches < 1:
        raise KfloError(f"--calib-batches {batches} must be at least 1 (each batch is {batch_size} training images)")
    available = len(dataset)
    if batches * batch_size > available:
        raise KfloError(f"--calib-batches {batches} needs {batches * batch_size:,} training images but the training "
                        f"split has {available:,}; use at most {available // batch_size}")
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[: batches * batch_size]
    loader = DataLoader(Subset(dataset, order.tolist()), batch_size=batch_size, shuffle=False)
    return list(iterate(loader))


def _flat_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.float().reshape(-1)
    if isinstance(out, dict):
        return torch.cat([_flat_output(v) for v in out.values()])
    if isinstance(out, (list, tuple)):
        return torch.cat([_flat_output(v) for v in out])
    raise KfloError(f"quant-check compares tensor outputs; this model returns {type(out).__name__}")


def _input_error_hooks(model: nn.Module, params: Mapping[str, ActivationQuant]) -> tuple[list[Any], dict[str, list[float]]]:
    """Hooks that accumulate, per calibrated layer, ||x - q(x)||^2, ||x||^2, clipped values and values seen."""
    sums = {name: [0.0, 0.0, 0.0, 0.0] for name in params}
    handles = []
    for name, module in model.named_modules():
        if name not in params:
            continue

        def measure(_module: nn.Module, args: tuple[Any, ...], p: ActivationQuant = params[name],
                    acc: list[float] = sums[name]) -> None:
            x = _first_tensor(args)
            if x is None:
                return
            x = x.detach().double()
            acc[0] += float((x - p.apply(x.float()).double()).square().sum())
            acc[1] += float(x.square().sum())
            acc[2] += float(p.saturated(x).sum())
            acc[3] += x.numel()
        handles.append(module.register_forward_pre_hook(measure))
    return handles, sums


@torch.no_grad()
def _end_to_end(model: nn.Module, configs: Mapping[str, nn.Module], batches: Sequence[Batch]) -> dict[str, EndToEnd]:
    """Accuracy and output error of the float model and of every quantized configuration on ``batches``."""
    correct = {name: 0 for name in ("float32", *configs)}
    diff = {name: 0.0 for name in configs}
    total, norm = 0, 0.0
    for images, labels in batches:
        ref = model(images)
        correct["float32"] += int((ref.argmax(1) == labels).sum())
        flat = _flat_output(ref).double()
        norm += float(flat.square().sum())
        for name, quant in configs.items():
            out = quant(images)
            correct[name] += int((out.argmax(1) == labels).sum())
            diff[name] += float((flat - _flat_output(out).double()).square().sum())
        total += labels.shape[0]
    return {name: EndToEnd(accuracy=100.0 * correct[name] / max(1, total),
                           output_rel_error=(diff.get(name, 0.0) / norm) ** 0.5 if norm > 0 else 0.0)
            for name in correct}


@torch.no_grad()
def quant_check(model: nn.Module, input_size: Sequence[int], *, batch_size: int = 8, seed: int = 0,
                data: Iterable[Batch] | None = None, calibration: Iterable[Batch] | None = None,
                observer: str = "minmax") -> QuantReport:
    """Measure ``model`` (a plain, collapsed model) against its INT8 copies; see the module docstring.

    Args:
        model: the deployed model.
        input_size: one input's shape, for the random-input output error.
        batch_size: random inputs drawn for that error.
        seed: seeds the random inputs.
        data: labelled test batches: accuracy and output error of every configuration.
        calibration: batches the activation ranges are observed on (disjoint from ``data``); with it, activations
            are quantized too (A8, W8A8). Needs ``data``.
        observer: ``minmax`` or ``histogram`` (:data:`OBSERVERS`).
    """
    from .surgery import is_expanded

    if is_expanded(model):
        raise KfloError("quant-check measures the deployed model; collapse the expanded one first (kflo collapse)")
    if calibration is not None and data is None:
        raise KfloError("activation quantization is judged on test data; pass data= along with calibration=")
    if observer not in OBSERVERS:
        raise KfloError(f"--observer {observer} is not one of {', '.join(OBSERVERS)}")
    model = model.eval()
    report = QuantReport()
    for name, module in filtering_layers(model):
        w = module.weight.detach().double()
        q = fake_quantize_weight(module.weight).double()
        norm = float(w.norm())
        report.layers.append(LayerQuant(
            name=name, shape=list(w.shape), min=float(w.min()), max=float(w.max()),
            outlier=float(w.abs().max() / w.std()) if float(w.std()) > 0 else 0.0,
            rel_error=float((w - q).norm() / norm) if norm > 0 else 0.0))
    if not report.layers:
        raise KfloError("the model has no Conv or Linear layer to quantize")
    quant = quantized_copy(model).eval()
    generator = torch.Generator().manual_seed(seed)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = torch.randn((batch_size, *input_size), generator=generator).to(device)
    a, b = _flat_output(model(x)), _flat_output(quant(x))
    report.output_rel_error = float((a - b).norm() / a.norm()) if float(a.norm()) > 0 else 0.0
    if data is None:
        return report
    batches = list(data)
    configs: dict[str, nn.Module] = {"w8": quant}
    params: dict[str, ActivationQuant] = {}
    if calibration is not None:
        calib = list(calibration)
        params = calibrate_activations(model, calib, observer)
        report.calibration = {"observer": observer, "batches": len(calib),
                              "images": sum(int(images.shape[0]) for images, _ in calib)}
        configs["a8"] = activation_quantized(model, params).eval()
        configs["w8a8"] = activation_quantized(model, params, weights=True).eval()
    handles, sums = _input_error_hooks(model, params)
    try:
        report.end_to_end = _end_to_end(model, configs, batches)
    finally:
        for handle in handles:
            handle.remove()
    report.float_accuracy = report.end_to_end["float32"].accuracy
    report.int8_accuracy = report.end_to_end["w8"].accuracy
    for layer in report.layers:
        p = params.get(layer.name)
        if p is None:
            continue
        err, ref, clipped, seen = sums[layer.name]
        layer.activation = p
        p.rel_error = (err / ref) ** 0.5 if ref > 0 else 0.0
        p.clipped = clipped / seen if seen else 0.0
    return report


__all__ = ["ActivationQuant", "CALIB_BATCH_SIZE", "DEFAULT_CALIB_BATCHES", "EndToEnd", "LayerQuant", "OBSERVERS",
           "QuantReport", "activation_params", "activation_quantized", "calibrate_activations", "calibration_batches",
           "fake_quantize_weight", "filtering_layers", "make_observer", "quant_check", "quantized_copy"]
