"""Numerical proof that a collapsed model computes what the expanded one does."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn as nn

from .errors import KfloError, is_out_of_memory
from .models import default_input_size
from .reparam.dataflow import tensors_in
from .surgery import copy_model, model_dtype, rewritten_layers, supports_float64

#: Default relative tolerance (of the output scale) by the dtype the checkpoints store. float32 weights carry a
#: relative rounding error of 6e-8 each; through a deep network that grows to ~1e-6, so 1e-5 leaves a margin
#: while still catching any real mismatch (a wrong bias or a dropped branch is off by 1e-2 or more).
DEFAULT_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@dataclass
class LayerError:
    name: str
    max_abs: float
    rel: float


@dataclass
class EquivalenceReport:
    """The outcome of :func:`verify_equivalence`.

    ``rel_error`` is the largest absolute output difference divided by the output scale (the largest absolute
    output of the expanded model), over all trials.
    """

    passed: bool
    max_abs_error: float
    rel_error: float
    output_scale: float
    rtol: float
    trials: int
    input_size: tuple[int, ...]
    layers: list[LayerError] = field(default_factory=list)
    #: Why it failed when the errors alone do not say (outputs of other shapes, non-finite outputs); else "".
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "max_abs_error": self.max_abs_error,
            "rel_error": self.rel_error,
            "output_scale": self.output_scale,
            "rtol": self.rtol,
            "trials": self.trials,
            "input_size": list(self.input_size),
            "layers": [vars(layer) for layer in self.layers],
            "reason": self.reason,
        }


def _flat(out: Any) -> torch.Tensor:
    parts = [t.reshape(-1).double() for t in tensors_in(out) if t.is_floating_point()]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def default_rtol(*models: nn.Module) -> float:
    """The tolerance justified by the least precise of the models' stored dtypes."""
    return max(DEFAULT_RTOL.get(model_dtype(m), 1e-5) for m in models)


@torch.no_grad()
def verify_equivalence(
    expanded: nn.Module,
    plain: nn.Module,
    *,
    input_size: Sequence[int] | None = None,
    batch_size: int = 4,
    trials: int = 3,
    seed: int = 0,
    rtol: float | None = None,
) -> EquivalenceReport:
    """Run both models in eval mode and float64 on the same random inputs and compare outputs.

    Args:
        expanded: the model a recipe rewrote (or any reference model).
        plain: the collapsed model.
        input_size: (C, H, W) or (features,); default: the model's configured input size.
        batch_size, trials, seed: the random inputs (standard normal).
        rtol: pass threshold on ``max_abs_error / output_scale``; default from the stored dtypes
            (:data:`DEFAULT_RTOL`).

    >>> import kflo_cli as kflo
    >>> m = kflo.expand(kflo.create_model("lenet5"), "kflo")
    >>> kflo.verify_equivalence(m, kflo.collapse(m)).passed
    True
    """
    tol = default_rtol(expanded, plain) if rtol is None else float(rtol)
    size = tuple(input_size) if input_size else default_input_size(plain)
    a, b = copy_model(expanded).eval(), copy_model(plain).eval()
    device = next((p.device for p in b.parameters()), torch.device("cpu"))
    if not supports_float64(device):
        device = torch.device("cpu")  # float64 compute where the device has none
    a.to(device=device, dtype=torch.float64)
    b.to(device=device, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    max_abs, scale = 0.0, 0.0
    inputs = []
    for _ in range(trials):
        x = torch.randn((batch_size, *size), generator=gen, dtype=torch.float64).to(device)
        inputs.append(x)
        ya, yb = _flat(_run(a, x, size)), _flat(_run(b, x, size))
        if ya.shape != yb.shape:
            return EquivalenceReport(False, float("inf"), float("inf"), 0.0, tol, trials, size, reason=(
                f"the models' outputs differ in size ({ya.numel()} vs {yb.numel()} values): they are not the same architecture"))
        for label, y in (("expanded", ya), ("collapsed", yb)):
            if not torch.isfinite(y).all():
                return EquivalenceReport(False, float("nan"), float("nan"), 0.0, tol, trials, size, reason=(
                    f"the {label} model's outputs contain NaN or inf, so nothing can be compared (diverged training?)"))
        max_abs = max(max_abs, (ya - yb).abs().max().item() if ya.numel() else 0.0)
        scale = max(scale, ya.abs().max().item() if ya.numel() else 0.0)
    rel = max_abs / scale if scale > 0 else max_abs
    passed = bool(rel <= tol) and rel == rel
    report = EquivalenceReport(passed, max_abs, rel, scale, tol, trials, size)
    if not passed:
        report.layers = _layer_errors(a, b, inputs[0])
    return report


def _run(model: nn.Module, x: torch.Tensor, size: tuple[int, ...]) -> Any:
    """``model(x)``, with a clear error when the model cannot take inputs of this size."""
    try:
        return model(x)
    except RuntimeError as exc:
        if is_out_of_memory(exc):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise KfloError(f"the model does not take inputs of size {size} ({first}); pass --input-size with the size it "
                        "expects: C,H,W for images, C,T,H,W for video, C,L for sequences") from None


def _layer_errors(a: nn.Module, b: nn.Module, x: torch.Tensor) -> list[LayerError]:
    """Per rewritten layer: the error of its output in the plain model against the expanded one."""
    names = [name for name, _, _ in rewritten_layers(a)]
    outs: dict[str, dict[str, torch.Tensor]] = {"a": {}, "b": {}}
    handles = []
    for key, model in (("a", a), ("b", b)):
        for name in names:
            try:
                module = model.get_submodule(name)
            except AttributeError:
                continue
            handles.append(module.register_forward_hook(lambda m, i, o, key=key, name=name: outs[key].__setitem__(name, _flat(o))))
    try:
        a(x)
        b(x)
    finally:
        for h in handles:
            h.remove()
    rows = []
    for name in names:
        ya, yb = outs["a"].get(name), outs["b"].get(name)
        if ya is None or yb is None or ya.shape != yb.shape:
            continue
        err = (ya - yb).abs().max().item() if ya.numel() else 0.0
        sc = ya.abs().max().item() if ya.numel() else 0.0
        rows.append(LayerError(name, err, err / sc if sc > 0 else err))
    rows.sort(key=lambda r: r.rel, reverse=True)
    return rows


__all__ = ["DEFAULT_RTOL", "EquivalenceReport", "LayerError", "default_rtol", "verify_equivalence"]
