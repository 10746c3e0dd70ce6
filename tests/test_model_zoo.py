"""Registry-driven sweeps: expand -> train-like perturbation -> collapse -> verify on models and recipes read from the
registries, so a model or recipe added there is tested without editing this file.

- every tiny test architecture in timm's registry (``timm.list_models("test_*")``: ResNet, EfficientNet, ConvNeXt,
  ViT, CoAtNet, MaxViT, NFNet, MambaOut, ...) with KFLO;
- every paper-zoo model that kflo_cli/zoo.py registers into timm (``timm.list_models(module="zoo")``) up to a
  parameter budget, with every built-in recipe of ``kflo.list_recipes()``.

A short hand-picked list of full-size architectures (marked slow) adds the families the tiny ones miss. Each model
is moved away from its initial state (parameters perturbed, BatchNorm statistics updated in train mode) before and
after expansion, so the checks in ``recipe_checks.zoo_roundtrip`` compare non-trivial functions in eval mode.
"""

from __future__ import annotations

import pytest
import timm
import torch

import kflo_cli as kflo
import kflo_cli.zoo  # noqa: F401  (registers the paper zoo into timm before the lists below are read)
from kflo_cli.errors import KfloError

from recipe_checks import builtin_recipe_names, zoo_roundtrip

# timm's tiny test architectures: KFLO with width >= 1 starts exactly, so the start is checked too.
TIMM_TINY = timm.list_models("test_*")

# The paper zoo, up to this many parameters (counted on the meta device) so that the recipe sweep fits a 2-core CI
# budget; tests/test_zoo.py builds and counts every zoo model, large ones included.
ZOO_PARAM_BUDGET = 500_000


def _n_params(name: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in timm.create_model(name, num_classes=10).parameters())


PAPER_ZOO = [name for name in timm.list_models(module="zoo") if _n_params(name) <= ZOO_PARAM_BUDGET]

# Hand-picked full-size architectures (model, kwargs, input size, recipe, exact start): families the tiny timm
# models do not cover (torchvision's MobileNetV3, ShuffleNetV2, SqueezeNet, ResNet; timm's RegNet) and realistic
# widths. KFLO with width < 1 truncates on purpose, so that start is not exact.
FULL_SIZE = [
    ("timm:resnet18", {"num_classes": 10}, (3, 32, 32), "kflo:depth=2,width=4", True),
    ("timm:efficientnet_b0", {"num_classes": 10}, (3, 32, 32), "kflo:depth=2,width=1.5", True),
    ("timm:convnext_atto", {"num_classes": 10}, (3, 32, 32), "kflo:depth=2,width=1.5", True),
    ("timm:vit_tiny_patch16_224", {"num_classes": 10, "img_size": 32}, (3, 32, 32), "kflo:depth=3,width=1", True),
    ("timm:regnetx_002", {"num_classes": 10}, (3, 32, 32), "kflo:depth=2,width=2", True),
    ("torchvision:mobilenet_v3_small", {"num_classes": 10}, (3, 32, 32), "kflo:depth=2,width=2", True),
    ("torchvision:shufflenet_v2_x0_5", {"num_classes": 10}, (3, 32, 32), "kflo:depth=3,width=2", True),
    ("torchvision:squeezenet1_0", {"num_classes": 10}, (3, 64, 64), "kflo:depth=2,width=2", True),
    ("torchvision:resnet18", {"num_classes": 10}, (3, 32, 32), "kflo:depth=2,width=0.5", False),
]


def test_the_registries_give_models_and_recipes():
    """The sweeps below are only as good as the lists they are generated from."""
    assert len(TIMM_TINY) >= 10 and "test_resnet" in TIMM_TINY
    assert {"lenet5", "smallnet_k3", "smallnet_k7", "cifar_quick"} <= set(PAPER_ZOO)
    assert "wrn28_10" not in PAPER_ZOO  # over the budget
    assert {"kflo", "acnet", "expandnet-cl"} <= set(builtin_recipe_names())


@pytest.mark.parametrize("name", TIMM_TINY)
def test_timm_test_architectures_with_kflo(name, tmp_path):
    cfg = timm.get_pretrained_cfg(name)
    # a small input keeps convolutional models fast; models that take one size only (ViTs) get theirs
    size = tuple(cfg.input_size) if cfg.fixed_input_size else (cfg.input_size[0], 64, 64)
    zoo_roundtrip(f"timm:{name}", {"num_classes": 7}, size, "kflo:depth=2,width=2", tmp_path)


@pytest.mark.filterwarnings("ignore:expandnet-ck. layer .* has no exact function-preserving")  # said per layer
@pytest.mark.parametrize("recipe", builtin_recipe_names())
@pytest.mark.parametrize("name", PAPER_ZOO)
def test_paper_zoo_with_every_recipe(name, recipe, tmp_path):
    # A recipe whose default does not apply to a model (ExpandNet-CK needs kernels > 3) is skipped with the
    # reason here; tests/test_registry.py fails any recipe that applies to none of the tiny models.
    model = kflo.create_model(name, num_classes=10)
    try:
        kflo.plan(model, recipe)
    except KfloError as exc:
        if "matches no layer" not in str(exc):
            raise
        pytest.skip(f"{recipe} rewrites no layer of {name} with its defaults")
    # The start is each recipe's own test's business (ACNet's default branch init is not function-preserving);
    # collapse after training-like changes, the plain checkpoint and the expanded one's reload are checked here.
    zoo_roundtrip(name, {"num_classes": 10}, kflo.default_input_size(model), recipe, tmp_path, exact_start=False)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:kflo. layer .* does not preserve its function")  # width=0.5 on purpose
@pytest.mark.parametrize("model_id,kwargs,input_size,spec,exact", FULL_SIZE, ids=[c[0] for c in FULL_SIZE])
def test_full_size_architectures(model_id, kwargs, input_size, spec, exact, tmp_path):
    zoo_roundtrip(model_id, kwargs, input_size, spec, tmp_path, exact_start=exact)
