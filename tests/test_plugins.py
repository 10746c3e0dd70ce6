"""Recipe plugins: the worked example package of docs/writing-a-recipe.md, installed from outside kflo, works end to
end; broken plugins are reported and skipped; `kflo recipes` says where every recipe comes from."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file
from typer.testing import CliRunner

import kflo_cli as kflo
import kflo_cli.reparam as reparam
import kflo_cli.reparam.registry as registry
from kflo_cli.cli import app
from kflo_cli.errors import KfloError
from kflo_cli.reparam import Param, RecipeSpec, recipe_from_spec

from conftest import perturb, rel_err

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

EXAMPLE = Path(__file__).parent / "plugin_example"
DOC = Path(__file__).parent.parent / "docs" / "writing-a-recipe.md"
runner = CliRunner()


def write_dist_info(site: Path, name: str, version: str, entry_points: dict[str, str]) -> None:
    """What an installer leaves on sys.path for importlib.metadata: METADATA and entry_points.txt."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{reparam.ENTRY_POINT_GROUP}]\n{lines}")


def example_entry_points() -> dict[str, str]:
    meta = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
    return meta["project"]["entry-points"][reparam.ENTRY_POINT_GROUP]


@pytest.fixture
def fresh_registry(monkeypatch):
    """A registry with the built-ins only and plugins not yet loaded; restored after the test."""
    reparam.list_recipes()
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_PLUGINS_LOADED", False)
    monkeypatch.setattr(registry, "PLUGIN_ERRORS", [])


@pytest.fixture
def example_installed(tmp_path, monkeypatch, fresh_registry):
    """The example package importable and its entry point visible, as after `pip install`."""
    site = tmp_path / "site"
    write_dist_info(site, "kflo-example-plugin", "0.1.0", example_entry_points())
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "kflo_example_plugin", raising=False)
    return site


def squash(text: str) -> str:
    """Table text without box drawing and line breaks, so wrapped cells can be searched."""
    return re.sub(r"[\s│┃]+", " ", text)


def test_example_plugin_is_listed_with_parameters_and_origin(example_installed):
    r = runner.invoke(app, ["recipes"])
    assert r.exit_code == 0, r.output
    out = squash(r.stdout)
    assert "lowrank_delta" in out and "rank=4 (int)" in out and "decay='base' (str)" in out
    assert "plugin: kflo-example-plugin 0.1.0" in out and "kflo_example_plugin:SPEC" in out
    assert "built-in" in out and "kflo" in out and "warning" not in r.stderr
    assert kflo.get_recipe("lowrank_delta").source.startswith("plugin: kflo-example-plugin 0.1.0")


@pytest.mark.slow
def test_example_plugin_end_to_end_through_the_cli(example_installed, tmp_path):
    exp, plain = tmp_path / "e.safetensors", tmp_path / "p.safetensors"
    r = runner.invoke(app, ["expand", "lenet5", "--recipe", "lowrank_delta:rank=2", "--dry-run"])
    assert r.exit_code == 0 and "lowrank_delta" in r.stdout, r.output
    r = runner.invoke(app, ["expand", "lenet5", "--recipe", "lowrank_delta:rank=2", "-o", str(exp)])
    assert r.exit_code == 0, r.output
    trained = kflo.load(exp)
    perturb(trained, 0.1)  # stand-in for training: the delta factors move away from U = 0
    kflo.save(trained, exp)
    r = runner.invoke(app, ["collapse", str(exp), "-o", str(plain)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["verify-equivalence", str(exp), str(plain)])
    assert r.exit_code == 0 and "PASS" in r.stdout, r.output
    reference = kflo.create_model("lenet5")
    reference.load_state_dict(load_file(str(plain)), strict=True)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert rel_err(trained(x), reference(x)) < 1e-5 and rel_err(trained(x), kflo.create_model("lenet5")(x)) > 1e-3
    r = runner.invoke(app, ["expand", "lenet5", "--recipe", "lowrank_delta:rank=0", "--dry-run"])
    assert r.exit_code == 2 and "the rank must be an integer >= 1" in r.stderr


def test_example_plugin_from_python(example_installed):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))
    kflo.expand(model, "lowrank_delta:rank=3")
    rows = {r.name: r for r in kflo.record(model).plan}
    assert rows["0"].applied and rows["2"].applied
    roles = kflo.param_roles(model)
    assert roles["0.parametrizations.weight.0.up"].weight_decay == "none"
    assert roles["0.parametrizations.weight.0.base"].weight_decay == "default"
    rows = kflo.plan(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2)), "lowrank_delta:rank=2")
    assert rows[0].applied and not rows[1].applied and "not below min(out, fan) = 2" in rows[1].reason
    bad = nn.Sequential(nn.Linear(8, 8))
    with torch.no_grad():
        bad[0].weight[0, 0] = float("nan")
    with pytest.raises(kflo.KfloError, match="non-finite weights; start from a finite checkpoint or --exclude '0'"):
        kflo.expand(bad, "lowrank_delta:rank=2")


def test_example_plugin_gets_every_training_rule_a_built_in_has(example_installed):
    """The trainer reads the plugin's roles and step scales exactly as a built-in recipe's: decay on a factor or on
    the composed weight, and the modified adaptive step."""
    from kflo_cli.train.config import TrainConfig
    from kflo_cli.train.optim import build_param_groups, penalty_rows, total_penalty

    for decay in ("base", "composed"):
        torch.manual_seed(0)
        model = kflo.expand(kflo.create_model("lenet5"), f"lowrank_delta:rank=2,decay={decay}")
        cfg = TrainConfig(weight_decay=1e-3, optimizer="adamw")
        groups = {g.label: g for g in build_param_groups(model, cfg)}
        layers = [m for _, m, _ in kflo.rewritten_layers(model)]
        if decay == "base":
            assert groups["lowrank-base"].weight_decay == 1e-3
            assert float(total_penalty(model, cfg)) == 0.0
        else:
            assert groups["lowrank-base (decay on composed weight)"].weight_decay == 0.0
            expected = sum(0.5 * 1e-3 * m.weight.pow(2).sum() for m in layers)
            assert torch.allclose(total_penalty(model, cfg), expected)
            assert penalty_rows(model, cfg) == [("lowrank_delta: decay/2 * ||composed W||^2 (loss term)", len(layers), 1e-3)]
        assert groups["lowrank-factor"].weight_decay == 0.0 and groups["lowrank-factor"].scaled
        assert not groups[next(k for k in groups if k.startswith("lowrank-base"))].scaled


def test_the_doc_shows_the_example_package_verbatim():
    doc = DOC.read_text()
    for path in (EXAMPLE / "pyproject.toml", EXAMPLE / "kflo_example_plugin" / "__init__.py"):
        assert path.read_text().strip() in doc, f"{path.name} in docs/writing-a-recipe.md is out of date"


def test_broken_plugins_are_reported_and_skipped(tmp_path, monkeypatch, fresh_registry):
    site = tmp_path / "site"
    site.mkdir()
    (site / "kflo_bad_plugins.py").write_text(
        "from kflo_cli.reparam import Param, RecipeSpec\n"
        "NOT_A_RECIPE = 42\n"
        "CLASH = RecipeSpec(name='kflo', description='x', params={}, factory=lambda module: None)\n"
        "BAD_NAME = RecipeSpec(name='bad:name', description='x', params={}, factory=lambda module: None)\n"
    )
    (site / "kflo_raises_on_import.py").write_text("raise RuntimeError('plugin exploded at import')\n")
    write_dist_info(site, "kflo-bad-plugins", "1.0", {
        "missing": "kflo_no_such_module:SPEC",
        "explodes": "kflo_raises_on_import:SPEC",
        "number": "kflo_bad_plugins:NOT_A_RECIPE",
        "clash": "kflo_bad_plugins:CLASH",
        "badname": "kflo_bad_plugins:BAD_NAME",
    })
    monkeypatch.syspath_prepend(str(site))
    r = runner.invoke(app, ["recipes"])
    assert r.exit_code == 0, r.output
    assert "kflo" in r.stdout and "compander" in r.stdout
    for name, fragment in [("missing", "ModuleNotFoundError"), ("explodes", "plugin exploded at import"),
                           ("number", "neither a recipe spec nor a Recipe subclass"),
                           ("clash", "a recipe named 'kflo' is already registered"), ("badname", "must be a non-empty")]:
        assert re.search(rf"warning: plugin '{name}' was skipped: .*{fragment}", r.stderr), (name, r.stderr)
    assert kflo.get_recipe("kflo").source == "built-in"
    r = runner.invoke(app, ["expand", "lenet5", "--recipe", "kflo", "--dry-run"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["expand", "lenet5", "--recipe", "explodes", "--dry-run"])
    assert r.exit_code == 2 and "comes from a plugin that failed to load" in r.stderr and "plugin exploded" in r.stderr


def test_entry_point_may_be_a_recipe_class_or_a_factory_function(tmp_path, monkeypatch, fresh_registry):
    site = tmp_path / "site"
    site.mkdir()
    (site / "kflo_class_plugin.py").write_text(
        "import types\n"
        "from kflo_cli.reparam.weightnorm import WeightNorm\n"
        "from kflo_cli.reparam import RecipeSpec\n"
        "from kflo_cli.reparam.powerprop import PowerpropParametrization\n"
        "class MyNorm(WeightNorm):\n    name = 'mynorm'\n    description = 'weight norm under another name'\n"
        "def spec():\n"
        "    return RecipeSpec(name='cube', description='w = v^3', params={},\n"
        "                      factory=lambda module: PowerpropParametrization(module.weight.shape, 3.0))\n"
        "def power(module, alpha):\n    return PowerpropParametrization(module.weight.shape, alpha)\n"
        "AS_DICT = {'name': 'power_dict', 'description': 'd', 'params': {'alpha': 2.0}, 'factory': power}\n"
        "AS_OBJECT = types.SimpleNamespace(name='power_ns', params={'alpha': 3.0}, factory=power)\n"
    )
    write_dist_info(site, "kflo-class-plugin", "2.0", {
        "mynorm": "kflo_class_plugin:MyNorm", "cube": "kflo_class_plugin:spec",
        "power_dict": "kflo_class_plugin:AS_DICT", "power_ns": "kflo_class_plugin:AS_OBJECT"})
    monkeypatch.syspath_prepend(str(site))
    assert kflo.get_recipe("mynorm").source == "plugin: kflo-class-plugin 2.0 (kflo_class_plugin:MyNorm)"
    model = nn.Sequential(nn.Linear(3, 2).double())
    x = torch.randn(4, 3, dtype=torch.float64)
    y0 = model(x)
    kflo.expand(model, "cube")
    assert rel_err(y0, model(x)) < 1e-12
    assert registry.PLUGIN_ERRORS == []
    # Duck-typed specs (a dict, any object with the fields) with plain defaults as parameters.
    assert kflo.get_recipe("power_dict").params["alpha"].default == 2.0
    recipe = kflo.create_recipe("power_ns:alpha=1.5")
    assert recipe.values == {"alpha": 1.5} and recipe.source.startswith("plugin: kflo-class-plugin 2.0")
    with pytest.raises(KfloError, match="not a valid float"):
        kflo.create_recipe("power_ns:alpha=x")


def test_recipe_from_spec_validates_fields():
    with pytest.raises(TypeError, match="parameter 'r' must be a kflo_cli.reparam.Param or a bool/int/float/str"):
        recipe_from_spec(RecipeSpec(name="x", description="d", params={"r": [3]}, factory=lambda m: None))
    with pytest.raises(TypeError, match="must be callable"):
        recipe_from_spec(RecipeSpec(name="x", description="d", params={}, factory=None))
    cls = recipe_from_spec(RecipeSpec(name="x", description="d", params={"r": Param(int, 1, "r")}, factory=lambda m, r: None))
    assert cls.name == "x" and cls(r="2").values == {"r": 2}
    with pytest.raises(KfloError, match="has no parameter q"):
        cls(q=1)


@pytest.mark.slow
def test_installed_with_pip_from_outside_the_package(tmp_path):
    """A real installation into a separate directory and fresh processes: what a user of a plugin does."""
    src, site = tmp_path / "src", tmp_path / "site"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
           "--target", str(site), str(src)]
    done = subprocess.run(pip, capture_output=True, text=True)
    if done.returncode != 0 and ("No module named 'setuptools'" in done.stderr or "setuptools.build_meta" in done.stderr):
        pytest.skip("pip cannot build without setuptools in this environment (no build isolation offline)")
    assert done.returncode == 0, done.stderr
    env = {**os.environ, "PYTHONPATH": str(site), "COLUMNS": "250"}
    kflo_cmd = [sys.executable, "-m", "kflo_cli"]
    listing = subprocess.run([*kflo_cmd, "recipes"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert listing.returncode == 0, listing.stderr
    assert "lowrank_delta" in listing.stdout and "kflo-example-plugin 0.1.0" in squash(listing.stdout)
    exp, plain = tmp_path / "e.safetensors", tmp_path / "p.safetensors"
    script = (f"{' '.join(kflo_cmd)} expand lenet5 --recipe lowrank_delta:rank=2 -o {exp} && "
              f"{' '.join(kflo_cmd)} collapse {exp} -o {plain} && "
              f"{' '.join(kflo_cmd)} verify-equivalence {exp} {plain}")
    chain = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert chain.returncode == 0 and "PASS" in chain.stdout, chain.stdout + chain.stderr
    kflo.create_model("lenet5").load_state_dict(load_file(str(plain)), strict=True)
