"""INT8 readiness of a deployed model (``kflo quant-check``): does over-parameterized training leave weights that
quantize worse than vanilla training does?

Every filtering layer's weight (Conv1d/2d/3d, Linear) is fake-quantized per output channel, symmetric INT8
(PyTorch's ``torch.fake_quantize_per_channel_affine``: scale = max|w| / 127 per channel, zero point 0, range
[-127, 127]), the usual post-training weight quantization of deployment toolchains. Reported per layer: the weight
range, an outlier measure (max |w| / std of w: the larger, the coarser the grid is for the bulk of the weights) and
the relative quantization error ||w - q(w)|| / ||w||; end to end, the relative error of the model's output on random
inputs (eval mode), and with data the test accuracy with float and with INT8 weights.

Activations are not quantized here (their ranges depend on the calibration data and the runtime's fusion); the
weights are what a reparameterization changes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn

from .errors import KfloError

FILTERING = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
QMIN, QMAX = -127, 127


@dataclass
class LayerQuant:
    """One layer's weight statistics and INT8 error."""

    name: str
    shape: list[int]
    min: float
    max: float
    outlier: float  # max |w| / std(w)
    rel_error: float  # ||w - q(w)|| / ||w||


@dataclass
class QuantReport:
    """What :func:`quant_check` measured."""

    layers: list[LayerQuant] = field(default_factory=list)
    output_rel_error: float = 0.0
    float_accuracy: float | None = None
    int8_accuracy: float | None = None

    @property
    def worst(self) -> LayerQuant | None:
        return max(self.layers, key=lambda r: r.rel_error, default=None)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": [asdict(r) for r in self.layers], "output_rel_error": self.output_rel_error,
                "float_accuracy": self.float_accuracy, "int8_accuracy": self.int8_accuracy}


def fake_quantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """Per-output-channel symmetric INT8 fake quantization (dimension 0), with PyTorch's own function."""
    w = weight.detach().float()
    amax = w.reshape(w.shape[0], -1).abs().amax(1)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, QMIN, QMAX).to(weight.dtype)


def quantized_copy(model: nn.Module) -> nn.Module:
    """A copy of a plain model with every filtering layer's weight fake-quantized."""
    import copy

    out = copy.deepcopy(model)
    with torch.no_grad():
        for module in out.modules():
            if isinstance(module, FILTERING) and isinstance(getattr(module, "weight", None), torch.Tensor):
                module.weight.copy_(fake_quantize_weight(module.weight))
    return out


def _accuracy(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    correct = total = 0
    with torch.no_grad():
        for images, labels in batches:
            correct += int((model(images).argmax(1) == labels).sum())
            total += labels.shape[0]
    return 100.0 * correct / max(1, total)


def _flat_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.float().reshape(-1)
    if isinstance(out, dict):
        return torch.cat([_flat_output(v) for v in out.values()])
    if isinstance(out, (list, tuple)):
        return torch.cat([_flat_output(v) for v in out])
    raise KfloError(f"quant-check compares tensor outputs; this model returns {type(out).__name__}")


@torch.no_grad()
def quant_check(model: nn.Module, input_size: Sequence[int], *, batch_size: int = 8, seed: int = 0,
                data: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None) -> QuantReport:
    """Measure ``model`` (a plain, collapsed model) against its INT8-weight copy; see the module docstring."""
    from .surgery import is_expanded

    if is_expanded(model):
        raise KfloError("quant-check measures the deployed model; collapse the expanded one first (kflo collapse)")
    model = model.eval()
    report = QuantReport()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, FILTERING) or not isinstance(weight, torch.Tensor) or weight.numel() < 2:
            continue
        w = weight.detach().double()
        q = fake_quantize_weight(weight).double()
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
    if data is not None:
        batches = list(data)
        report.float_accuracy = _accuracy(model, batches)
        report.int8_accuracy = _accuracy(quant, batches)
    return report


__all__ = ["LayerQuant", "QuantReport", "fake_quantize_weight", "quant_check", "quantized_copy"]
