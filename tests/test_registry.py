"""Every built-in recipe in the registry round-trips: expand, training-like changes, collapse, the same function.

Parametrized over ``kflo.list_recipes()`` (the built-in ones), so a recipe added to the registry is checked without
editing this file. Each recipe runs on the first tiny zoo model it rewrites a layer of (``recipe_checks.TINY_MODELS``,
found through ``kflo.rewritten_layers``); a recipe that rewrites none of them fails.

Everything runs in float64 (model, expansion, collapse and forwards), so the expanded and the collapsed model may
differ by rounding only: the tolerance is ``TOL`` relative to the largest output.
"""

from __future__ import annotations

import pytest
import torch

import kflo_cli as kflo

from conftest import move_bn_stats, perturb, rel_err
from recipe_checks import builtin_recipe_names, expand_first_applicable

#: max |expanded - collapsed| / max |expanded| in float64. Composition and BatchNorm folding round at ~1e-16 per
#: operation; 1e-10 leaves room for the chains and sums of the tiny models and catches any real mismatch (a wrong
#: fold or a dropped factor is off by 1e-3 or more).
TOL = 1e-10


def test_every_built_in_recipe_is_listed():
    names = builtin_recipe_names()
    assert len(names) == len(set(names)) and {"kflo", "acnet", "doconv", "compander"} <= set(names)


@pytest.mark.filterwarnings("ignore:expandnet-ck. layer .* has no exact function-preserving")  # the start is not tested
@pytest.mark.parametrize("recipe", builtin_recipe_names())
def test_expand_train_collapse_computes_the_same_function(recipe):
    model_id, model = expand_first_applicable(recipe, dtype=torch.float64)
    size = kflo.default_input_size(model)
    x = torch.randn((4, *size), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    with torch.no_grad():
        start = model.eval()(x)

    # stand-in for training: every factor moves, and BatchNorm statistics (also a recipe's own, e.g. ACNet's
    # branches) leave their initial values
    perturb(model, 0.05, seed=1)
    move_bn_stats(model, size, seed=2)
    model.eval()
    with torch.no_grad():
        trained = model(x)
    assert rel_err(start, trained) > 1e-4, "the training stand-in must change the function"

    plain = kflo.collapse(model)
    assert not kflo.is_expanded(plain)
    reference = kflo.create_model(model_id, num_classes=10).double()
    assert list(plain.state_dict()) == list(reference.state_dict()), "collapse must give the original architecture"
    for name, layer, _ in kflo.rewritten_layers(model):
        assert type(plain.get_submodule(name)) is type(reference.get_submodule(name)), name
    with torch.no_grad():
        collapsed = plain.eval()(x)
    assert collapsed.dtype == torch.float64
    assert rel_err(trained, collapsed) < TOL, f"{recipe} on {model_id}: {rel_err(trained, collapsed):.3g}"
