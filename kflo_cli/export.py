"""Deployment export: a plain (or collapsed) model as an ONNX file or a ``torch.export`` program, verified.

:func:`export_model` writes the file to a temporary path beside the target (:func:`~kflo_cli._atomic.atomic_path`),
runs that file (ONNX Runtime on the CPU for ONNX, ``torch.export.load`` for ``.pt2``) against the PyTorch model in
eval mode on random inputs, and renames it onto the target only when every output agrees within the tolerance; a
failed check leaves no file. An expanded model is collapsed first (in memory, float64 composition), so the
deployed graph is the original architecture. :func:`load_for_export` turns what ``kflo export`` is given (an
expanded or plain kflo checkpoint, or a plain safetensors state dict with ``--model``) into that model.

ONNX goes through ``torch.onnx.export(..., dynamo=True)``, the ``torch.export``-based exporter (PyTorch's default
since 2.9; the TorchScript exporter is deprecated). It needs ``onnxscript``; ``onnx`` and ``onnxruntime`` are for
reading and verifying the file. The three are the optional extra ``kflo[onnx]`` (docs/deploy.md).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from ._atomic import atomic_path
from .errors import KfloError, is_out_of_memory
from .models import default_input_size
from .surgery import collapse, copy_model, rewritten_layers
from .verify import MAX_INPUT_SIDE, MAX_VERIFY_BATCH, leaves

#: The formats ``kflo export`` writes, and the file suffix each is usually given.
FORMATS = {"onnx": ".onnx", "pt2": ".pt2"}
#: The dtypes an exported graph may compute in.
EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16}
#: Default tolerance on each output's ``max |error| / max |reference|``, by the exported dtype. The reference is
#: always the PyTorch model in float32. ONNX Runtime's float32 kernels (other summation orders, fused operators)
#: agree with PyTorch's to ~1e-6 relative on the zoo, timm and torchvision models; 1e-4 is the usual bound and
#: still catches any real mismatch (a wrong weight or a dropped operator is off by 1e-2 or more). A float16 graph
#: rounds every activation to 11 significant bits (~5e-4 per operation), measured ~1e-3 through ResNet-18 and a
#: ViT; 1e-2 leaves a margin for deeper models.
DEFAULT_RTOL = {torch.float32: 1e-4, torch.float16: 1e-2}
MAX_RTOL = 0.1
#: ONNX's protobuf limit: one .onnx file holds at most 2 GiB (kflo writes single files, no external data).
MAX_ONNX_BYTES = 2**31 - 2**24
#: The lowest opset requested from the exporter (its version converter goes down to 17 for these models).
MIN_OPSET = 17
EXTRA_HINT = "pip install 'kflo[onnx]'"


@dataclass
class OutputError:
    """One compared output tensor: its ``name`` (the ONNX output name / its path in the model's outputs), the
    largest absolute difference over all verification inputs, the reference's scale (largest absolute value)
    and ``rel = max_abs / scale``."""

    name: str
    max_abs: float
    scale: float
    rel: float


@dataclass
class ExportReport:
    """The outcome of :func:`export_model`.

    ``written`` is true only when the file was verified and renamed onto ``path``; when ``passed`` is false,
    nothing was written and ``reason`` says why.
    """

    path: str
    fmt: str
    input_size: tuple[int, ...]
    dtype: str
    dynamic_batch: bool
    batch_sizes: tuple[int, ...]
    rtol: float
    passed: bool
    written: bool
    outputs: list[OutputError] = field(default_factory=list)
    opset: int | None = None
    exporter: str = ""
    runtime: str = ""
    size_bytes: int = 0
    collapsed: bool = False
    reason: str = ""

    @property
    def rel_error(self) -> float:
        """The largest relative error over the outputs (infinite when nothing could be compared)."""
        return max((o.rel for o in self.outputs), default=float("inf"))

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in vars(self).items() if k != "outputs"}
        data["input_size"] = list(self.input_size)
        data["batch_sizes"] = list(self.batch_sizes)
        data["outputs"] = [vars(o) for o in self.outputs]
        data["rel_error"] = self.rel_error
        return data


class _VerificationFailed(Exception):
    """Raised inside the atomic write so that the temporary file is removed."""


def require_onnx() -> tuple[Any, Any]:
    """Import ``onnx`` and ``onnxruntime`` (and check ``onnxscript``, which the exporter needs), or raise one
    :class:`KfloError` naming the missing packages and the extra that installs them."""
    missing = []
    modules = {}
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            modules[name] = __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise KfloError(f"exporting ONNX needs the optional package{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(missing)}; install them with: {EXTRA_HINT} (or export --format pt2)")
    return modules["onnx"], modules["onnxruntime"]


def _first_line(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip()
    line = text.splitlines()[0].strip() if text else type(exc).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def _causes(exc: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


_OPERATOR = re.compile(r"OpOverload\(op='([\w.]+)'|target=torch\.ops\.([\w.]+?)(?:\.default)?\]")


def exporter_error(exc: BaseException, fmt: str) -> KfloError:
    """One sentence for an exporter failure: the operator it could not handle (when it names one) and the first
    line of the deepest error in the chain; ``--debug`` shows the exporter's full report."""
    chain = _causes(exc)
    operator = None
    for item in chain:
        match = _OPERATOR.search(re.sub(r"\x1b\[[0-9;]*m", "", str(item)))
        if match:
            operator = match.group(1) or match.group(2)
            break
    root = chain[-1]
    what = "the ONNX exporter (torch.onnx.export, dynamo)" if fmt == "onnx" else "torch.export"
    other = "; --format pt2 may still work" if fmt == "onnx" else ""
    if operator:
        return KfloError(f"{what} cannot handle operator {operator} ({_first_line(root)}){other}; rerun with --debug "
                         "for the exporter's full report")
    return KfloError(f"{what} failed ({type(root).__name__}: {_first_line(root)}){other}; rerun with --debug for the "
                     "exporter's full report")


@contextlib.contextmanager
def _quiet() -> Any:
    """Silence the exporters' progress lines, warnings and logged tracebacks (``--debug`` shows them: the CLI
    does not call this then)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def check_export_options(*, fmt: str, input_size: Sequence[int], batch: int, dynamic_batch: bool,
                         opset: int | None, dtype: torch.dtype, rtol: float | None) -> None:
    """Refuse options that cannot produce a verified file, with the allowed values in the message."""
    if fmt not in FORMATS:
        raise KfloError(f"unknown export format '{fmt}'; use {' or '.join(FORMATS)}")
    if dtype not in DEFAULT_RTOL:
        raise KfloError(f"cannot export in {str(dtype).replace('torch.', '')}; use {' or '.join(EXPORT_DTYPES)}")
    if not (isinstance(batch, int) and 1 <= batch <= MAX_VERIFY_BATCH):
        raise KfloError(f"--batch {batch} is out of range; use an integer from 1 to {MAX_VERIFY_BATCH}")
    if dynamic_batch and batch != 1:
        raise KfloError("--batch fixes the batch dimension and --dynamic-batch leaves it free; pass one of them")
    if not (1 <= len(input_size) <= 4 and all(isinstance(v, int) and 1 <= v <= MAX_INPUT_SIDE for v in input_size)
            and math.prod(input_size) <= 2**28):
        raise KfloError(f"--input-size {','.join(map(str, input_size))} is out of range; give C,H,W with each value "
                        f"from 1 to {MAX_INPUT_SIDE} and at most 2^28 values in all")
    if opset is not None:
        if fmt != "onnx":
            raise KfloError("--opset applies to ONNX only; drop it or use --format onnx")
        top = _newest_opset()
        if not (isinstance(opset, int) and MIN_OPSET <= opset <= top):
            raise KfloError(f"--opset {opset} is out of range; use an ONNX opset from {MIN_OPSET} to {top}")
    if rtol is not None and not (isinstance(rtol, (int, float)) and math.isfinite(rtol) and 0 < rtol <= MAX_RTOL):
        raise KfloError(f"--rtol {rtol} cannot be a verification tolerance; use a number > 0 and at most {MAX_RTOL:g} "
                        "(defaults: 1e-4 for float32, 1e-2 for float16)")


def _newest_opset() -> int:
    onnx, _ = require_onnx()
    return int(onnx.defs.onnx_opset_version())


def _output_name(path: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", path).strip("_.") or "output"


def export_model(
    model: nn.Module,
    path: str | os.PathLike,
    fmt: str = "onnx",
    input_size: Sequence[int] | None = None,
    *,
    batch: int = 1,
    dynamic_batch: bool = False,
    opset: int | None = None,
    dtype: torch.dtype = torch.float32,
    rtol: float | None = None,
    seed: int = 0,
    quiet: bool = True,
) -> ExportReport:
    """Export ``model`` (plain, or expanded: collapsed first) to ``path`` as ONNX or a ``torch.export`` program,
    verify the written file against the model and keep it only if it passes.

    Args:
        model: any ``nn.Module`` taking one tensor; kept unchanged (a copy is exported).
        path: the file to write (atomically).
        fmt: ``"onnx"`` (``torch.onnx.export`` with the dynamo exporter, run by ONNX Runtime on the CPU) or
            ``"pt2"`` (``torch.export.export`` + ``torch.export.save``, run with ``torch.export.load``).
        input_size: the input without the batch (C, H, W); default: the model's (:func:`default_input_size`).
        batch: the fixed batch size of the graph; ``dynamic_batch`` leaves it free instead (traced at 2,
            verified at batch sizes 1 and 3).
        opset: the ONNX opset (default: the exporter's).
        dtype: ``torch.float32`` or ``torch.float16``: the graph's weights, inputs and outputs.
        rtol: pass threshold on each output's ``max |error| / max |reference|`` (default :data:`DEFAULT_RTOL`);
            the reference is the PyTorch model in float32, eval mode, on the same inputs.
        seed: the random (standard normal) verification inputs.
        quiet: silence the exporters' progress lines and warnings.

    Returns:
        An :class:`ExportReport`; ``written`` is false (and no file exists) when the verification failed.

    >>> import kflo_cli as kflo
    >>> from kflo_cli.export import export_model
    >>> export_model(kflo.create_model("lenet5"), "/tmp/lenet5.pt2", "pt2").passed  # doctest: +SKIP
    True
    """
    size = tuple(int(v) for v in input_size) if input_size else tuple(default_input_size(model))
    check_export_options(fmt=fmt, input_size=size, batch=batch, dynamic_batch=dynamic_batch, opset=opset,
                         dtype=dtype, rtol=rtol)
    if fmt == "onnx":
        require_onnx()
    tol = DEFAULT_RTOL[dtype] if rtol is None else float(rtol)
    expanded = any(True for _ in rewritten_layers(model))
    plain = collapse(model, dtype=torch.float32) if expanded else copy_model(model)
    plain = plain.to(device="cpu", dtype=torch.float32).eval()
    for name, tensor in plain.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise KfloError(f"not exporting to {path}: tensor '{name}' holds NaN or infinite values (the model "
                            "diverged, or its checkpoint is damaged)")
    deployed = copy_model(plain).to(dtype).eval() if dtype != torch.float32 else plain
    if fmt == "onnx":
        nbytes = sum(t.numel() * t.element_size() for t in deployed.state_dict().values())
        if nbytes > MAX_ONNX_BYTES:
            raise KfloError(f"the model's {nbytes / 2**30:.1f} GiB of weights exceed what one ONNX file can hold "
                            "(2 GiB); export --format pt2 (or --dtype float16)")
    example_batch = 2 if dynamic_batch else batch
    gen = torch.Generator().manual_seed(seed)
    example = torch.randn((example_batch, *size), generator=gen).to(dtype)
    batches = (1, 3) if dynamic_batch else (batch, batch)
    inputs = [torch.randn((b, *size), generator=gen).to(dtype) for b in batches]
    with torch.no_grad():
        try:
            references = [plain(x.float()) for x in inputs]
        except RuntimeError as exc:
            if is_out_of_memory(exc):
                raise
            raise KfloError(f"the model does not take inputs of size {size} ({_first_line(exc)}); pass --input-size "
                            "with the size it expects: C,H,W for images") from None
    names = [_output_name(p) for p, _ in leaves(references[0])]
    if len(set(names)) != len(names):
        names = [f"output_{i}" for i in range(len(names))]
    report = ExportReport(str(path), fmt, size, str(dtype).replace("torch.", ""), dynamic_batch,
                          tuple(dict.fromkeys(batches)) if not dynamic_batch else batches, tol, False, False,
                          collapsed=expanded)
    quietly = _quiet() if quiet else contextlib.nullcontext()
    try:
        with atomic_path(path) as tmp:
            with quietly:
                if fmt == "onnx":
                    report.opset = _write_onnx(deployed, tmp, example, names, dynamic_batch, opset)
                    report.exporter = f"torch.onnx.export(dynamo=True), torch {torch.__version__}"
                    outs = _run_onnx(tmp, inputs)
                    import onnxruntime

                    report.runtime = f"onnxruntime {onnxruntime.__version__}, CPUExecutionProvider"
                else:
                    _write_pt2(deployed, tmp, example, dynamic_batch)
                    report.exporter = f"torch.export.export, torch {torch.__version__}"
                    outs = _run_pt2(tmp, inputs)
                    report.runtime = "torch.export.load(...).module(), CPU"
            report.size_bytes = tmp.stat().st_size
            _compare(report, references, outs, names)
            if not report.passed:
                raise _VerificationFailed
    except _VerificationFailed:
        return report
    report.written = True
    return report


def _dynamic(dynamic_batch: bool) -> Any:
    if not dynamic_batch:
        return None
    return ({0: torch.export.Dim("batch", min=1, max=2**20)},)


def _export_program(model: nn.Module, example: torch.Tensor, dynamic_batch: bool, fmt: str) -> Any:
    try:
        return torch.export.export(model, (example,), dynamic_shapes=_dynamic(dynamic_batch))
    except Exception as exc:  # noqa: BLE001  (every exporter failure becomes one sentence)
        if is_out_of_memory(exc):
            raise
        if dynamic_batch and "batch" in str(exc) and ("specialized" in str(exc) or "Constraints violated" in str(exc)):
            raise KfloError(f"this model's batch dimension cannot be dynamic ({_first_line(_causes(exc)[-1])}); export "
                            "with a fixed --batch N instead") from exc
        raise exporter_error(exc, fmt) from exc


def _write_pt2(model: nn.Module, path: Path, example: torch.Tensor, dynamic_batch: bool) -> None:
    program = _export_program(model, example, dynamic_batch, "pt2")
    torch.export.save(program, str(path))


def _write_onnx(model: nn.Module, path: Path, example: torch.Tensor, names: list[str], dynamic_batch: bool,
                opset: int | None) -> int:
    program = _export_program(model, example, dynamic_batch, "onnx")
    try:
        onnx_program = torch.onnx.export(program, (example,), None, dynamo=True, verbose=False, opset_version=opset,
                                         input_names=["input"], output_names=names, external_data=False,
                                         dynamic_shapes=_dynamic(dynamic_batch))
    except Exception as exc:  # noqa: BLE001
        if is_out_of_memory(exc):
            raise
        raise exporter_error(exc, "onnx") from exc
    used = next((int(o.version) for o in onnx_program.model_proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None and used != opset:
        raise KfloError(f"the exporter could not convert this model to opset {opset} (it produced opset {used}); "
                        f"choose --opset {used} or leave --opset out")
    onnx_program.save(str(path), external_data=False)
    return used


def _run_onnx(path: Path, inputs: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    _, ort = require_onnx()
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return [[torch.from_numpy(y) for y in session.run(None, {name: x.numpy()})] for x in inputs]
    except Exception as exc:  # noqa: BLE001  (onnxruntime's own exception types)
        if is_out_of_memory(exc):
            raise
        raise KfloError(f"ONNX Runtime cannot run the exported file ({_first_line(exc)}); try another --opset, "
                        "or --format pt2") from exc


def _run_pt2(path: Path, inputs: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    module = torch.export.load(str(path)).module()
    with torch.no_grad():
        return [[t for _, t in leaves(module(x))] for x in inputs]


def _compare(report: ExportReport, references: list[Any], outs: list[list[torch.Tensor]], names: list[str]) -> None:
    """Fold each output's error over the verification inputs into ``report`` and decide ``passed``."""
    acc: dict[str, OutputError] = {}
    for ref, got in zip(references, outs):
        expected = [t for _, t in leaves(ref)]
        if len(got) != len(expected):
            report.reason = (f"the exported file returns {len(got)} outputs but the model {len(expected)}; the "
                             "exporter changed the model's outputs")
            return
        for name, a, b in zip(names, expected, got):
            if tuple(a.shape) != tuple(b.shape):
                report.reason = (f"output '{name}' has shape {tuple(b.shape)} in the exported file but "
                                 f"{tuple(a.shape)} in the model")
                return
            if not a.is_floating_point():
                err = float((a.long() - b.long()).abs().max()) if a.numel() else 0.0
                scale = float(a.long().abs().max()) if a.numel() else 0.0
                rel_override = 0.0 if err == 0 else float("inf")
            else:
                da, db = a.double(), b.double()
                if not bool(torch.isfinite(db).all()):
                    report.reason = f"output '{name}' of the exported file holds NaN or infinite values"
                    acc[name] = OutputError(name, float("inf"), 0.0, float("inf"))
                    report.outputs = list(acc.values())
                    return
                err = float((da - db).abs().max()) if da.numel() else 0.0
                scale = float(da.abs().max()) if da.numel() else 0.0
                rel_override = None
            old = acc.get(name)
            max_abs = max(err, old.max_abs if old else 0.0)
            top = max(scale, old.scale if old else 0.0)
            rel = rel_override if rel_override is not None else (max_abs / top if top > 0 else max_abs)
            if old is not None and rel_override is not None:
                rel = max(rel, old.rel)
            acc[name] = OutputError(name, max_abs, top, rel)
    report.outputs = list(acc.values())
    if not report.outputs:
        report.reason = "the model returned no tensors, so nothing was verified"
        return
    worst = max(report.outputs, key=lambda o: o.rel)
    report.passed = bool(worst.rel <= report.rtol)
    if not report.passed:
        report.reason = (f"output '{worst.name}' differs from the PyTorch model by {worst.rel:.3e} of its scale, "
                         f"beyond the tolerance {report.rtol:.0e}")


def load_for_export(path: str | os.PathLike, *, model: str | None = None, num_classes: int | None = None,
                    in_chans: int | None = None) -> tuple[nn.Module, dict[str, Any] | None]:
    """The model ``kflo export`` exports, and the checkpoint's kflo metadata (``None`` for a plain state dict).

    A kflo checkpoint (expanded or plain) rebuilds its own architecture (``checkpoint.load``, untrusted metadata
    checked); ``--model`` and its options must then agree with it. A safetensors file without kflo metadata is a
    state dict loaded strictly into ``--model`` (with ``--num-classes`` / ``--in-chans``).
    """
    from .checkpoint import load, load_plain_weights, read_metadata
    from .models import create_model, resolve_model_id

    meta = read_metadata(path)  # a missing file, a directory, a pickle: one sentence each
    if meta is None:
        if model is None:
            raise KfloError(f"{path} is a safetensors file without kflo metadata, so its architecture is unknown; "
                            "pass --model NAME (and --num-classes / --in-chans if it was built with them)")
        net = create_model(model, num_classes=num_classes, in_chans=in_chans)
        load_plain_weights(net, path)
        return net.eval(), None
    if model is not None or num_classes is not None or in_chans is not None:
        recorded = meta.get("model_kwargs", {})
        given = {"num_classes": num_classes, "in_chans": in_chans}
        differs = (model is not None and resolve_model_id(model) != meta["model_id"]) or any(
            v is not None and recorded.get(k) != v for k, v in given.items())
        if differs:
            raise KfloError(f"{path} is a kflo checkpoint of {meta['model_id']} {recorded}, which --model / "
                            "--num-classes / --in-chans contradict; drop them (kflo checkpoints record their "
                            "architecture)")
    return load(path).eval(), meta


__all__ = ["DEFAULT_RTOL", "EXPORT_DTYPES", "ExportReport", "FORMATS", "OutputError", "check_export_options",
           "export_model", "exporter_error", "load_for_export", "require_onnx"]
