"""kflo export: ONNX (dynamo exporter, checked with ONNX Runtime) and torch.export programs, verified before they are
kept (docs/deploy.md)."""

from __future__ import annotations

import builtins
import os

import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file
from typer.testing import CliRunner

import kflo_cli as kflo
from kflo_cli import export as export_mod
from kflo_cli.cli import app
from kflo_cli.errors import KfloError
from kflo_cli.export import DEFAULT_RTOL, export_model

from conftest import assert_user_error

onnx = pytest.importorskip("onnx", reason="the onnx extra (pip install 'kflo[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="the onnx extra (pip install 'kflo[onnx]')")
pytest.importorskip("onnxscript", reason="the onnx extra (pip install 'kflo[onnx]')")

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))



def only_file(folder, name: str) -> None:
    """``name`` exists in ``folder`` and nothing else but the inputs: no temporary folder is left behind."""
    left = [p.name for p in folder.iterdir() if p.name.startswith(f".{name}.")]
    assert not left, left


def run_onnx(path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("name,fmt,options", [
    ("lenet5", "onnx", {"dynamic_batch": True}),
    ("cifar_quick", "pt2", {"batch": 2}),
    ("smallnet_k7", "onnx", {"batch": 2}),
])
def test_zoo_models_export_and_verify(tmp_path, name, fmt, options):
    model = kflo.create_model(name, num_classes=10)
    out = tmp_path / f"{name}.{fmt}"
    report = export_model(model, out, fmt, **options)
    assert report.passed and report.written and out.is_file(), report.reason
    assert report.rel_error <= DEFAULT_RTOL[torch.float32] and [o.name for o in report.outputs] == ["output"]
    assert not report.collapsed
    only_file(tmp_path, out.name)
    size = kflo.models.default_input_size(model)
    batch = 5 if options.get("dynamic_batch") else options["batch"]
    x = torch.randn(batch, *size)
    with torch.no_grad():
        ref = model.eval()(x)
    got = run_onnx(out, x) if fmt == "onnx" else torch.export.load(str(out)).module()(x)
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-4
    if options.get("dynamic_batch"):
        assert report.batch_sizes == (1, 3)
        dim = onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim[0]
        assert dim.dim_param and not dim.dim_value  # a symbolic batch dimension


def test_cli_exports_a_plain_kflo_checkpoint_with_dynamic_batch_to_pt2(tmp_path):
    src = tmp_path / "p.safetensors"
    kflo.save(kflo.create_model("lenet5"), src)
    out = tmp_path / "p.pt2"
    r = run("export", str(src), "-o", str(out), "--dynamic-batch")  # the format from the suffix
    assert r.exit_code == 0, r.output
    assert "PASS" in r.output and "batch 1, 3" in r.output and "Nx1x28x28" in r.output
    module = torch.export.load(str(out)).module()
    assert module(torch.randn(7, 1, 28, 28)).shape == (7, 10)


@pytest.mark.parametrize("fmt", ["pt2", pytest.param("onnx", marks=pytest.mark.slow)])
@pytest.mark.parametrize("recipe", ["kflo", "expandnet-ck", "doconv", "acnet", "compander"])
def test_every_recipes_expanded_checkpoint_is_collapsed_then_exported(tmp_path, recipe, fmt):
    exp = tmp_path / "e.safetensors"
    r = run("expand", "lenet5", "-r", recipe, "-o", str(exp))
    assert r.exit_code == 0, r.output
    out = tmp_path / f"e.{fmt}"
    r = run("export", str(exp), "-o", str(out), "--format", fmt, "--batch", "2")
    assert r.exit_code == 0, r.output
    assert "collapsed, then exported" in r.output and "PASS" in r.output
    expanded = kflo.load(exp)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        ref = expanded(x)
    got = run_onnx(out, x) if fmt == "onnx" else torch.export.load(str(out)).module()(x)
    assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-4


def test_plain_safetensors_state_dict_needs_model_and_loads_strictly(tmp_path):
    net = kflo.create_model("cifar_quick", num_classes=10)
    sd = tmp_path / "sd.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(sd))
    out = tmp_path / "sd.pt2"
    assert_user_error(run("export", str(sd), "-o", str(out)), "pass --model NAME")
    assert_user_error(run("export", str(sd), "-o", str(out), "--model", "lenet5"), "does not fit this model")
    assert not out.exists()
    r = run("export", str(sd), "-o", str(out), "--model", "cifar_quick", "--num-classes", "10")
    assert r.exit_code == 0, r.output
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(torch.export.load(str(out)).module()(x), net.eval()(x), rtol=0, atol=1e-6)


def test_model_options_must_agree_with_a_kflo_checkpoint(tmp_path):
    src = tmp_path / "p.safetensors"
    kflo.save(kflo.create_model("lenet5"), src)
    assert_user_error(run("export", str(src), "-o", str(tmp_path / "x.pt2"), "--model", "cifar_quick"),
                      "contradict")


def test_float16(tmp_path):
    out = tmp_path / "h.onnx"
    report = export_model(kflo.create_model("lenet5"), out, "onnx", dtype=torch.float16)
    assert report.passed and report.rtol == DEFAULT_RTOL[torch.float16] and report.dtype == "float16"
    assert onnx.load(str(out)).graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert 0 < report.rel_error < 1e-2


@pytest.mark.slow
def test_timm_cnn_and_transformer(tmp_path):
    cnn = export_model(kflo.create_model("resnet18", num_classes=10), tmp_path / "r.onnx", "onnx", (3, 64, 64),
                       dynamic_batch=True)
    assert cnn.passed and cnn.written, cnn.reason
    vit = export_model(kflo.create_model("test_vit"), tmp_path / "v.onnx", "onnx")
    assert vit.passed and vit.written, vit.reason
    vit2 = export_model(kflo.create_model("test_vit"), tmp_path / "v.pt2", "pt2", dynamic_batch=True)
    assert vit2.passed and vit2.written, vit2.reason


@pytest.mark.slow
def test_torchvision_model(tmp_path):
    model = kflo.create_model("torchvision:mobilenet_v3_small", num_classes=10)
    for fmt in ("onnx", "pt2"):
        report = export_model(model, tmp_path / f"m.{fmt}", fmt, (3, 64, 64))
        assert report.passed and report.written, report.reason


def test_torchvision_model_pt2(tmp_path):
    report = export_model(kflo.create_model("torchvision:resnet18", num_classes=10), tmp_path / "t.pt2", "pt2",
                          (3, 32, 32), batch=2)
    assert report.passed and report.written, report.reason


def test_structured_outputs_are_verified_one_by_one(tmp_path):
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 2)

        def forward(self, x):
            return {"logits": self.a(x), "aux": self.b(x)}

    report = export_model(Two(), tmp_path / "two.pt2", "pt2", (4,))
    assert report.passed and [o.name for o in report.outputs] == ["logits", "aux"]


def test_a_failed_verification_exits_1_and_leaves_no_file(tmp_path, monkeypatch):
    src = tmp_path / "p.safetensors"
    kflo.save(kflo.create_model("lenet5"), src)
    out = tmp_path / "p.pt2"
    real = export_mod._run_pt2

    def corrupted(path, inputs):
        return [[t + 1.0 for t in outs] for outs in real(path, inputs)]

    monkeypatch.setattr(export_mod, "_run_pt2", corrupted)
    r = run("export", str(src), "-o", str(out))
    assert r.exit_code == 1, r.output
    assert "FAIL" in r.output and "nothing was written" in r.output and "beyond the tolerance" in r.output
    assert not out.exists()
    only_file(tmp_path, out.name)
    report = export_model(kflo.create_model("lenet5"), out, "pt2")
    assert not report.passed and not report.written and not out.exists()


def test_a_missing_extra_is_one_line_naming_it(tmp_path, monkeypatch):
    src = tmp_path / "p.safetensors"
    kflo.save(kflo.create_model("lenet5"), src)
    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name.split(".")[0] == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    out = tmp_path / "p.onnx"
    assert_user_error(run("export", str(src), "-o", str(out)), "pip install 'kflo[onnx]'")
    assert "onnxruntime" in run("export", str(src), "-o", str(out)).stderr
    assert not out.exists()


def test_bad_inputs_are_one_line(tmp_path):
    missing = tmp_path / "nope.safetensors"
    assert_user_error(run("export", str(missing), "-o", str(tmp_path / "x.onnx")), "does not exist")
    pickle_file = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(2)}, pickle_file)
    assert_user_error(run("export", str(pickle_file), "-o", str(tmp_path / "x.onnx")), "kflo convert")
    src = tmp_path / "p.safetensors"
    kflo.save(kflo.create_model("lenet5"), src)
    out = str(tmp_path / "x.onnx")
    assert_user_error(run("export", str(src), "-o", out, "--format", "tflite"), "use onnx or pt2")
    assert_user_error(run("export", str(src), "-o", out, "--dtype", "bfloat16"), "float32 or float16")
    assert_user_error(run("export", str(src), "-o", out, "--batch", "2", "--dynamic-batch"), "pass one of them")
    assert_user_error(run("export", str(src), "-o", out, "--opset", "3"), "--opset 3 is out of range")
    assert_user_error(run("export", str(src), "-o", out, "--rtol", "2"), "cannot be a verification tolerance")
    assert_user_error(run("export", str(src), "-o", out, "--input-size", "3,32,32"), "does not take inputs")
    assert_user_error(run("export", str(src), "-o", str(src)), "would overwrite")
    assert not os.path.exists(out)


def test_an_operator_the_exporter_cannot_handle_is_named(tmp_path):
    class Kth(nn.Module):
        def forward(self, x):
            return torch.kthvalue(x, 2, dim=-1)[0]

    with pytest.raises(KfloError) as info:
        export_model(Kth(), tmp_path / "k.onnx", "onnx", (3, 4))
    message = str(info.value)
    assert "aten.kthvalue" in message and "--debug" in message and "\n" not in message
    assert not (tmp_path / "k.onnx").exists()

