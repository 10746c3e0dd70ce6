"""Self-describing checkpoints: metadata, rebuild from file alone, strict loading into the original architecture."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import kflo_cli as kflo
from kflo_cli.checkpoint import read_metadata
from kflo_cli.errors import KfloError

from conftest import move_bn_stats, perturb


@pytest.fixture(scope="module")
def expanded_lenet(tmp_path_factory):
    torch.manual_seed(0)
    model = kflo.expand(kflo.create_model("lenet5", num_classes=7), "kflo:depth=3,width=2", exclude=["features.0"])
    perturb(model, 0.1)
    path = tmp_path_factory.mktemp("ckpt") / "lenet.safetensors"
    kflo.save(model, path)
    return model, path


def test_metadata_records_everything(expanded_lenet):
    model, path = expanded_lenet
    meta = read_metadata(path)
    assert meta["kind"] == "expanded"
    assert meta["model_id"] == "timm:lenet5"
    assert meta["model_kwargs"] == {"num_classes": 7}
    assert meta["recipes"] == [{"name": "kflo", "params": {"depth": 3, "width": 2.0, "mode": "auto", "decay": "composed"},
                                "include": [], "exclude": []}]
    assert meta["selection"] == {"include": [], "exclude": ["features.0"]}
    names = [layer["name"] for layer in meta["layers"]]
    assert "features.0" not in names and len(names) == 4
    assert meta["format_version"] == 1 and meta["kflo_version"] == kflo.__version__
    assert meta["input_size"] == [1, 28, 28]


def test_expanded_file_holds_only_trained_tensors(expanded_lenet):
    model, path = expanded_lenet
    tensors = load_file(str(path))
    assert set(tensors) == set(model.state_dict())
    assert not any(k.endswith(".weight") and "parametrizations" not in k and k.startswith("classifier") for k in tensors)
    assert sum(t.numel() for t in tensors.values()) == sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for b in model.buffers())


def test_load_rebuilds_from_the_file_alone(expanded_lenet):
    model, path = expanded_lenet
    again = kflo.load(path)
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(again(x), model.eval()(x))
    assert kflo.is_expanded(again)


def test_plain_roundtrip_loads_strictly_into_timm(tmp_path):
    torch.manual_seed(0)
    model = kflo.expand(kflo.create_model("resnet18", num_classes=10), "kflo:depth=2,width=1")
    move_bn_stats(model, (3, 32, 32))
    plain = kflo.collapse(model)
    path = tmp_path / "plain.safetensors"
    kflo.save(plain, path)
    meta = read_metadata(path)
    assert meta["kind"] == "plain" and meta["collapsed_from"][0]["name"] == "kflo"
    fresh = timm.create_model("resnet18", num_classes=10)
    fresh.load_state_dict(load_file(str(path)), strict=True)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(fresh.eval()(x), plain.eval()(x))
    loaded = kflo.load(path)
    assert not kflo.is_expanded(loaded)


def test_float64_checkpoint_keeps_its_dtype(tmp_path):
    model = kflo.expand(kflo.create_model("lenet5"), "kflo")
    plain = kflo.collapse(model, dtype=torch.float64)
    path = tmp_path / "p64.safetensors"
    kflo.save(plain, path)
    assert all(t.dtype == torch.float64 for t in load_file(str(path)).values() if t.is_floating_point())
    assert next(kflo.load(path).parameters()).dtype == torch.float64


def test_metadata_that_does_not_match_tensors_is_refused(expanded_lenet, tmp_path):
    _, path = expanded_lenet
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    dropped = dict(tensors)
    dropped.pop(next(k for k in tensors if "cascade" in k))
    bad = tmp_path / "bad.safetensors"
    save_file(dropped, str(bad), metadata=metadata)
    with pytest.raises(KfloError, match="metadata does not match its tensors .*missing"):
        kflo.load(bad)
    meta = json.loads(metadata["kflo"])
    meta["recipes"][0]["params"]["width"] = 3.0
    save_file(tensors, str(bad), metadata={"kflo": json.dumps(meta)})
    with pytest.raises(KfloError, match="wrong shape"):
        kflo.load(bad)


@pytest.mark.parametrize("content,fragment", [
    (b"not a safetensors file at all", "not a readable safetensors file"),
    (b"", "not a readable safetensors file"),
])
def test_garbage_files_are_refused(tmp_path, content, fragment):
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(KfloError, match=fragment):
        kflo.load(path)


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(KfloError, match="does not exist"):
        kflo.load(tmp_path / "nope.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"a": torch.zeros(2)}, str(foreign))
    with pytest.raises(KfloError, match="no kflo metadata"):
        kflo.load(foreign)


def test_save_needs_a_model_id(tmp_path):
    with pytest.raises(KfloError, match="kflo.create_model"):
        kflo.save(torch.nn.Linear(2, 2), tmp_path / "x.safetensors")


def test_failed_save_leaves_no_partial_file(tmp_path, monkeypatch):
    model = kflo.create_model("lenet5")
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"previous")

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("kflo_cli.checkpoint.save_file", boom)
    with pytest.raises(RuntimeError):
        kflo.save(model, target)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_modules_that_need_their_state_dict_version_load(tmp_path):
    """torchvision's MNASNet refuses a state dict without module versions, which safetensors files cannot hold;
    kflo's loaders attach the architecture's own versions (``kflo_cli.checkpoint.load_into``)."""
    torch.manual_seed(0)
    model = kflo.expand(kflo.create_model("torchvision:mnasnet0_5", num_classes=3), "kflo", include=["layers.0"])
    perturb(model, 0.05)
    move_bn_stats(model, (3, 32, 32))
    expanded, plain = tmp_path / "e.safetensors", tmp_path / "p.safetensors"
    kflo.save(model, expanded)
    fresh = kflo.create_model("torchvision:mnasnet0_5", num_classes=3)
    with pytest.raises(ValueError, match="version"):  # what a bare load_state_dict of the file does
        kflo.expand(fresh, "kflo", include=["layers.0"]).load_state_dict(load_file(str(expanded)), strict=True)
    kflo.save(kflo.collapse(kflo.load(expanded)), plain)
    again = kflo.load(plain)
    report = kflo.verify_equivalence(model, again, input_size=(3, 32, 32), trials=1)
    assert report.passed and report.output_scale > 1e-3, report


def test_written_files_get_the_mode_a_plain_open_would_give(tmp_path):
    import os

    from kflo_cli._atomic import write_text_atomic

    old = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "a.json", "{}")
        kflo.save(kflo.create_model("lenet5"), tmp_path / "b.safetensors")
    finally:
        os.umask(old)
    assert [oct((tmp_path / n).stat().st_mode & 0o777) for n in ("a.json", "b.safetensors")] == ["0o644", "0o644"]
