"""Numerical proof that a collapsed model computes what the expanded one does.

Outputs are compared leaf by leaf (a tensor, or the tensors in nested dicts, lists and tuples: a segmentation
model's ``{"out", "aux"}``): floating-point leaves by their relative error, integer and boolean leaves exactly.
Models whose outputs pass through data-dependent selection (torchvision's detection models: score thresholds,
top-k, NMS) are compared before the selection instead (:func:`probes_for`, ``docs/architecture.md``, "Verifying
detection models").
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

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
class LeafError:
    """One compared tensor: its ``path`` in the outputs (``"output"`` for a plain tensor, ``"aux"``,
    ``"head.cls_logits"``, ``"[0].labels"``), the largest absolute difference, the expanded model's scale there
    (its largest absolute value) and the relative error ``max_abs / scale`` over all trials. Integer and boolean
    tensors must match exactly (``exact``): any difference makes ``rel`` infinite."""

    path: str
    max_abs: float
    scale: float
    rel: float
    exact: bool = False


@dataclass
class EquivalenceReport:
    """The outcome of :func:`verify_equivalence`.

    ``rel_error`` is the largest relative error over the compared tensors (``leaves``), each relative to its own
    scale (the largest absolute value of the expanded model's tensor), over all trials; for a model with one output
    tensor, its largest absolute difference divided by its largest absolute value. ``max_abs_error`` and
    ``output_scale`` are the largest over all leaves. ``compared`` says what was compared: ``"outputs"``, or for a
    detection model the modules before its selection steps.
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
    leaves: list[LeafError] = field(default_factory=list)
    compared: str = "outputs"

    @property
    def worst(self) -> LeafError | None:
        """The leaf with the largest relative error (``None`` before anything was compared)."""
        return max(self.leaves, key=lambda leaf: leaf.rel, default=None)

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
            "leaves": [vars(leaf) for leaf in self.leaves],
            "compared": self.compared,
        }


def _flat(out: Any) -> torch.Tensor:
    """A layer's floating-point outputs as one float64 vector (for the per-layer table of a failed check)."""
    parts = [t.reshape(-1).double() for t in tensors_in(out) if t.is_floating_point()]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def leaves(out: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a model's output with its path: ``"output"`` for a tensor, ``"aux"`` or ``"head.cls_logits"``
    in dicts, ``"[0].boxes"`` in lists and tuples. Anything else in the outputs (``None``, numbers) is skipped."""
    if isinstance(out, torch.Tensor):
        yield path or "output", out
    elif isinstance(out, dict):
        for key, value in out.items():
            yield from leaves(value, f"{path}.{key}" if path else str(key))
    elif isinstance(out, (list, tuple)):
        for i, value in enumerate(out):
            yield from leaves(value, f"{path}[{i}]")


def _numeric(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _named(path: str) -> str:
    return "output" if path == "output" else f"output '{path}'"


def _compare(out_a: Any, out_b: Any, acc: dict[str, LeafError]) -> str:
    """Compare two outputs leaf by leaf, folding each leaf's error into ``acc`` (by path); return why they cannot
    be compared or contain non-finite values, else ``""``."""
    la, lb = dict(leaves(out_a)), dict(leaves(out_b))
    only_a, only_b = [p for p in la if p not in lb], [p for p in lb if p not in la]
    if only_a or only_b:
        side = (f"'{only_a[0]}' only in the expanded model's" if only_a else f"'{only_b[0]}' only in the collapsed model's")
        return (f"the models' outputs differ in structure ({len(la)} vs {len(lb)} tensors; {side}): they are not the "
                "same architecture")
    for path, ta in la.items():
        tb = lb[path]
        if ta.shape != tb.shape:
            return (f"the {_named(path)} has shape {tuple(ta.shape)} in the expanded model but {tuple(tb.shape)} in the "
                    "collapsed one: they are not the same architecture")
        if _numeric(ta) != _numeric(tb):
            return (f"the {_named(path)} is {str(ta.dtype).replace('torch.', '')} in the expanded model but "
                    f"{str(tb.dtype).replace('torch.', '')} in the collapsed one: they are not the same architecture")
        if _numeric(ta):
            for label, t in (("expanded", ta), ("collapsed", tb)):
                if not torch.isfinite(t).all():
                    return (f"the {label} model's {_named(path)} contains NaN or inf, so nothing can be compared "
                            "(diverged training?)")
            wide = torch.complex128 if ta.is_complex() else torch.float64
            da, db = ta.to(wide), tb.to(wide)
            err = (da - db).abs().max().item() if da.numel() else 0.0
            scale = da.abs().max().item() if da.numel() else 0.0
            exact = False
        else:  # integer and boolean outputs (labels, indices, masks) are not rounded: they must match exactly
            ia, ib = ta.long(), tb.long()
            err = (ia - ib).abs().max().item() if ia.numel() else 0.0
            scale = ia.abs().max().item() if ia.numel() else 0.0
            exact = True
        old = acc.get(path)
        max_abs, top = max(err, old.max_abs if old else 0.0), max(scale, old.scale if old else 0.0)
        if exact:
            rel = 0.0 if max_abs == 0 else float("inf")
        else:
            rel = max_abs / top if top > 0 else max_abs
        acc[path] = LeafError(path, max_abs, top, rel, exact)
    return ""


@dataclass(frozen=True)
class Probes:
    """What verification compares for a model whose outputs pass through data-dependent selection: the outputs of
    ``modules`` (dense, computed before any threshold, top-k or NMS), with the boxes each RoI pooling in ``pinned``
    receives in the collapsed model replaced by those the expanded model's received, so both second stages see
    the same regions. ``score_thresh`` (when not ``None``) replaces the RoI heads' detection threshold in both
    verification copies, so mask and keypoint heads always see regions."""

    modules: tuple[str, ...]
    pinned: tuple[str, ...] = ()
    score_thresh: float | None = None

    def describe(self) -> str:
        text = ", ".join(self.modules) + " (dense outputs before score thresholds, top-k and NMS"
        return text + ("; RoI heads fed the expanded model's boxes)" if self.pinned else ")")


def probes_for(model: nn.Module) -> Probes | None:
    """The probes of a torchvision detection model (``None`` for any other model: its outputs are compared).

    Two-stage models (Faster/Mask/Keypoint R-CNN) compare the backbone, the RPN head and the RoI heads' predictors;
    one-stage models (SSD, SSDlite, RetinaNet, FCOS) the backbone and the head. Every parameter of these models
    lies in or before a probe, so every rewritten layer is covered, while the boxes, labels and scores they return
    (whose number changes when a score crosses a threshold by a rounding error) are not compared."""
    try:
        from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
        from torchvision.models.detection.transform import GeneralizedRCNNTransform
        from torchvision.ops import MultiScaleRoIAlign
    except ImportError:  # pragma: no cover - torchvision is a dependency
        return None
    if not isinstance(getattr(model, "transform", None), GeneralizedRCNNTransform):
        return None
    names = dict(model.named_modules())
    if isinstance(model, GeneralizedRCNN):
        wanted = ("backbone", "rpn.head", "roi_heads.box_predictor", "roi_heads.mask_predictor",
                  "roi_heads.keypoint_predictor")
        pinned = tuple(n for n, m in names.items() if isinstance(m, MultiScaleRoIAlign))
        second = any(n in names for n in ("roi_heads.mask_predictor", "roi_heads.keypoint_predictor"))
        return Probes(tuple(n for n in wanted if n in names), pinned, 0.0 if second else None)
    return Probes(tuple(n for n in ("backbone", "head") if n in names))


def _boxes_argument(args: tuple, kwargs: dict) -> Any:
    return args[1] if len(args) > 1 else kwargs.get("boxes")


def _forward_pair(a: nn.Module, b: nn.Module, x: torch.Tensor, size: tuple[int, ...], probes: Probes | None) -> tuple[Any, Any]:
    """Both models' outputs for ``x``; for probed models, the probed modules' outputs (by module name), with the
    collapsed model's RoI boxes pinned to the expanded model's."""
    if probes is None:
        return _run(a, x, size), _run(b, x, size)
    seen: dict[str, dict[str, list]] = {"a": {}, "b": {}}
    boxes: dict[str, list] = {name: [] for name in probes.pinned}

    def keep(key: str, name: str):
        return lambda module, inputs, output: seen[key].setdefault(name, []).append(output)

    def record_boxes(name: str):
        def hook(module, args, kwargs):
            found = _boxes_argument(args, kwargs)
            boxes[name].append([t.clone() for t in found] if found is not None else None)
        return hook

    def replay_boxes(name: str):
        def hook(module, args, kwargs):
            if not boxes[name] or boxes[name][0] is None:
                return None
            pinned = boxes[name].pop(0)
            if len(args) > 1:
                return (args[0], pinned, *args[2:]), kwargs
            return args, {**kwargs, "boxes": pinned}
        return hook

    handles = []
    try:
        for key, model in (("a", a), ("b", b)):
            for name in probes.modules:
                handles.append(model.get_submodule(name).register_forward_hook(keep(key, name)))
        for name in probes.pinned:
            handles.append(a.get_submodule(name).register_forward_pre_hook(record_boxes(name), with_kwargs=True))
            handles.append(b.get_submodule(name).register_forward_pre_hook(replay_boxes(name), with_kwargs=True))
        _run(a, x, size)
        _run(b, x, size)
    finally:
        for handle in handles:
            handle.remove()
    out_a = {name: calls[0] if len(calls) == 1 else calls for name, calls in seen["a"].items()}
    out_b = {name: calls[0] if len(calls) == 1 else calls for name, calls in seen["b"].items()}
    return out_a, out_b


#: Bounds of the verification's options: a tolerance must be able to fail (finite, below 1: a relative error of 1
#: accepts an output of the wrong sign) and to pass (above 0); the inputs must fit memory and time.
MAX_RTOL = 0.1
MAX_VERIFY_BATCH = 4096
MAX_TRIALS = 1000
MAX_INPUT_SIDE = 16384


def check_options(*, batch_size: int = 4, trials: int = 3, rtol: float | None = None,
                  input_size: Sequence[int] | None = None, flag: str = "--rtol") -> None:
    """Refuse verification options that could pass vacuously or never finish, with the bound in the message."""
    if rtol is not None and not (isinstance(rtol, (int, float)) and math.isfinite(rtol) and 0 < rtol <= MAX_RTOL):
        raise KfloError(f"{flag} {rtol} cannot be a verification tolerance; use a number > 0 and at most {MAX_RTOL:g} "
                        "(the defaults are 1e-5 for float32 and 1e-10 for float64)")
    if not (isinstance(batch_size, int) and 1 <= batch_size <= MAX_VERIFY_BATCH):
        raise KfloError(f"--batch-size {batch_size} is out of range; use an integer from 1 to {MAX_VERIFY_BATCH}")
    if not (isinstance(trials, int) and 1 <= trials <= MAX_TRIALS):
        raise KfloError(f"--trials {trials} is out of range; use an integer from 1 to {MAX_TRIALS}")
    if input_size is not None and (not 1 <= len(input_size) <= 4
                                   or any(not 1 <= int(v) <= MAX_INPUT_SIDE for v in input_size)
                                   or math.prod(int(v) for v in input_size) > 2**28):
        raise KfloError(f"--input-size {','.join(map(str, input_size))} is out of range; give C,H,W with each value "
                        f"from 1 to {MAX_INPUT_SIDE} and at most 2^28 values in all")


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
    """Run both models in eval mode and float64 on the same random inputs and compare outputs, leaf by leaf
    (floating-point tensors by relative error at their own scale, integer tensors exactly; a detection model's
    tensors before its thresholds and NMS, :func:`probes_for`). Empty or all-zero outputs fail: they prove nothing.

    Args:
        expanded: the model a recipe rewrote (or any reference model).
        plain: the collapsed model.
        input_size: (C, H, W) or (features,); default: the model's configured input size.
        batch_size, trials, seed: the random inputs (standard normal).
        rtol: pass threshold on each floating-point output's ``max |error| / scale``; default from the stored
            dtypes (:data:`DEFAULT_RTOL`).

    >>> import kflo_cli as kflo
    >>> m = kflo.expand(kflo.create_model("lenet5"), "kflo")
    >>> kflo.verify_equivalence(m, kflo.collapse(m)).passed
    True
    """
    check_options(batch_size=batch_size, trials=trials, rtol=rtol, input_size=input_size)
    tol = default_rtol(expanded, plain) if rtol is None else float(rtol)
    size = tuple(input_size) if input_size else default_input_size(plain)
    a, b = copy_model(expanded).eval(), copy_model(plain).eval()
    device = next((p.device for p in b.parameters()), torch.device("cpu"))
    if not supports_float64(device):
        device = torch.device("cpu")  # float64 compute where the device has none
    a.to(device=device, dtype=torch.float64)
    b.to(device=device, dtype=torch.float64)
    probes = probes_for(a)
    compared = probes.describe() if probes else "outputs"
    if probes is not None and probes.score_thresh is not None:
        for model in (a, b):
            model.roi_heads.score_thresh = probes.score_thresh
    gen = torch.Generator().manual_seed(seed)
    acc: dict[str, LeafError] = {}
    inputs = []
    values = 0
    for _ in range(trials):
        x = torch.randn((batch_size, *size), generator=gen, dtype=torch.float64).to(device)
        inputs.append(x)
        ya, yb = _forward_pair(a, b, x, size, probes)
        reason = _compare(ya, yb, acc)
        if reason:
            bad = float("nan") if "NaN or inf" in reason else float("inf")  # non-finite values, or other shapes
            return EquivalenceReport(False, bad, bad, 0.0, tol, trials, size, reason=reason, leaves=list(acc.values()),
                                     compared=compared)
        values += sum(t.numel() for _, t in leaves(ya))
    rows = list(acc.values())
    max_abs = max((leaf.max_abs for leaf in rows), default=0.0)
    scale = max((leaf.scale for leaf in rows if not leaf.exact), default=0.0)
    rel = max((leaf.rel for leaf in rows), default=0.0)
    # Two empty outputs, or outputs that are all zero, prove nothing about the rewritten layers.
    trivial = values == 0 or max((leaf.scale for leaf in rows), default=0.0) == 0.0
    passed = bool(rel <= tol) and rel == rel and not trivial
    report = EquivalenceReport(passed, max_abs, rel, scale, tol, trials, size, leaves=rows, compared=compared)
    if values == 0:
        report.reason = (f"the models' {compared} hold no values, so nothing was compared; verify with inputs that "
                         "produce outputs (--input-size)")
    elif not rel <= tol:
        worst = report.worst
        if worst is not None and worst.exact:
            report.reason = f"the integer {_named(worst.path)} differs (integer outputs must match exactly)"
        elif worst is not None and len(rows) > 1:
            report.reason = (f"the {_named(worst.path)} differs by {worst.rel:.3e} of its scale, beyond the tolerance "
                             f"{tol:.0e}")
        report.layers = _layer_errors(a, b, inputs[0], size, probes)
    elif trivial:
        report.reason = (f"the expanded model's {compared} are all zero for these inputs, so comparing them proves "
                         "nothing; verify a model whose outputs depend on its weights (e.g. after training)")
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


def _layer_errors(a: nn.Module, b: nn.Module, x: torch.Tensor, size: tuple[int, ...],
                  probes: Probes | None) -> list[LayerError]:
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
        _forward_pair(a, b, x, size, probes)
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


__all__ = ["DEFAULT_RTOL", "EquivalenceReport", "LayerError", "LeafError", "Probes", "default_rtol", "leaves", "probes_for",
           "verify_equivalence"]
