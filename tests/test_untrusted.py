"""Untrusted input (docs/architecture.md, "Threat model"): a checkpoint's metadata cannot reach the model constructor
beyond kflo's allow-list nor allocate beyond its bounds, PyTorch pickles are named and converted without a full
unpickle, and the package itself contains no general unpickler."""

from __future__ import annotations

import ast
import json
import os
import pickle
import re
import socket
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import kflo_cli as kflo
from kflo_cli import checkpoint
from kflo_cli.cli import app
from kflo_cli.errors import KfloError
from kflo_cli.models import MODEL_OPTIONS, check_model_kwargs

from conftest import assert_user_error

runner = CliRunner()
EDITED = "the file was edited or does not come from kflo"
PACKAGE = Path(kflo.__file__).parent


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])



class _Evil:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def offline(monkeypatch):
    """No network and no torch.load: any attempt fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"kflo tried the network or torch.load: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


@pytest.fixture(scope="module")
def lenet_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("untrusted")
    exp, plain = d / "e.safetensors", d / "p.safetensors"
    model = kflo.expand(kflo.create_model("lenet5", num_classes=3), "kflo:depth=2,width=1")
    kflo.save(model, exp)
    kflo.save(kflo.collapse(model), plain)
    return exp, plain


def edited(src: Path, dst: Path, edit) -> Path:
    """A copy of ``src`` whose kflo metadata went through ``edit`` (in place)."""
    with safe_open(str(src), "pt") as f:
        meta = json.loads(f.metadata()["kflo"])
    edit(meta)
    save_file(load_file(str(src)), str(dst), metadata={"kflo": json.dumps(meta)})
    return dst


# -- model arguments from a file: the allow-list ----------------------------------------------------------------------

def test_a_pretrained_cfg_overlay_never_reaches_torch_load_nor_the_network(lenet_files, tmp_path, offline):
    _, plain = lenet_files
    marker = tmp_path / "pwned"
    evil = tmp_path / "local.pth"
    evil.write_bytes(pickle.dumps(_Evil(marker), protocol=2))
    overlay = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(evil)}}
    for kind, src in zip(("expanded", "plain"), lenet_files):
        bad = edited(src, tmp_path / f"{kind}.safetensors", lambda m: m["model_kwargs"].update(overlay))
        for args in (["collapse", bad, "-o", tmp_path / "y.safetensors"], ["inspect", bad],
                     ["verify-equivalence", bad, plain],
                     ["expand", "lenet5", "-r", "kflo", "--init-from", bad, "-o", tmp_path / "z.safetensors"]):
            assert_user_error(run(*args), f"{bad} asks the model constructor for 'pretrained', which kflo never writes", EDITED)
        with pytest.raises(KfloError, match="asks the model constructor for 'pretrained'"):
            kflo.load(bad)
    only_overlay = edited(plain, tmp_path / "o.safetensors",
                          lambda m: m["model_kwargs"].update(pretrained_cfg_overlay={"file": str(evil)}))
    assert_user_error(run("collapse", only_overlay, "-o", tmp_path / "y.safetensors"), "'pretrained_cfg_overlay'")
    assert not marker.exists() and not (tmp_path / "y.safetensors").exists()


@pytest.mark.parametrize("key", ["pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path",
                                 "cache_dir", "features_only", "device", "dtype", "weights", "weights_backbone",
                                 "__class__", "block_fn", "act_layer"])
def test_every_argument_outside_the_allow_list_is_refused(key):
    for model_id in ("timm:resnet18", "timm:lenet5", "torchvision:resnet18"):
        with pytest.raises(KfloError) as info:
            check_model_kwargs(model_id, {"num_classes": 3, key: "x"}, "f.safetensors")
        assert str(info.value) == (f"f.safetensors asks the model constructor for '{key}', which kflo never writes: "
                                   f"{EDITED}; re-create it with kflo expand/collapse")


@pytest.mark.parametrize("key,value", [
    ("num_classes", 0), ("num_classes", 1_000_001), ("num_classes", "ten"), ("num_classes", 10.0),
    ("num_classes", True), ("num_classes", None), ("num_classes", {"a": 1}), ("num_classes", [10]),
    ("in_chans", 0), ("in_chans", 4097), ("in_chans", -3),
    ("img_size", 0), ("img_size", 16385), ("img_size", [32, 32, 32]), ("img_size", [32, "32"]), ("img_size", [32]),
    ("img_size", {"h": 32}), ("img_size", 32.0),
    ("drop_rate", 1.0), ("drop_rate", -0.1), ("drop_rate", float("nan")), ("drop_rate", "0.1"), ("drop_rate", True),
])
def test_values_out_of_type_or_range_are_refused(lenet_files, tmp_path, key, value):
    _, plain = lenet_files
    bad = edited(plain, tmp_path / "bad.safetensors", lambda m: m["model_kwargs"].update({key: value}))
    r = run("collapse", bad, "-o", tmp_path / "y.safetensors")
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.output
    with pytest.raises(KfloError, match=f"gives the model constructor {key}=.*, but kflo writes .* there: {EDITED}"):
        kflo.load(bad)


def test_the_allow_list_is_per_model_family():
    assert set(MODEL_OPTIONS) == {"timm", "kflo zoo", "torchvision"}
    check_model_kwargs("timm:resnet18", {"num_classes": 3, "in_chans": 1, "drop_path_rate": 0.1}, "f")
    check_model_kwargs("timm:wrn28_2", {"drop_rate": 0.3, "img_size": [32, 48]}, "f")
    check_model_kwargs("torchvision:resnet18", {"num_classes": 3, "dropout": 0.5}, "f")
    with pytest.raises(KfloError, match="'drop_path_rate', which kflo never writes"):
        check_model_kwargs("timm:wrn28_2", {"drop_path_rate": 0.1}, "f")
    for key in ("in_chans", "img_size"):
        with pytest.raises(KfloError, match=f"'{key}', which kflo never writes"):
            check_model_kwargs("torchvision:resnet18", {key: 3}, "f")
    assert check_model_kwargs("timm:lenet5", {"img_size": [28, 30]}) == {"img_size": (28, 30)}


# -- the same allow-list for the Python API and the CLI: kflo never writes what it would refuse ----------------------

def test_the_api_refuses_arguments_it_could_not_load_back(tmp_path):
    with pytest.raises(KfloError, match=r"timm:lenet5 cannot be built with 'pretrained_cfg_overlay': kflo passes and "
                                        r"records only num_classes, in_chans, img_size, drop_rate for kflo zoo models"):
        kflo.create_model("lenet5", pretrained_cfg_overlay={"mean": (0.5,)})
    with pytest.raises(KfloError, match="only num_classes, in_chans, img_size, drop_rate, drop_path_rate for timm"):
        kflo.create_model("timm:test_resnet", features_only=True)
    with pytest.raises(KfloError, match="only num_classes, dropout, aux_loss for torchvision"):
        kflo.create_model("torchvision:resnet18", weights_backbone="DEFAULT")
    with pytest.raises(KfloError, match=r"--num-classes \(num_classes\) 0 is out of range; pass an integer from 1 to 1,000,000"):
        kflo.create_model("lenet5", num_classes=0)
    with pytest.raises(KfloError, match="drop_rate 1.5 is out of range; pass a number in"):
        kflo.create_model("wrn28_2", drop_rate=1.5)
    # a record attached by hand goes through the same checks when saved
    model = kflo.create_model("lenet5")
    kflo.set_record(model, kflo.ModelRecord("timm:lenet5", {"pretrained_cfg_overlay": {"file": "x"}}))
    with pytest.raises(KfloError, match="cannot be built with 'pretrained_cfg_overlay'"):
        kflo.save(model, tmp_path / "x.safetensors")
    kflo.set_record(model, kflo.ModelRecord("lenet5", {}))
    with pytest.raises(KfloError, match="does not start with timm: or torchvision:"):
        kflo.save(model, tmp_path / "x.safetensors")
    # an input size beyond what a checkpoint may hold is refused when writing, not when loading back
    with pytest.raises(KfloError, match="cannot write a checkpoint that kflo would refuse to load .input_size"):
        kflo.save(kflo.create_model("wrn28_2", img_size=16384), tmp_path / "x.safetensors")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args,fragment", [
    (["--in-chans", "0"], "--in-chans (in_chans) 0 is out of range; pass an integer from 1 to 4,096"),
    (["--in-chans", "5000"], "--in-chans (in_chans) 5000 is out of range; pass an integer from 1 to 4,096"),
    (["--num-classes", "0"], "--num-classes (num_classes) 0 is out of range; pass an integer from 1 to 1,000,000"),
    (["--num-classes", "-1"], "--num-classes (num_classes) -1 is out of range"),
    (["--num-classes", "1000001"], "from 1 to 1,000,000"),
])
def test_model_options_are_bounded_before_anything_is_built(tmp_path, monkeypatch, args, fragment):
    import kflo_cli.models as models

    def never(*a, **k):
        raise AssertionError("built a model from options out of range")

    monkeypatch.setattr(models, "_build", never)
    out = tmp_path / "m.safetensors"
    assert_user_error(run("expand", "resnet18", "--recipe", "kflo", *args, "-o", out), fragment)
    assert not out.exists()


@pytest.mark.parametrize("value", ["0", "16385"])
def test_train_img_size_and_in_chans_are_bounded(tmp_path, value):
    assert_user_error(run("train", "lenet5", "--img-size", value, "-o", tmp_path / "run"), "--img-size", "from 1 to 16384")
    assert_user_error(run("train", "lenet5", "--in-chans", "0", "-o", tmp_path / "run"), "--in-chans 0 must be from 1 to 4096")
    assert not (tmp_path / "run").exists()


def test_expand_output_loads_back_for_model_option_combinations(tmp_path):
    cli_cases = [("lenet5", ["--num-classes", "3", "--in-chans", "3"]),
                 ("smallnet_k3", ["--num-classes", "1", "--in-chans", "1"]),
                 ("timm:test_resnet", ["--num-classes", "7", "--in-chans", "2"]),
                 ("torchvision:squeezenet1_1", ["--num-classes", "2"])]
    for i, (name, args) in enumerate(cli_cases):
        exp, plain = tmp_path / f"e{i}.safetensors", tmp_path / f"p{i}.safetensors"
        r = run("expand", name, "--recipe", "weightnorm", *args, "-o", exp)
        assert r.exit_code == 0, r.output
        assert run("collapse", exp, "-o", plain).exit_code == 0
        for path in (exp, plain):
            meta = kflo.read_metadata(path)
            assert meta["model_kwargs"] == {args[j].lstrip("-").replace("-", "_"): int(args[j + 1])
                                            for j in range(0, len(args), 2)}
            kflo.load(path)
    api_cases = [("smallnet_k3", {"num_classes": 4, "in_chans": 2, "img_size": (24, 40)}),
                 ("wrn28_2", {"num_classes": 3, "drop_rate": 0.1}),
                 ("timm:test_vit", {"num_classes": 5, "img_size": 64, "drop_rate": 0.1, "drop_path_rate": 0.2}),
                 ("torchvision:squeezenet1_1", {"num_classes": 3, "dropout": 0.25})]
    for i, (name, kwargs) in enumerate(api_cases):
        model = kflo.expand_model(name, "weightnorm", model_kwargs=kwargs)
        path = tmp_path / f"a{i}.safetensors"
        kflo.save(model, path)
        again = kflo.load(path)
        assert kflo.record(again).model_kwargs == kflo.record(model).model_kwargs == kwargs
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_building_a_torchvision_detection_model_downloads_nothing(offline, tmp_path):
    model = kflo.create_model("torchvision:ssdlite320_mobilenet_v3_large", num_classes=3)
    assert kflo.record(model).model_kwargs == {"num_classes": 3}  # weights_backbone=None is not recorded
    kflo.save(model, tmp_path / "d.safetensors")
    kflo.load(tmp_path / "d.safetensors")


# -- the rest of the metadata: bounded before anything is allocated -----------------------------------------------------

@pytest.mark.parametrize("edit,fragment", [
    (lambda m: m.update(input_size=[1, 2, 3, 4, 5]), "input_size must have at most 4 entries of at most 16384"),
    (lambda m: m.update(input_size=[3, 16385, 16]), "input_size must have at most 4 entries"),
    (lambda m: m.update(input_size=[3, 16384, 16384]), "268,435,456 values in all"),
    (lambda m: m.update(input_size=[3, 0, 32]), "input_size must be a list of positive integers"),
    (lambda m: m.update(input_size=[3, 32.5, 32]), "input_size must be a list of positive integers"),
    (lambda m: m.update(dtype="int8"), "dtype must name a floating-point torch dtype"),
    (lambda m: m.update(dtype="__class__"), "dtype must name a floating-point torch dtype"),
    (lambda m: m.update(dtype=["float32"]), "dtype must name a floating-point torch dtype"),
    (lambda m: m.update(model_id="resnet18"), "model_id must be timm:NAME or torchvision:NAME"),
    (lambda m: m.update(model_id="hf-hub:timm/resnet18"), "model_id must be timm:NAME or torchvision:NAME"),
    (lambda m: m.update(model_id="timm:" + "x" * 2000), "model_id must be timm:NAME"),
    (lambda m: m.update(model_kwargs=[["num_classes", 3]]), "model_kwargs must be a table"),
    (lambda m: m["layers"][0].update(name="features.0\nerror: forged"), "layers must be a list"),
    (lambda m: m["layers"][0].pop("shape"), "layers must be a list"),
    (lambda m: m["recipes"][0].update(include="features.*"), "recipes must be a list"),
    (lambda m: m.update(selection={"include": [5]}), "selection must be a table"),
])
def test_other_metadata_is_checked_before_anything_is_built(lenet_files, tmp_path, monkeypatch, edit, fragment):
    exp, _ = lenet_files
    bad = edited(exp, tmp_path / "bad.safetensors", edit)

    def never(*a, **k):
        raise AssertionError("built a model from refused metadata")

    monkeypatch.setattr(checkpoint, "create_model", never)
    with pytest.raises(KfloError, match=re.escape(fragment)) as info:
        kflo.load(bad)
    assert "\n" not in str(info.value)
    assert_user_error(run("collapse", bad, "-o", tmp_path / "y.safetensors"), fragment)


def test_metadata_nested_deeper_than_the_json_parser_goes_is_one_error(tmp_path):
    path = tmp_path / "deep.safetensors"
    save_file({"a": torch.zeros(1)}, str(path), metadata={"kflo": "[" * 100_000 + "]" * 100_000})
    assert_user_error(run("inspect", path), "has corrupt kflo metadata")


def test_collapsed_from_and_a_resumed_state_block_are_checked(lenet_files, tmp_path):
    _, plain = lenet_files
    bad = edited(plain, tmp_path / "bad.safetensors", lambda m: m.update(collapsed_from="kflo"))
    with pytest.raises(KfloError, match="collapsed_from must be a list"):
        kflo.read_metadata(bad)
    # kflo train --resume rebuilds from the block in state.safetensors, which never passes through read_metadata
    meta = kflo.read_metadata(plain)
    meta["model_kwargs"]["pretrained"] = True
    with pytest.raises(KfloError, match="the checkpoint asks the model constructor for 'pretrained'"):
        checkpoint.rebuild(meta)


# -- PyTorch pickle checkpoints: named, and converted without a full unpickle -----------------------------------------

@pytest.fixture
def pth_files(tmp_path):
    state = kflo.create_model("lenet5", num_classes=3).state_dict()
    zipped, legacy = tmp_path / "zip.pth", tmp_path / "legacy.pt"
    torch.save(state, zipped)
    torch.save(state, legacy, _use_new_zipfile_serialization=False)
    assert zipped.read_bytes()[:4] == b"PK\x03\x04" and legacy.read_bytes()[:1] == b"\x80"
    return state, zipped, legacy


def test_a_pickle_checkpoint_where_safetensors_is_expected_is_named(pth_files, lenet_files, tmp_path):
    _, zipped, legacy = pth_files
    _, plain = lenet_files
    for path, what in ((zipped, "a torch.save zip archive"), (legacy, "a legacy torch.save pickle")):
        fragment = f"{path} is a PyTorch pickle checkpoint ({what}), not safetensors"
        for args in (["collapse", path, "-o", tmp_path / "y.safetensors"], ["inspect", path],
                     ["verify-equivalence", plain, path],
                     ["expand", "lenet5", "-r", "kflo", "--init-from", path, "-o", tmp_path / "y.safetensors"]):
            assert_user_error(run(*args), fragment, f"kflo convert {path} -o OUT.safetensors")
        with pytest.raises(KfloError, match="PyTorch pickle checkpoint"):
            checkpoint.load_tensors(path)
        with pytest.raises(KfloError, match="PyTorch pickle checkpoint"):
            kflo.load_plain_weights(kflo.create_model("lenet5", num_classes=3), path)


def test_pickle_kind_does_not_mistake_a_safetensors_file(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(3)}, str(path))
    assert checkpoint.pickle_kind(path) is None
    damaged = tmp_path / "d.safetensors"  # a header length of 0x0280 (first byte 0x80) that fits the file
    damaged.write_bytes(b"\x80\x02" + b"\x00" * 6 + b"{" * 700)
    assert checkpoint.pickle_kind(damaged) is None
    with pytest.raises(KfloError, match="not a readable safetensors file"):
        kflo.read_metadata(damaged)


def test_convert_zip_and_legacy_checkpoints(pth_files, tmp_path):
    state, zipped, legacy = pth_files
    for i, path in enumerate((zipped, legacy)):
        out = tmp_path / f"c{i}.safetensors"
        r = run("convert", path, "-o", out)
        assert r.exit_code == 0 and f"wrote {out} ({len(state)} tensors)" in r.stdout, r.output
        tensors = load_file(str(out))
        assert set(tensors) == set(state) and all(torch.equal(tensors[k], state[k]) for k in state)
        assert kflo.read_metadata(out) is None  # a plain weights file, for --init-from
        exp = tmp_path / f"e{i}.safetensors"
        assert run("expand", "lenet5", "--num-classes", "3", "-r", "weightnorm", "--init-from", out, "-o", exp).exit_code == 0
        collapsed = kflo.collapse(kflo.load(exp)).state_dict()
        assert all(torch.allclose(collapsed[k], state[k], atol=1e-5) for k in state)


def test_convert_with_model_checks_strict_loading_and_writes_kflo_metadata(pth_files, tmp_path):
    state, zipped, _ = pth_files
    wrapped = tmp_path / "wrapped.pth"
    torch.save({"epoch": 3, "state_dict": {k: v.double() for k, v in state.items()}}, wrapped)
    out = tmp_path / "m.safetensors"
    r = run("convert", wrapped, "-o", out, "--model", "lenet5", "--num-classes", "3")
    assert r.exit_code == 0 and "loads strictly into lenet5" in r.stdout, r.output
    meta = kflo.read_metadata(out)
    assert (meta["kind"], meta["model_id"], meta["model_kwargs"], meta["dtype"]) == ("plain", "timm:lenet5", {"num_classes": 3}, "float64")
    model = kflo.load(out)
    assert all(torch.equal(model.state_dict()[k], state[k].double()) for k in state)
    torch.save({"model": state, "optimizer": {"lr": 0.1}}, wrapped)
    assert run("convert", wrapped, "-o", out, "--model", "lenet5", "--num-classes", "3").exit_code == 0
    assert_user_error(run("convert", zipped, "-o", out, "--model", "lenet5", "--num-classes", "4"),
                      "it does not fit this model (wrong shape: classifier.")
    assert_user_error(run("convert", zipped, "-o", out, "--num-classes", "3"), "add --model NAME")
    assert_user_error(run("convert", zipped, "-o", out, "--model", "lenet5", "--in-chans", "0"),
                      "--in-chans (in_chans) 0 is out of range")


@pytest.mark.parametrize("payload,fragment", [
    ([torch.zeros(2)], "holds a list, not a state dict"),
    ({"weights": {"a": torch.zeros(2)}, "step": 3}, "holds a dict with keys ['weights', 'step'], not a state dict"),
    ({"a": torch.zeros(2), "note": "hi"}, "not a state dict"),
    ({}, "holds a dict with keys [], not a state dict"),
    ({"a": torch.zeros(3).to_sparse()}, "tensor 'a' is sparse or quantized"),
])
def test_convert_refuses_anything_but_a_state_dict(tmp_path, payload, fragment):
    path = tmp_path / "x.pth"
    torch.save(payload, path)
    assert_user_error(run("convert", path, "-o", tmp_path / "y.safetensors"), fragment)
    assert not (tmp_path / "y.safetensors").exists()


def test_convert_never_runs_a_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"
    payloads = {
        "zip.pth": lambda p: torch.save({"w": torch.zeros(2), "x": _Evil(marker)}, p),
        "legacy.pt": lambda p: torch.save({"x": _Evil(marker)}, p, _use_new_zipfile_serialization=False),
        "plain2.pkl": lambda p: p.write_bytes(pickle.dumps({"x": _Evil(marker)}, protocol=2)),
        "plain4.pkl": lambda p: p.write_bytes(pickle.dumps(_Evil(marker), protocol=4)),
        "protocol0.pkl": lambda p: p.write_bytes(f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()),
    }
    for name, write in payloads.items():
        path = tmp_path / name
        write(path)
        r = run("convert", path, "-o", tmp_path / "y.safetensors")
        assert r.exit_code == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, (name, r.output)
        assert "kflo never runs a full unpickle" in r.stderr or "is not a checkpoint torch.load can read" in r.stderr, r.stderr
        assert not marker.exists(), name
    assert "GLOBAL posix.system" in run("convert", tmp_path / "zip.pth", "-o", tmp_path / "y.safetensors").stderr
    assert not (tmp_path / "y.safetensors").exists()


def test_convert_refuses_bad_paths(pth_files, tmp_path):
    _, zipped, _ = pth_files
    assert_user_error(run("convert", zipped, "-o", zipped), "would overwrite the checkpoint it converts")
    assert_user_error(run("convert", tmp_path / "nope.pth", "-o", tmp_path / "y.safetensors"), "does not exist")
    garbage = tmp_path / "g.pth"
    garbage.write_bytes(b"hello, world")
    assert_user_error(run("convert", garbage, "-o", tmp_path / "y.safetensors"), "is not a checkpoint torch.load can read")


# -- data directories: parsed, never unpickled beyond arrays, allocation bounded by the files ------------------------

def test_a_gzip_idx_file_cannot_decompress_without_bound(tmp_path, monkeypatch):
    from kflo_cli.data import build_data, formats
    from tests.test_data import write_idx_set

    write_idx_set(tmp_path, n_train=30, side=6)
    monkeypatch.setattr(formats, "MAX_IDX_BYTES", 1000)  # the train images are 30 x 6 x 6 + 16 = 1096 bytes
    with pytest.raises(KfloError, match=r"train-images-idx3-ubyte.gz cannot be read as an idx file \(it decompresses "
                                        r"to more than 1,000 bytes\)"):
        build_data("mnist", data_dir=str(tmp_path))


class _ForgedArray:
    """Pickles as numpy's own array reconstruction, with a 1 GiB shape and no data."""

    def __reduce__(self):
        import numpy as np

        return (np.empty(0).__reduce__()[0], (np.ndarray, (1 << 30,), b"B"))


def test_a_cifar_batch_cannot_declare_arrays_larger_than_its_file(tmp_path):
    from kflo_cli.data import build_data
    from tests.test_data import write_cifar10

    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    batch.write_bytes(pickle.dumps({b"data": _ForgedArray(), b"labels": []}, protocol=2))
    with pytest.raises(KfloError, match=r"data_batch_2 is not a plain data pickle: refusing arrays of more than the "
                                        r"file's \d+ bytes"):
        build_data("cifar10", data_dir=str(tmp_path))
    cycle: list = []
    cycle.append(cycle)
    batch.write_bytes(pickle.dumps({b"data": cycle, b"labels": []}, protocol=2))
    with pytest.raises(KfloError, match="data_batch_2: .data. must be a uint8 array"):  # a cycle is walked once
        build_data("cifar10", data_dir=str(tmp_path))


def test_an_image_beyond_pillows_pixel_limit_is_one_error(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from kflo_cli.data import build_data
    from tests.test_data import write_png

    for split in ("train", "test"):
        write_png(tmp_path / split / "a" / "0.png", np.zeros((10, 14), dtype=np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # 140 pixels: over twice the limit, Pillow refuses to decode
    with pytest.raises(KfloError, match=r"cannot read image .*0.png .*decompression bomb"):
        build_data("imagefolder", data_dir=str(tmp_path))


# -- the package: no general unpickler anywhere -----------------------------------------------------------------------

def _dotted(node) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return node.id if isinstance(node, ast.Name) else "?"


def test_the_package_never_runs_a_general_unpickler():
    """Every call that unpickles, found in kflo_cli's syntax trees: only torch.load with weights_only=True (in
    checkpoint.read_torch_state_dict) and the CIFAR reader's RestrictedUnpickler remain."""
    forbidden = {"pickle.load", "pickle.loads", "pickle.Unpickler", "np.load", "numpy.load", "torch.jit.load",
                 "torch.serialization.load", "marshal.load", "marshal.loads", "dill.load", "dill.loads", "joblib.load",
                 "shelve.open", "pd.read_pickle", "pandas.read_pickle", "torch.hub.load", "torch.hub.load_state_dict_from_url"}
    torch_loads, unpicklers = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        where = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = _dotted(node.func)
                assert name not in forbidden, f"{where}:{node.lineno} calls {name}"
                keywords = {k.arg: k.value for k in node.keywords}
                assert not (isinstance(keywords.get("allow_pickle"), ast.Constant) and keywords["allow_pickle"].value), where
                if name == "torch.load":
                    only = keywords.get("weights_only")
                    assert isinstance(only, ast.Constant) and only.value is True, f"{where}:{node.lineno}"
                    torch_loads.append(where)
            elif isinstance(node, ast.ClassDef):
                unpicklers += [(where, node.name) for b in node.bases if _dotted(b) == "pickle.Unpickler"]
    assert torch_loads == ["checkpoint.py"]
    assert unpicklers == [("data/formats.py", "RestrictedUnpickler")]


@pytest.mark.parametrize("line", ['download = true', 'pretrained = true', 'data_dir = "/etc"',
                                  'teacher_checkpoint = "/tmp/x.safetensors"', 'teacher = "resnet18"'])
def test_a_recipe_file_cannot_reach_the_network_or_name_files(tmp_path, line):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'[[recipe]]\nname = "kflo"\n\n[train]\n{line}\n')
    r = CliRunner().invoke(app, ["train", "lenet5", "--recipe-file", str(recipe), "-o", str(tmp_path / "run")])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and line.split(" =")[0] in r.stderr, r.output
    assert not (tmp_path / "run").exists()
