"""Bounds on every recipe parameter (spec strings, recipe dictionaries, checkpoint metadata), the per-layer size
check, KFLO's ``BxRHO`` shorthand and the compander's ``a=auto``.

Every out-of-range value must be one KfloError sentence with the allowed range, raised before anything is allocated;
through the CLI that is one ``error:`` line and exit 2 (no traceback).
"""

from __future__ import annotations

import itertools
import json
import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.nn.utils import parametrize
from typer.testing import CliRunner

import kflo_cli as kflo
from kflo_cli.checkpoint import read_metadata
from kflo_cli.cli import app
from kflo_cli.errors import KfloError
from kflo_cli.recipefile import load_recipe_file
from kflo_cli.reparam import LayerContext, Param, RecipeSpec, Shorthand, base, parse_spec, registry
from kflo_cli.reparam.compander import AUTO_FLOOR, COMPANDERS, MAX_SCALE, auto_a, smallest_workable_a

from conftest import assert_user_error, rel_err

runner = CliRunner()

#: float32 forwards of the expanded model (Psi(v) evaluated in float32) against the collapsed weights (composed in
#: float64, rounded once): a few float32 ulps per weight, summed over LeNet-5's layers.
TOL32 = 1e-5
#: the same in float64.
TOL64 = 1e-10



def squash(text: str) -> str:
    return re.sub(r"[\s│┃]+", " ", text)


# -- every numeric parameter of every built-in recipe has a range ---------------------------------------------------

NUMERIC = [(cls.name, key, param) for cls in kflo.list_recipes() if cls.source == "built-in"
           for key, param in cls.params.items() if param.type in (int, float)]


def test_the_built_in_numeric_parameters_are_all_covered():
    names = {(r, k) for r, k, _ in NUMERIC}
    assert {("kflo", "depth"), ("kflo", "width"), ("expandnet-cl", "rate"), ("expandnet-ck", "rate"),
            ("expandnet-fc", "rate"), ("expandnet-fc", "layers"), ("doconv", "depth_multiplier"),
            ("compander", "a"), ("compander", "b"), ("powerprop", "alpha")} == names


@pytest.mark.parametrize("recipe,key,param", NUMERIC, ids=[f"{r}.{k}" for r, k, _ in NUMERIC])
def test_every_numeric_parameter_has_a_range_shown_and_enforced(recipe, key, param):
    assert param.low is not None and param.high is not None and math.isfinite(param.high)
    assert f"{param.high:g}" in param.help, "`kflo recipes` must show the ceiling"

    def make(value):
        return kflo.create_recipe(f"{recipe}:{key}={value}").values[key]

    assert make(param.default) == param.default
    assert make(f"{param.high:g}") == param.high
    if not param.low_open:
        assert make(f"{param.low:g}") == param.low
    allowed = param.allowed()
    for raw in ("1e300", f"{param.high * 2:g}", f"{param.low - 1:g}" if param.type is int else "-1"):
        with pytest.raises(KfloError, match=re.escape(f"recipe '{recipe}': {key}={raw} is out of range; use {allowed}")):
            make(raw)
    if param.low_open:
        with pytest.raises(KfloError, match="is out of range"):
            make(f"{param.low:g}")
    for raw in ("nan", "inf", "-inf"):
        with pytest.raises(KfloError, match=f"{key}=.*(is not a finite number|is not a valid int|is out of range)"):
            make(raw)
    # recipe files and checkpoints give typed values: booleans are never numbers, ints take only whole numbers
    with pytest.raises(KfloError, match=f"parameter {key}=True is not a valid {param.type.__name__}"):
        kflo.create_recipe({"name": recipe, key: True})
    with pytest.raises(KfloError, match="is out of range"):
        kflo.create_recipe({"name": recipe, key: 10**400})
    if param.type is int:
        with pytest.raises(KfloError, match=f"parameter {key}=2.5 is not a valid int"):
            kflo.create_recipe({"name": recipe, key: 2.5})
        assert kflo.create_recipe({"name": recipe, key: float(param.high)}).values[key] == param.high
    else:
        with pytest.raises(KfloError, match=f"{key}=nan is not a finite number"):
            kflo.create_recipe({"name": recipe, key: float("nan")})


def test_param_messages_and_keywords():
    p = Param(float, 1.0, "x", low=0.0, high=2.0, low_open=True, keywords=("auto",))
    assert p.allowed() == "a number > 0 and at most 2, or auto"
    assert p.parse("r", "x", " AUTO ") == "auto"
    assert Param(int, 3, "n", low=2, high=16).allowed() == "an integer from 2 to 16"
    assert Param(int, 3, "n").allowed() == ""
    with pytest.raises(KfloError, match=r"recipe 'r': n=99999999999 is out of range; use an integer below 2\^31"):
        Param(int, 3, "n").parse("r", "n", "99999999999")


def test_cli_refuses_a_huge_width_in_one_line():
    """The issue's reproduction: one line, exit 2, and nothing built."""
    r = runner.invoke(app, ["expand", "lenet5", "--recipe", "kflo:width=1e300", "--dry-run"])
    assert_user_error(r, "recipe 'kflo': width=1e300 is out of range; use a number > 0 and at most 64")


# -- the checkpoint-metadata path ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = kflo.expand(kflo.create_model("lenet5"), [{"name": "kflo", "depth": 2, "width": 2.0, "include": ["features.*"]},
                                                      {"name": "compander", "include": ["classifier.*"]}])
    path = tmp_path_factory.mktemp("bounds") / "lenet.safetensors"
    kflo.save(model, path)
    return path


def with_metadata(path, out, index: int, key: str, value) -> None:
    """A copy of ``path`` whose ``index``-th recipe has parameter ``key`` set to ``value`` (as a hand edit would)."""
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["kflo"])
    meta["recipes"][index]["params"][key] = value
    save_file(load_file(str(path)), str(out), metadata={"kflo": json.dumps(meta)})


@pytest.mark.parametrize("index,key,value,fragment", [
    (0, "width", 1e300, "recipe 'kflo': width=1e+300 is out of range; use a number > 0 and at most 64"),
    (0, "width", "1e300", "recipe 'kflo': width=1e300 is out of range; use a number > 0 and at most 64"),
    (0, "width", float("nan"), "recipe 'kflo': width=nan is not a finite number"),
    (0, "width", float("inf"), "recipe 'kflo': width=inf is not a finite number"),
    (0, "depth", 10**30, "recipe 'kflo': depth=1000000000000000000000000000000 is out of range; use an integer from 2 to 16"),
    (0, "depth", 2.5, "recipe 'kflo': parameter depth=2.5 is not a valid int"),
    (0, "depth", True, "recipe 'kflo': parameter depth=True is not a valid int"),
    (1, "a", 1e300, "recipe 'compander': a=1e+300 is out of range; use a number from 0.001 to 1000, or auto"),
    (1, "b", 0.0, "recipe 'compander': b=0.0 is out of range; use a number from 0.001 to 1000"),
])
def test_checkpoint_metadata_out_of_range_is_one_error(saved, tmp_path, index, key, value, fragment):
    bad = tmp_path / "bad.safetensors"
    with_metadata(saved, bad, index, key, value)
    with pytest.raises(KfloError, match=re.escape(fragment)):
        kflo.load(bad)
    assert_user_error(runner.invoke(app, ["collapse", str(bad), "-o", str(tmp_path / "p.safetensors")]), fragment)


def test_checkpoint_metadata_with_the_shorthand_values_still_loads(saved, tmp_path):
    edited = tmp_path / "ok.safetensors"
    with_metadata(saved, edited, 0, "depth", 2.0)  # a whole float for an int: accepted, as in recipe files
    values = kflo.record(kflo.load(edited)).selections[0].recipe.values
    assert (values["depth"], values["width"]) == (2, 2.0) and isinstance(values["depth"], int)


# -- the per-layer size check ----------------------------------------------------------------------------------------

def test_factors_beyond_the_element_limit_are_refused_before_anything_is_allocated():
    model = nn.Sequential(nn.Linear(1024, 1024))
    rows = 64 * 1024
    count = rows * 1024 + rows * rows + 1024 * rows  # W_1, one middle matrix, W_B: 4.4e9 elements, 16.5 GiB
    with pytest.raises(KfloError, match=re.escape(
            f"kflo: layer '0' would get factors of {count:,} elements (16.5 GiB in float32), more than one layer's "
            "factors may hold (2,147,483,648 elements); lower depth or width, or --exclude '0'")):
        kflo.expand(model, "kflo:depth=3,width=64")
    assert not parametrize.is_parametrized(model[0]) and not kflo.is_expanded(model)
    r = runner.invoke(app, ["expand", "lenet5", "--recipe", "expandnet-fc:rate=16,layers=16,classifier=expand",
                            "--include", "classifier.*", "--dry-run"])
    assert r.exit_code == 0, r.output  # LeNet-5's Linear layers are small enough even at both ceilings


def test_factors_beyond_the_free_memory_are_refused(monkeypatch):
    monkeypatch.setattr(base, "available_bytes", lambda device: 1000)
    with pytest.raises(KfloError, match=r"doconv: layer 'features.0' would get factors of 1,400 elements \(5.47 KiB in "
                                        r"float32\), more than the 1000 bytes free on cpu; lower depth_multiplier, "
                                        r"or --exclude 'features.0'"):
        kflo.expand(kflo.create_model("lenet5"), "doconv")


def test_free_memory_is_known_on_this_machine():
    free = base.available_bytes(torch.device("cpu"))
    assert free is None or free > 0
    assert base.available_bytes(torch.device("meta")) is None


def test_rebuilding_a_checkpoint_checks_the_size_too(saved, monkeypatch):
    """Loading does not call check(); a recorded recipe still cannot allocate more than one layer may hold."""
    monkeypatch.setattr(base, "MAX_FACTOR_ELEMENTS", 1000)
    with pytest.raises(KfloError, match=r"kflo: layer 'features.3' would get factors of .* elements .*; lower depth "
                                        r"or width, or --exclude 'features.3'"):
        kflo.load(saved)


LAYERS = {
    "conv": lambda: nn.Conv2d(4, 6, 3, bias=True),
    "grouped": lambda: nn.Conv2d(4, 6, 5, groups=2, bias=False),
    "linear": lambda: nn.Linear(7, 5),
    "conv1d": lambda: nn.Conv1d(3, 4, 3),
}
COUNT_CASES = [
    ("kflo:depth=3,width=2", "conv"), ("kflo:width=0.5", "grouped"), ("kflo", "linear"),
    ("doconv", "grouped"), ("doconv:depth_multiplier=12", "conv"), ("doconv", "conv1d"),
    ("expandnet-cl", "conv"), ("expandnet-cl:rate=2", "grouped"), ("expandnet-ck", "grouped"),
    ("expandnet-fc:layers=4", "linear"),
    ("compander", "conv"), ("compander:learnable=fine", "linear"), ("compander:a=auto", "grouped"),
    ("powerprop", "conv"), ("weightnorm", "grouped"), ("weightnorm", "linear"),
]


@pytest.mark.filterwarnings("ignore:expandnet", "ignore:kflo")  # starts that do not preserve the function: not the point
@pytest.mark.parametrize("spec,layer", COUNT_CASES, ids=[f"{s}-{k}" for s, k in COUNT_CASES])
def test_factor_count_is_what_the_parametrization_allocates(spec, layer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Identity(), LAYERS[layer]())  # not the model's first convolution (ExpandNet's stem)
    recipe = kflo.create_recipe(spec)
    count = recipe.factor_count(LayerContext("1", model[1], model))
    kflo.expand(model, recipe)
    inner = model[1].parametrizations.weight[0]
    allocated = sum(t.numel() for t in itertools.chain(inner.parameters(), inner.buffers()))
    # the compander counts its (a, b) pair whether it is a buffer, learned or a Python float
    assert allocated <= count <= allocated + 2, (count, allocated)


# -- KFLO's BxRHO shorthand ------------------------------------------------------------------------------------------

def test_kflo_shorthand_is_depth_then_width():
    """The KFLO paper writes "KFLO Bx rho" (B the linear depth multiplier, rho the width multiplier): 2x4 = B 2, rho 4."""
    assert parse_spec("kflo:2x4") == ("kflo", {"depth": "2", "width": "4"})
    values = kflo.create_recipe("kflo:2x4").values
    assert (values["depth"], values["width"]) == (2, 4.0)
    values = kflo.create_recipe("kflo:3x0.5").values
    assert (values["depth"], values["width"]) == (3, 0.5)
    assert kflo.create_recipe(" kflo: 3X2 ").spec().startswith("kflo:depth=3,width=2.0")
    for name, short in (("kflo-2x4", "2x4"), ("kflo-3x2", "3x2")):  # the bundled files named after the paper
        (entry,) = load_recipe_file(name).recipes
        assert kflo.create_recipe(entry).values == kflo.create_recipe(f"kflo:{short}").values


@pytest.mark.parametrize("spec,fragment", [
    ("kflo:2x4,width=2", "sets 'width' twice"),
    ("kflo:2x4,depth=3", "sets 'depth' twice"),
    ("kflo:width=2,2x4", "'2x4' is not key=value; write NAME:key=value"),
    ("kflo:2y4", "'2y4' is not key=value nor shorthand kflo:BxRHO = depth=B,width=RHO (e.g. kflo:2x4)"),
    ("kflo:2.5x4", "'2.5x4' is not key=value nor shorthand kflo:BxRHO"),
    ("kflo:2x100", "recipe 'kflo': width=100 is out of range; use a number > 0 and at most 64"),
    ("kflo:1x4", "recipe 'kflo': depth=1 is out of range; use an integer from 2 to 16"),
    ("kflo:2x1e300", "recipe 'kflo': width=1e300 is out of range"),
    ("doconv:2x4", "'2x4' is not key=value and recipe 'doconv' has no shorthand"),
])
def test_bad_shorthands_are_refused(spec, fragment):
    with pytest.raises(KfloError, match=re.escape(fragment)):
        kflo.create_recipe(spec)


def test_shorthand_in_the_cli_and_in_recipes_listing(tmp_path):
    r = runner.invoke(app, ["recipes"])
    assert r.exit_code == 0 and "shorthand kflo:BxRHO = depth=B,width=RHO (e.g. kflo:2x4)" in squash(r.output)
    out = tmp_path / "k.safetensors"
    r = runner.invoke(app, ["expand", "lenet5", "--recipe", "kflo:3x2", "-o", str(out)])
    assert r.exit_code == 0, r.output
    params = read_metadata(out)["recipes"][0]["params"]
    assert (params["depth"], params["width"]) == (3, 2.0)
    assert_user_error(runner.invoke(app, ["expand", "lenet5", "--recipe", "kflo:3x", "--dry-run"]),
                      "'3x' is not key=value nor shorthand kflo:BxRHO")


def test_any_recipe_may_declare_a_shorthand_and_combine_it_with_key_value(monkeypatch):
    """The registry's mechanism is not KFLO's: a plugin's RecipeSpec declares its own, listed by `kflo recipes`."""
    kflo.list_recipes()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    def rank_form(text: str) -> dict[str, str] | None:
        match = re.fullmatch(r"r(\d+)", text)
        return {"rank": match.group(1)} if match else None

    spec = RecipeSpec(name="ranked", description="a test recipe", factory=lambda module, **values: None,
                      params={"rank": Param(int, 1, "the rank: an integer from 1 to 64", low=1, high=64),
                              "scale": Param(float, 1.0, "a number from 0 to 10", low=0.0, high=10.0)},
                      shorthand=Shorthand("rR", "rank=R", "r4", rank_form))
    kflo.register_recipe(registry.recipe_from_spec(spec), source="test")
    assert kflo.create_recipe("ranked:r4,scale=0.5").values == {"rank": 4, "scale": 0.5}
    with pytest.raises(KfloError, match=re.escape("recipe 'ranked': rank=65 is out of range")):
        kflo.create_recipe("ranked:r65")
    r = runner.invoke(app, ["recipes"])
    assert "shorthand ranked:rR = rank=R (e.g. ranked:r4)" in squash(r.output)
    with pytest.raises(TypeError, match="shorthand must be"):
        registry.recipe_from_spec(RecipeSpec(name="x", description="", params={}, factory=lambda m: None,
                                             shorthand="r4"))  # type: ignore[arg-type]


# -- the compander's a=auto ------------------------------------------------------------------------------------------

def lenet_with_a_large_weight(dtype: torch.dtype = torch.float32) -> nn.Module:
    """LeNet-5 whose first convolution holds one weight |w| = 2 (as a ViT attention projection does), beyond arctan's
    a*pi/2 for the paper's a = 1."""
    torch.manual_seed(0)
    model = kflo.create_model("lenet5").to(dtype)
    with torch.no_grad():
        model.features[0].weight[0, 0, 0, 0] = -2.0
    return model


def a_values(model: nn.Module) -> dict[str, float]:
    return {name: float(module.parametrizations.weight[0].a.detach()) for name, module, _ in kflo.rewritten_layers(model)}


@pytest.mark.parametrize("spec,fix", [
    ("compander", "--recipe compander:a=1.3 or --recipe compander:a=auto (an a per layer)"),
    ("compander:fn=erf,b=0.5", "--recipe compander:a=2.01,b=0.5,fn=erf or --recipe compander:a=auto,b=0.5,fn=erf"),
])
def test_a_fixed_a_that_cannot_represent_a_layer_names_the_recipe_to_type(spec, fix):
    with pytest.raises(KfloError, match=re.escape(fix)) as refused:
        kflo.expand(lenet_with_a_large_weight(), spec)
    message = str(refused.value)
    assert message.startswith("compander: layer 'features.0' has weights up to |w| = 2,") and "\n" not in message
    for suggested in re.findall(r"--recipe (\S+)", message):  # both suggestions work as typed
        kflo.expand(lenet_with_a_large_weight(), suggested)


def test_auto_picks_the_smallest_a_with_the_margin_and_never_below_the_paper():
    for fn, comp in COMPANDERS.items():  # the margin: Psi keeps half its slope at the largest weight
        t = comp.inverse(torch.tensor(comp.auto_ratio, dtype=torch.float64))
        assert math.isclose((comp.slope(t) / comp.slope(torch.zeros((), dtype=torch.float64))).item(), 0.5, rel_tol=1e-9)
        assert comp.auto_ratio < comp.max_ratio
    assert COMPANDERS["arctan"].auto_ratio == pytest.approx(math.pi / 4)
    assert auto_a(2.0, "arctan") == 2.55 and auto_a(1.555, "arctan") == 1.98
    assert auto_a(0.3, "arctan") == AUTO_FLOOR == 1.0
    assert auto_a(2.0, "arctan") >= smallest_workable_a(2.0, "arctan")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, TOL32), (torch.float64, TOL64)])
def test_auto_expands_trains_collapses_and_round_trips(tmp_path, dtype, tol):
    model = lenet_with_a_large_weight(dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 1, 28, 28, generator=gen).to(dtype)
    y = torch.randint(0, 10, (8,), generator=gen)
    with torch.no_grad():
        start = model.eval()(x)
    kflo.expand(model, "compander:a=auto")
    chosen = a_values(model)
    assert chosen["features.0"] == pytest.approx(2.55) and all(v == 1.0 for k, v in chosen.items() if k != "features.0")
    key = "features.0.parametrizations.weight.0.a"
    assert key in model.state_dict() and key not in dict(model.named_parameters())  # a buffer: saved, not trained
    with torch.no_grad():
        assert rel_err(start, model(x)) < tol  # function-preserving start

    # one training step, with the paper's decay on Psi(v)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss = F.cross_entropy(model(x), y) + kflo.decay_penalty(model, 5e-4)
    loss.backward()
    opt.step()
    assert a_values(model) == chosen
    model.eval()
    with torch.no_grad():
        trained = model(x)
    assert rel_err(start, trained) > 1e-4, "the step must change the function"

    plain = kflo.collapse(model)
    assert list(plain.state_dict()) == list(kflo.create_model("lenet5").state_dict())
    with torch.no_grad():
        collapsed = plain.eval()(x)
    assert rel_err(trained, collapsed) < tol, rel_err(trained, collapsed)

    path = tmp_path / "auto.safetensors"
    kflo.save(model, path)
    assert read_metadata(path)["recipes"][0]["params"]["a"] == "auto"
    again = kflo.load(path)
    assert a_values(again) == chosen
    with torch.no_grad():
        assert torch.equal(again.eval()(x), trained)
        assert torch.equal(kflo.collapse(again).eval()(x), collapsed)


def test_auto_with_learnable_pairs():
    fine = kflo.expand(lenet_with_a_large_weight(), "compander:a=auto,learnable=fine")
    assert a_values(fine)["features.0"] == pytest.approx(2.55) and a_values(fine)["classifier.0"] == 1.0
    # coarse: one pair for the network, so one a that fits every rewritten layer
    coarse = kflo.expand(lenet_with_a_large_weight(), "compander:a=auto,learnable=coarse")
    assert set(a_values(coarse).values()) == {float(torch.tensor(2.55))}
    excluded = kflo.expand(lenet_with_a_large_weight(), "compander:a=auto,learnable=coarse", exclude=["features.0"])
    assert set(a_values(excluded).values()) == {1.0}


def test_auto_starts_a_fresh_efficientnet_that_a_1_refuses():
    torch.manual_seed(0)
    model = kflo.create_model("timm:test_efficientnet", num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        start = model.eval()(x)
    kflo.expand(model, "compander:a=auto")
    assert max(a_values(model).values()) > 1.0
    with torch.no_grad():
        assert rel_err(start, model(x)) < TOL32


def test_auto_refuses_weights_beyond_the_largest_a():
    layer = nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.fill_(1000.0)
    with pytest.raises(KfloError, match=rf"layer '0' has weights up to \|w\| = 1000, so a=auto would need a = 1273.24, "
                                        rf"beyond the largest a \({MAX_SCALE:g}\); --exclude '0'"):
        kflo.expand(nn.Sequential(layer), "compander:a=auto")
