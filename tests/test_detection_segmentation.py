"""torchvision's segmentation and detection models: built without the network, expanded, collapsed and verified
(structured outputs leaf by leaf; detection before its thresholds and NMS), and ``--pretrained`` refused at once
when the weights are neither cached nor reachable."""

from __future__ import annotations

import inspect
import socket
import time
import urllib.request

import pytest
import torch
import torch.nn as nn
import torchvision.models as tvm
from safetensors.torch import save_file
from typer.testing import CliRunner

import kflo_cli as kflo
from kflo_cli import offline
from kflo_cli.cli import app
from kflo_cli.errors import KfloError
from kflo_cli.verify import probes_for

from conftest import perturb, scaled_timeout

#: float32 checkpoints, float64 verification: kflo's default tolerance (``verify.DEFAULT_RTOL``).
RTOL = 1e-5


@pytest.fixture
def no_network(monkeypatch):
    """No network, as on this project's machines, made certain: every way to reach it (name lookups, sockets,
    urllib, torch.hub downloads) fails as an unreachable network does; the attempts are listed."""
    attempts: list[str] = []

    def refuse(*args, **kwargs):
        attempts.append(repr(args[:2]))
        raise OSError(101, "Network is unreachable (blocked by the test)")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    return attempts


def _backbone_builders() -> list[str]:
    return [n for n in tvm.list_models()
            if "weights_backbone" in inspect.signature(tvm.get_model_builder(n)).parameters]


# ---------------------------------------------------------------------------------------------------------------
# building offline


@pytest.mark.parametrize("name", ["fcn_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large",
                                  "ssdlite320_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn",
                                  "retinanet_resnet50_fpn"])
def test_building_makes_no_network_call(name, no_network):
    model = kflo.create_model(f"torchvision:{name}", num_classes=3)
    assert no_network == []
    assert kflo.record(model).model_kwargs == {"num_classes": 3}  # weights_backbone is a build detail, not recorded
    frozen = any(type(m).__name__ == "FrozenBatchNorm2d" for m in model.modules())
    assert frozen == (name in offline.FROZEN_BN_BACKBONES)  # the published weights' architecture


def test_every_backbone_builder_gets_its_published_architecture(monkeypatch):
    """Built without weights_backbone, each model has the keys, shapes and module types of its published weights
    (FrozenBatchNorm2d backbones included), so a checkpoint of it loads strictly whether or not it was pretrained.

    Exception: torchvision's pretrained segmentation weights also hold an ``aux_classifier`` (their builders force
    ``aux_loss=True``), which kflo's allow-list of model arguments cannot ask for; it is left out of the comparison.
    """
    from torchvision.models._api import WeightsEnum

    names = _backbone_builders()
    assert len(names) >= 15  # torchvision 0.29: 6 segmentation + 12 detection builders
    aux = ("aux_classifier",)
    for name in names:
        with torch.device("meta"):
            ours = kflo.create_model(f"torchvision:{name}")
            with monkeypatch.context() as m:  # the pretrained architecture, without its download
                m.setattr(WeightsEnum, "get_state_dict", lambda self, *a, **k: {})
                m.setattr(nn.Module, "load_state_dict", lambda self, *a, **k: None)
                published = tvm.get_model(name, weights="DEFAULT")
        types = [(n, type(mod).__name__) for n, mod in ours.named_modules()]
        assert types == [(n, type(mod).__name__) for n, mod in published.named_modules() if not n.startswith(aux)], name
        shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
        assert shapes == {k: tuple(v.shape) for k, v in published.state_dict().items() if not k.startswith(aux)}, name
        assert (name in offline.FROZEN_BN_BACKBONES) == any(t == "FrozenBatchNorm2d" for _, t in types), name


# ---------------------------------------------------------------------------------------------------------------
# expand, collapse, verify


@torch.no_grad()
def perturb_statistics(model: nn.Module, seed: int = 3) -> None:
    """Move every BatchNorm's running statistics (and FrozenBatchNorm2d's frozen affine) away from their start."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        for key in ("running_mean", "running_var", "weight", "bias"):
            t = module._buffers.get(key)
            if t is None or not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=gen).to(t.dtype)
            t.mul_(torch.exp(0.2 * noise)) if key in ("running_var", "weight") else t.add_(0.1 * noise)


def train_detection(model: nn.Module, size: tuple[int, ...], steps: int = 1) -> None:
    """SGD steps on synthetic boxes: the expanded parameters and BatchNorm statistics move as in training."""
    gen = torch.Generator().manual_seed(5)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(steps):
        images = [torch.rand(size, generator=gen) for _ in range(2)]
        targets = [{"boxes": torch.tensor([[16.0, 24.0, 150.0, 200.0], [100.0, 60.0, 300.0, 310.0]]),
                    "labels": torch.tensor([1, 2])} for _ in images]
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def train_segmentation(model: nn.Module, size: tuple[int, ...], steps: int = 2) -> None:
    gen = torch.Generator().manual_seed(5)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        x = torch.randn((2, *size), generator=gen)
        out = model(x)
        loss = sum(v.square().mean() for v in out.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


CASES = [
    # (model, model kwargs, recipes, input size of the check, what is compared)
    ("ssdlite320_mobilenet_v3_large", {"num_classes": 4},
     [{"name": "kflo", "width": 1.0, "include": ["head.*", "backbone.features.1.*", "backbone.extra.*"]}],
     None, ["backbone", "head"]),
    ("fasterrcnn_mobilenet_v3_large_320_fpn", {"num_classes": 4},
     [{"name": "acnet", "include": ["backbone.body.1*"]},
      {"name": "kflo", "width": 1.0, "include": ["rpn.*", "roi_heads.box_head.fc7", "roi_heads.box_predictor.*"]}],
     None, ["backbone", "rpn.head", "roi_heads.box_predictor"]),
    ("deeplabv3_mobilenet_v3_large", {"num_classes": 3},
     [{"name": "doconv", "include": ["backbone.*"]}, {"name": "kflo", "width": 1.0, "include": ["classifier.*"]}],
     (3, 64, 64), ["out"]),
    ("lraspp_mobilenet_v3_large", {"num_classes": 3}, ["acnet"], (3, 64, 64), ["out"]),
]


@pytest.mark.parametrize("name, kwargs, recipes, size, compared", CASES, ids=[c[0] for c in CASES])
def test_expand_collapse_verify_after_training(name, kwargs, recipes, size, compared, tmp_path, no_network):
    torch.manual_seed(0)
    model = kflo.expand_model(f"torchvision:{name}", recipes, model_kwargs=kwargs)
    assert kflo.record(model).layers and no_network == []
    work = size or kflo.default_input_size(model)
    if probes_for(model) is not None:
        assert work == (3, 320, 320)  # the models' own working size, small enough for CPU tests
        train_detection(model, work)
    else:
        train_segmentation(model, work)
    perturb(model, scale=0.05)
    perturb_statistics(model)
    path = tmp_path / "plain.safetensors"
    plain = kflo.collapse_to_file(model, path)  # checks the original architecture's keys, builds it offline
    loaded = kflo.load(path)
    report = kflo.verify_equivalence(model, loaded, input_size=size, batch_size=1, trials=1)
    assert report.passed, (report.reason, report.worst)
    assert report.rel_error <= RTOL
    paths = [leaf.path for leaf in report.leaves]
    for part in compared:
        assert any(p == part or p.startswith((part + ".", part + "[")) for p in paths), (part, paths)
    assert all(leaf.scale > 0 for leaf in report.leaves if not leaf.exact)  # nothing compared is trivially zero
    assert not kflo.is_expanded(plain) and no_network == []


def test_segmentation_with_an_auxiliary_head_is_verified_on_both_outputs(no_network):
    """A model built by hand (torchvision's ``aux_loss=True``, outside kflo's allow-list): ``{"out", "aux"}`` are
    compared separately, each at its own scale."""
    torch.manual_seed(0)
    model = tvm.get_model("fcn_resnet50", weights=None, weights_backbone=None, num_classes=3, aux_loss=True)
    model = kflo.expand(model, [{"name": "kflo", "width": 1.0, "include": ["classifier.*", "aux_classifier.*"]},
                                {"name": "doconv", "include": ["backbone.layer4.0.*"]}])
    train_segmentation(model, (3, 32, 32), steps=1)
    perturb(model, scale=0.05)
    perturb_statistics(model)
    report = kflo.verify_equivalence(model, kflo.collapse(model), input_size=(3, 32, 32), batch_size=1, trials=1)
    assert report.passed, (report.reason, report.worst)
    assert {leaf.path for leaf in report.leaves} == {"out", "aux"} and all(leaf.scale > 0 for leaf in report.leaves)


@pytest.fixture(scope="module")
def detector():
    """A trained-looking expanded SSDlite (head and extra layers rewritten) and its collapse."""
    torch.manual_seed(1)
    model = kflo.expand_model("torchvision:ssdlite320_mobilenet_v3_large",
                              {"name": "kflo", "width": 1.0, "include": ["head.*"]}, model_kwargs={"num_classes": 3})
    perturb(model, scale=0.05)
    perturb_statistics(model)
    return model.eval(), kflo.collapse(model)


def test_detection_is_compared_before_selection_and_a_wrong_weight_is_named(detector):
    model, plain = detector
    probes = probes_for(model)
    assert probes is not None and probes.modules == ("backbone", "head")
    # a rounding-size change in the collapsed model passes ...
    tiny = kflo.collapse(model)
    with torch.no_grad():
        w = tiny.get_submodule("head.classification_head.module_list.0.1").weight
        w.mul_(1 + 1e-9)
    assert kflo.verify_equivalence(model, tiny, batch_size=1, trials=1).passed
    # ... a real one fails and names the output it reaches first
    with torch.no_grad():
        w.mul_(1.01)
    report = kflo.verify_equivalence(model, tiny, batch_size=1, trials=1)
    assert not report.passed and report.worst.path.startswith("head.cls_logits"), report.worst
    assert "head.cls_logits" in report.reason and report.layers


def test_two_stage_detector_pins_its_regions():
    """Faster R-CNN's RoI heads see the expanded model's proposals in both models, so their outputs have one shape
    even when the collapsed model's own proposals would differ."""
    torch.manual_seed(2)
    model = kflo.create_model("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=3).eval()
    other = kflo.create_model("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=3).eval()  # other weights
    probes = probes_for(model)
    assert probes.pinned == ("roi_heads.box_roi_pool",)
    report = kflo.verify_equivalence(model, other, batch_size=1, trials=1)
    assert not report.passed and "differs" in report.reason  # compared value by value, not "other shapes"
    shapes = {leaf.path for leaf in report.leaves}
    assert any(p.startswith("roi_heads.box_predictor") for p in shapes)


class _Fixed(nn.Module):
    def __init__(self, out):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.out = out

    def forward(self, x):
        return self.out


def test_structured_outputs_are_compared_leaf_by_leaf():
    labels = {"boxes": torch.ones(2, 4), "labels": torch.tensor([1, 2])}
    same = kflo.verify_equivalence(_Fixed([labels]), _Fixed([dict(labels)]), input_size=(2,), trials=1)
    assert same.passed and {leaf.path for leaf in same.leaves} == {"[0].boxes", "[0].labels"}
    wrong = kflo.verify_equivalence(_Fixed([labels]), _Fixed([{**labels, "labels": torch.tensor([1, 3])}]),
                                    input_size=(2,), trials=1)
    assert not wrong.passed and "'[0].labels'" in wrong.reason and "exactly" in wrong.reason
    fewer = kflo.verify_equivalence(_Fixed([labels]), _Fixed([{"boxes": torch.ones(1, 4), "labels": torch.tensor([1])}]),
                                    input_size=(2,), trials=1)
    assert not fewer.passed and "shape" in fewer.reason
    aux = kflo.verify_equivalence(_Fixed({"out": torch.ones(3), "aux": torch.full((3,), 1e-3)}),
                                  _Fixed({"out": torch.ones(3), "aux": torch.full((3,), 1.1e-3)}), input_size=(2,), trials=1)
    assert not aux.passed and aux.worst.path == "aux"  # a small output is judged at its own scale


def test_empty_or_all_zero_outputs_never_pass():
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    report = kflo.verify_equivalence(_Fixed(empty), _Fixed(empty), input_size=(2,), trials=1)
    assert not report.passed and "nothing was compared" in report.reason
    zeros = {"out": torch.zeros(2, 3)}
    report = kflo.verify_equivalence(_Fixed(zeros), _Fixed(dict(zeros)), input_size=(2,), trials=1)
    assert not report.passed and "all zero" in report.reason


def test_cli_verifies_a_detection_checkpoint(detector, tmp_path):
    model, plain = detector
    kflo.save(model, tmp_path / "e.safetensors")
    kflo.save(plain, tmp_path / "p.safetensors")
    result = CliRunner().invoke(app, ["verify-equivalence", str(tmp_path / "e.safetensors"), str(tmp_path / "p.safetensors"),
                                      "--batch-size", "1", "--trials", "1"])
    assert result.exit_code == 0, result.output
    assert "input (3, 320, 320)" in result.output and "compared: backbone, head" in result.output
    assert "PASS" in result.output


# ---------------------------------------------------------------------------------------------------------------
# --pretrained without network


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path


@pytest.mark.parametrize("model", ["timm:test_resnet", "torchvision:resnet18"])
def test_pretrained_offline_is_refused_at_once_in_one_line(model, empty_caches, no_network):
    start = time.monotonic()
    result = CliRunner().invoke(app, ["expand", model, "--recipe", "kflo", "--pretrained", "--dry-run"])
    elapsed = time.monotonic() - start
    assert result.exit_code == 2, result.output
    err = result.stderr
    assert err.count("\n") == 1 and err.startswith("error: pretrained weights for"), err
    assert "not cached" in err and "unreachable" in err and "--init-from" in err and "kflo convert" in err
    assert "Retry" not in result.output and "Traceback" not in result.output
    assert elapsed < scaled_timeout(10), elapsed


def test_the_reachability_check_gives_up_within_its_timeout(monkeypatch):
    def hang(*args, **kwargs):
        time.sleep(30)

    monkeypatch.setattr(urllib.request, "urlopen", hang)
    start = time.monotonic()
    assert offline.reachable("example.invalid", timeout=0.5) is False
    assert time.monotonic() - start < scaled_timeout(3)


def test_cached_hugging_face_weights_load_offline(empty_caches, no_network, monkeypatch):
    """Weights already in the Hugging Face cache load with the hub client offline: no request, no retries."""
    import timm

    reference = timm.create_model("test_resnet")
    snapshot = empty_caches / "hf" / "models--timm--test_resnet.r160_in1k" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0" * 40)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(snapshot / "model.safetensors"))
    model = kflo.create_model("timm:test_resnet", pretrained=True)
    assert all(a.startswith("(<urllib.request.Request") for a in no_network)  # only kflo's one reachability check
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())


def test_pretrained_detection_offline_is_one_sentence(empty_caches, no_network):
    """The detection builders (whose backbone download kflo skips) refuse the same way."""
    with pytest.raises(KfloError, match="not cached"):
        kflo.create_model("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", pretrained=True)


def test_pretrained_segmentation_records_the_auxiliary_head_its_weights_bring(monkeypatch):
    # torchvision gives fcn/deeplabv3 with published weights an aux head (aux_loss=True); the record must say so, or
    # a checkpoint of that model would rebuild without the head and refuse its own keys
    import torchvision.models as tvm

    import kflo_cli.models as models

    def offline_pretrained(source, bare, kw, pretrained):
        return tvm.get_model(bare, weights=None, weights_backbone=None, aux_loss=True, **kw)

    monkeypatch.setattr(models, "_build", offline_pretrained)
    model = models.create_model("fcn_resnet50", num_classes=3, pretrained=True)
    monkeypatch.undo()
    assert kflo.record(model).model_kwargs == {"num_classes": 3, "aux_loss": True}
    rebuilt = models.create_model("fcn_resnet50", **kflo.record(model).model_kwargs)
    assert rebuilt.state_dict().keys() == model.state_dict().keys()
