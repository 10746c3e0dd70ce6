"""Registry-driven sweep: KFLO expand -> train-like perturbation -> collapse -> verify on real timm/torchvision models.

Each model is moved away from its initial state (parameters perturbed, BatchNorm statistics updated in train mode)
before and after expansion, so the equivalence checks compare non-trivial functions in eval mode.
"""

from __future__ import annotations

import pytest
import torch

import kflo_cli as kflo

from conftest import move_bn_stats, perturb, rel_err

# (model, kwargs, input size, recipe). Small inputs and widths keep the sweep within CI's budget on 2 cores.
TIMM_TEST_MODELS = [
    "test_resnet", "test_efficientnet", "test_efficientnet_gn", "test_convnext", "test_byobnet", "test_nfnet",
    "test_vit", "test_vit_relpos", "test_coatnet", "test_maxvit",
]
CASES = [
    *[(f"timm:{m}", {"num_classes": 7}, (3, 64, 64) if "vit" not in m and "coat" not in m and "maxvit" not in m else None, "kflo:depth=2,width=2") for m in TIMM_TEST_MODELS],
    ("timm:resnet18", {"num_classes": 10}, (3, 32, 32), "kflo:depth=2,width=4"),
    ("timm:efficientnet_b0", {"num_classes": 10}, (3, 32, 32), "kflo:depth=2,width=1.5"),
    ("timm:convnext_atto", {"num_classes": 10}, (3, 32, 32), "kflo:depth=2,width=1.5"),
    ("timm:vit_tiny_patch16_224", {"num_classes": 10, "img_size": 32}, (3, 32, 32), "kflo:depth=3,width=1"),
    ("timm:regnetx_002", {"num_classes": 10}, (3, 32, 32), "kflo:depth=2,width=2"),
    ("torchvision:mobilenet_v3_small", {"num_classes": 10}, (3, 32, 32), "kflo:depth=2,width=2"),
    ("torchvision:shufflenet_v2_x0_5", {"num_classes": 10}, (3, 32, 32), "kflo:depth=3,width=2"),
    ("torchvision:squeezenet1_0", {"num_classes": 10}, (3, 64, 64), "kflo:depth=2,width=2"),
    ("torchvision:resnet18", {"num_classes": 10}, (3, 32, 32), "kflo:depth=2,width=0.5"),
    ("smallnet_k7", {"num_classes": 10}, None, "kflo"),
    ("lenet5", {}, None, "kflo:depth=3,width=2"),
]


@pytest.mark.filterwarnings("ignore:kflo. layer .* does not preserve its function")  # width=0.5 on purpose
@pytest.mark.parametrize("model_id,kwargs,input_size,spec", CASES, ids=[c[0] for c in CASES])
def test_expand_collapse_verify(model_id, kwargs, input_size, spec, tmp_path):
    torch.manual_seed(0)
    model = kflo.create_model(model_id, **kwargs)
    size = input_size or kflo.default_input_size(model)
    move_bn_stats(model, size)
    perturb(model, 0.02, seed=1)
    model.eval()
    x = torch.randn(2, *size)
    with torch.no_grad():
        before = model(x)

    kflo.expand(model, spec, seed=0)
    rows = [r for r in model.kflo_plan if r.applied]
    assert rows, "KFLO must apply to some layer"
    exact = all(kflo.rewritten_layers(model) and m.parametrizations.weight[0].exact_start for _, m, _ in kflo.rewritten_layers(model))
    with torch.no_grad():
        after = model(x)
    if exact:
        assert rel_err(before, after) < 1e-5, "expansion must not change the function"

    perturb(model, 0.05, seed=2)
    move_bn_stats(model, size, seed=3)
    model.eval()
    plain = kflo.collapse(model)
    assert not kflo.is_expanded(plain)

    reference = kflo.create_model(model_id, **kwargs)
    ref_sd = reference.state_dict()
    plain_sd = plain.state_dict()
    assert list(plain_sd) == list(ref_sd)
    assert all(plain_sd[k].shape == ref_sd[k].shape and plain_sd[k].dtype == ref_sd[k].dtype for k in ref_sd)
    reference.load_state_dict(plain_sd, strict=True)

    report = kflo.verify_equivalence(model, reference, input_size=size, batch_size=2, trials=1)
    assert report.passed, report
    assert report.rel_error < 1e-5 and report.output_scale > 0

    path = tmp_path / "expanded.safetensors"
    kflo.save(model, path)
    again = kflo.load(path)
    with torch.no_grad():
        assert torch.equal(again(x), model.eval()(x))
