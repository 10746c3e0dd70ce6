"""The recipe contract and the one expansion pipeline: layer contexts, the output check, the model record, the
pipeline's initialisation sources, and collapse without deep-copying live caches."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file
from typer.testing import CliRunner

import kflo_cli as kflo
from kflo_cli.cli import app
from kflo_cli.errors import KfloError
from tests.conftest import move_bn_stats, perturb, rel_err


# -- the parametrization's output is checked before the layer is touched -------------------------------------------
class _Scaled(nn.Module):
    """A plugin parametrization ``W = s * V`` that can be told to return a wrong shape or dtype."""

    def __init__(self, shape: torch.Size, bug: str) -> None:
        super().__init__()
        self.bug = bug
        self.v = nn.Parameter(torch.empty(shape))

    def forward(self) -> torch.Tensor:
        if self.bug == "shape":
            return self.v[:-1]
        if self.bug == "dtype":
            return self.v.double()
        return self.v

    @torch.no_grad()
    def right_inverse(self, weight: torch.Tensor) -> tuple[()]:
        self.v.copy_(weight)
        return ()


SCALED = kflo.RecipeSpec(name="scaled-test", description="test", params={"bug": "none"},
                         factory=lambda module, bug: _Scaled(module.weight.shape, bug))


@pytest.mark.parametrize("bug, words", [("shape", ["shape (5, 3)", "shape (6, 3)"]), ("dtype", ["torch.float64", "torch.float32"])])
def test_a_wrong_plugin_is_one_sentence_and_leaves_the_layer_alone(bug, words):
    recipe = kflo.reparam.recipe_from_spec(SCALED)(bug=bug)
    model = nn.Sequential(nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 2))
    before = model[0].weight.detach().clone()
    with pytest.raises(KfloError) as err:
        kflo.expand(model, recipe)
    message = str(err.value)
    assert "recipe 'scaled-test' on layer '0'" in message and all(w in message for w in words)
    assert "\n" not in message
    assert type(model[0]) is nn.Linear and torch.equal(model[0].weight, before)
    assert not kflo.is_expanded(model)
    kflo.expand(model, kflo.reparam.recipe_from_spec(SCALED)())  # the correct plugin expands it


def test_a_recipe_failing_on_a_later_layer_leaves_the_whole_model_as_it_was(tmp_path):
    # acnet (structural) and kflo rewrite layers '0' and '3' before the wrong plugin fails on '5': both are put back,
    # so the model is not left half expanded without a record (which kflo.save would write as a "plain" file).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 5 * 5, 4), nn.ReLU(),
                          nn.Linear(4, 2)).eval()
    x = torch.randn(2, 1, 5, 5)
    before_out, before_sd = model(x), {k: v.clone() for k, v in model.state_dict().items()}
    before_types = [type(m) for m in model.modules()]
    bad = kflo.reparam.recipe_from_spec(SCALED)(bug="shape")
    recipes = [kflo.Selection(kflo.create_recipe("acnet")), {"name": "kflo", "include": ["3"]}, kflo.Selection(bad, ("5",))]
    with pytest.raises(KfloError, match="recipe 'scaled-test' on layer '5'"):
        kflo.expand(model, recipes)
    assert [type(m) for m in model.modules()] == before_types
    after_sd = model.state_dict()
    assert list(after_sd) == list(before_sd) and all(torch.equal(after_sd[k], before_sd[k]) for k in before_sd)
    assert not kflo.is_expanded(model) and not kflo.record(model).layers
    assert torch.equal(model(x), before_out)
    recipes[-1] = kflo.Selection(kflo.reparam.recipe_from_spec(SCALED)(), ("5",))
    kflo.expand(model, recipes)  # and it expands once the plugin is right
    assert [x.name for x in kflo.record(model).layers] == ["0", "3", "5"]


class _MisnamedRoles(_Scaled):
    """Its roles and step scales name a factor it does not have (``V`` for ``v``)."""

    def roles(self) -> dict[str, kflo.ParamRole]:
        return {"V": kflo.ParamRole("scaled-v", "none")}

    def step_scales(self) -> dict[str, torch.Tensor]:
        return {"V": torch.ones_like(self.v)}


def test_roles_naming_no_parameter_are_refused_not_ignored():
    # a misspelt factor would otherwise silently train on the ordinary rule (the run's decay on the factor)
    spec = kflo.RecipeSpec(name="misnamed-roles", description="test", params={},
                           factory=lambda module: _MisnamedRoles(module.weight.shape, "none"))
    model = kflo.expand(nn.Sequential(nn.Linear(3, 2)), kflo.reparam.recipe_from_spec(spec)())
    for read, hook in ((kflo.param_roles, "roles()"), (kflo.step_scales, "step_scales()")):
        with pytest.raises(KfloError) as err:
            read(model)
        assert str(err.value) == (f"recipe 'misnamed-roles' on layer '0': {hook} names 'V', which is not a parameter of "
                                  "the layer (its parameters: bias, v); name the parametrization's own factors")
    # frozen factors and a network-wide parameter shared by several layers (the coarse compander's a, b) are fine
    model = kflo.expand(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)), "compander:learnable=coarse")
    model[0].parametrizations.weight[0].v.requires_grad_(False)
    roles = kflo.param_roles(model)
    assert "0.parametrizations.weight.0.v" not in roles and "1.parametrizations.weight.0.v" in roles


# -- "does not apply" vs "applies but the value is unusable" ---------------------------------------------------------
def test_skip_reasons_are_shown_and_unusable_values_are_errors():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3))
    rows = {r.name: r for r in kflo.plan(model, "doconv")}
    assert not rows["0"].applied and "1-tap kernel" in rows["0"].reason
    with pytest.raises(KfloError, match=r"depth_multiplier >= 9"):
        kflo.plan(model, "doconv:depth_multiplier=4")
    # a rebuild does not check values: the checkpoint's tensors replace them
    big = nn.Sequential(nn.Linear(4, 4))
    with torch.no_grad():
        big[0].weight.fill_(5.0)
    with pytest.raises(KfloError, match="beyond what arctan"):
        kflo.expand(big, "compander")
    kflo.expand(big, "compander", rebuilding=True)


# -- one record ---------------------------------------------------------------------------------------------------
def test_the_record_describes_the_model_and_survives_save_load_and_collapse(tmp_path):
    model = kflo.create_model("lenet5", num_classes=7)
    assert kflo.record(model) == kflo.ModelRecord("timm:lenet5", {"num_classes": 7})
    kflo.expand(model, [{"name": "kflo", "include": ["features.*"]}, {"name": "weightnorm", "include": ["classifier.*"]}],
                exclude=["classifier.4"])
    rec = kflo.record(model)
    assert rec.expanded and [s.recipe.name for s in rec.selections] == ["kflo", "weightnorm"]
    assert rec.selections[0].include == ("features.*",) and rec.exclude == ("classifier.4",)
    assert rec.selections[1].include == ("classifier.*",)
    assert {x.name: rec.recipe_of(x).name for x in rec.layers} == {
        "features.0": "kflo", "features.3": "kflo", "classifier.0": "weightnorm", "classifier.2": "weightnorm"}
    assert all(x.original_class is (nn.Conv2d if x.name.startswith("features") else nn.Linear) for x in rec.layers)
    # layers carry no kflo attributes of their own: the record is the one place
    assert not [k for m in model.modules() for k in vars(m) if k.startswith(("kflo", "_kflo")) and m is not model]
    path = tmp_path / "m.safetensors"
    kflo.save(model, path)
    again = kflo.record(kflo.load(path))
    assert again.model_id == rec.model_id and again.model_kwargs == rec.model_kwargs
    assert [s.as_metadata() for s in again.selections] == [s.as_metadata() for s in rec.selections]
    assert again.include == rec.include and again.exclude == rec.exclude
    assert [(x.name, x.recipe_index, x.original_class, x.param_order) for x in again.layers] == \
        [(x.name, x.recipe_index, x.original_class, x.param_order) for x in rec.layers]
    plain = kflo.collapse(model)
    assert not kflo.record(plain).expanded
    assert [dict(x) for x in kflo.record(plain).collapsed_from] == rec.recipes_metadata()
    assert kflo.record(model) is rec  # collapse leaves the expanded model alone


def test_wrappers_find_the_expanded_layers():
    model = kflo.expand(kflo.create_model("lenet5"), "kflo")
    wrapper = nn.Sequential(model)
    assert [n for n, _, _ in kflo.rewritten_layers(wrapper)] == ["0." + n for n, _, _ in kflo.rewritten_layers(model)]
    assert set(kflo.param_roles(wrapper)) == {"0." + n for n in kflo.param_roles(model)}


# -- collapse does not deep-copy live caches ---------------------------------------------------------------------
class _Caching(nn.Module):
    """Caches a computed tensor in eval mode, as timm's LeViT caches its attention biases."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bias_table = nn.Parameter(torch.randn(3))
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.conv(x) + self.bias_table[:, None, None]
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.bias_table[:, None, None] * 1.0  # a non-leaf tensor with history
        return self.conv(x) + self.cache[key]


def test_collapse_after_a_grad_enabled_eval_forward_of_a_caching_model():
    model = kflo.expand(_Caching(), "kflo")
    perturb(model, 0.1)
    model.eval()
    x = torch.randn(2, 2, 5, 5)
    y = model(x)  # gradients enabled: the cache now holds a non-leaf tensor
    assert model.cache and next(iter(model.cache.values())).grad_fn is not None
    plain = kflo.collapse(model)
    assert rel_err(y.detach(), plain.eval()(x).detach()) < 1e-5


@pytest.mark.slow
def test_collapse_after_a_grad_enabled_eval_forward_on_timm_levit():
    torch.manual_seed(0)
    model = kflo.expand(kflo.create_model("levit_128s", num_classes=10), "kflo:width=1",
                        include=["stages.2.blocks.*.attn.*", "head.*"])
    perturb(model, 0.02)
    move_bn_stats(model, (3, 224, 224), steps=1, batch=2)
    model.eval()
    x = torch.randn(1, 3, 224, 224)
    y = model(x)  # LeViT caches its attention biases in eval mode; here with gradients
    plain = kflo.collapse(model)
    with torch.no_grad():
        assert rel_err(y.detach(), plain(x)) < 1e-4
    report = kflo.verify_equivalence(model, plain, input_size=(3, 224, 224), batch_size=1, trials=1)
    assert report.passed, report


# -- the pipeline's initialisation sources, the same in every command -------------------------------------------------
def _plain_lenet(path, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = kflo.create_model("lenet5", num_classes=10)
    kflo.save(model, path)
    return model


def _check_stacked(model: nn.Module, first: nn.Module, second: nn.Module) -> None:
    """W_1's first rows hold the first network's kernels, the next rows the second's, and the start is the first."""
    for name, module, recipe in kflo.rewritten_layers(model):
        w1 = module.parametrizations.weight[0].w1
        out = first.get_submodule(name).weight.shape[0]
        assert torch.equal(w1[:out], first.get_submodule(name).weight.detach().reshape(out, -1))
        assert torch.equal(w1[out:2 * out], second.get_submodule(name).weight.detach().reshape(out, -1))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert rel_err(first.eval()(x), model.eval()(x)) < 1e-5


def test_expand_model_stacks_several_networks(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    first, second = _plain_lenet(a, 1), _plain_lenet(b, 2)
    model = kflo.expand_model("lenet5", "kflo:width=2", model_kwargs={"num_classes": 10}, init_from=[a, b])
    _check_stacked(model, first, second)
    with pytest.raises(KfloError, match="stack"):
        kflo.expand_model("lenet5", "weightnorm", model_kwargs={"num_classes": 10}, init_from=[a, b])
    with pytest.raises(KfloError, match=r"width >= 3"):
        kflo.expand_model("lenet5", "kflo:width=2", model_kwargs={"num_classes": 10}, init_from=[a, b, a])


def test_kflo_train_stacks_several_networks(tmp_path):
    from kflo_cli.train import resolve_config
    from kflo_cli.train.source import prepare

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    first, second = _plain_lenet(a, 1), _plain_lenet(b, 2)
    config = resolve_config({"source": "lenet5", "recipe": ["kflo:width=2"], "init_from": [str(a), str(b)],
                             "data": "synthetic", "in_chans": 1, "img_size": 28})
    prepared = prepare(config)
    _check_stacked(prepared.model, first, second)
    assert "stacked 2 pretrained networks" in prepared.note
    r = CliRunner().invoke(app, ["train", "lenet5", "--recipe", "kflo:width=2", "--init-from", str(a), "--init-from",
                                 str(b), "--epochs", "1", "--data", "synthetic", "--in-chans", "1", "--img-size", "28",
                                 "--stop-after-steps", "1", "-o", str(tmp_path / "run")])
    assert r.exit_code in (0, 130), r.output
    assert "stacked 2 pretrained networks" in r.output
    state = load_file(str(tmp_path / "run" / "last.safetensors"))
    w1 = state["features.0.parametrizations.weight.0.w1"]
    out = first.features[0].weight.shape[0]
    # one SGD step later the stacked rows are still the second network's kernels, give or take a step
    assert rel_err(second.features[0].weight.detach().reshape(out, -1), w1[out:2 * out]) < 0.5
    assert not torch.allclose(w1[out:2 * out], torch.zeros_like(w1[out:2 * out]))


def test_init_from_expanded_reuses_the_recipes_in_every_command(tmp_path):
    source = tmp_path / "nonlinear.safetensors"
    torch.manual_seed(0)
    model = kflo.expand_model("smallnet_k7", ["expandnet-ck:nonlinear=relu,mode=feature"],
                              model_kwargs={"num_classes": 10, "in_chans": 1})
    kflo.save(model, source)
    linear = kflo.expand_model("smallnet_k7", init_from_expanded=source)
    rec = kflo.record(linear)
    assert rec.model_kwargs == {"num_classes": 10, "in_chans": 1}
    assert [s.recipe.values["nonlinear"] for s in rec.selections] == ["none"]
    assert all(torch.equal(linear.state_dict()[k], v) for k, v in load_file(str(source)).items())
    assert kflo.collapse_problem(linear) is None and kflo.collapse_problem(model) is not None


def test_collapse_to_file_checks_the_architecture_and_writes_atomically(tmp_path):
    model = kflo.expand_model("lenet5", "kflo", model_kwargs={"num_classes": 10})
    path = tmp_path / "plain.safetensors"
    plain = kflo.collapse_to_file(model, path)
    fresh = kflo.create_model("lenet5", num_classes=10)
    fresh.load_state_dict(load_file(str(path)), strict=True)
    assert list(plain.state_dict()) == list(fresh.state_dict())
    assert math.isclose(kflo.verify_equivalence(model, fresh, input_size=(1, 28, 28)).rel_error, 0.0, abs_tol=1e-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.safetensors"]


def test_kflo_train_continues_a_nonlinear_counterpart(tmp_path):
    """+Init through kflo train: the first run trains the nonlinear counterpart, the second starts the linear
    ExpandNet from its tensors (the recipes come from the file) and collapses at the end."""
    runner = CliRunner()
    common = ["--epochs", "1", "--data", "synthetic", "--in-chans", "1", "--img-size", "28", "--threads", "1"]
    r = runner.invoke(app, ["train", "lenet5", "--recipe", "expandnet-cl:rate=1,nonlinear=relu,mode=feature",
                            *common, "-o", str(tmp_path / "first")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train", "lenet5", "--init-from-expanded", str(tmp_path / "first" / "last.safetensors"),
                            *common, "-o", str(tmp_path / "second")])
    assert r.exit_code == 0, r.output
    assert "started from" in r.output
    assert (tmp_path / "second" / "collapsed.safetensors").is_file()
    meta = kflo.read_metadata(tmp_path / "second" / "last.safetensors")
    assert [e["params"]["nonlinear"] for e in meta["recipes"]] == ["none"]


def test_collapse_of_a_model_that_cannot_be_deep_copied_rebuilds_it_from_its_record():
    import threading

    torch.manual_seed(0)
    model = kflo.expand(kflo.create_model("lenet5", num_classes=10), "kflo:width=2")
    perturb(model, 0.1)
    model.lock = threading.Lock()  # deepcopy refuses: "cannot pickle '_thread.lock' object"
    with pytest.raises(TypeError):
        import copy

        copy.deepcopy(model)
    plain = kflo.collapse(model)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert rel_err(model.eval()(x), plain.eval()(x)) < 1e-5
    assert kflo.verify_equivalence(model, plain, input_size=(1, 28, 28)).passed
    anonymous = kflo.expand(nn.Sequential(nn.Linear(3, 3)), "kflo")
    anonymous.lock = threading.Lock()
    with pytest.raises(KfloError, match="build it with kflo.create_model"):
        kflo.collapse(anonymous)


def test_a_crashing_plugin_is_named_with_its_layer():
    broken = kflo.RecipeSpec(name="broken-test", description="test", params={}, factory=lambda module: None)
    recipe = kflo.reparam.recipe_from_spec(broken)()
    model = nn.Sequential(nn.Linear(3, 4))
    with pytest.raises(KfloError, match=r"recipe 'broken-test' failed on layer '0' \(AttributeError: .*bug in the recipe"):
        kflo.expand(model, recipe)
    assert type(model[0]) is nn.Linear and not kflo.is_expanded(model)


def test_an_in_process_registration_names_its_origin(monkeypatch):
    import kflo_cli.reparam.registry as registry

    kflo.list_recipes()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    cls = kflo.register_recipe(kflo.reparam.recipe_from_spec(SCALED))
    assert cls.source.startswith("registered by ") and cls.source.endswith("test_pipeline")
    assert kflo.get_recipe("kflo").source == "built-in"
