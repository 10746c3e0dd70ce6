"""Transfer learning (ExpandNets/KFLO transfer settings): ``--init-from`` a checkpoint trained for another class
count starts every tensor but the classifier, for a vanilla model, every recipe and KFLO's stacking; the terminal
says so. A checkpoint that differs anywhere else is still another architecture and refused."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import kflo_cli as kflo
from kflo_cli.checkpoint import classifier_mismatch
from kflo_cli.cli import app
from kflo_cli.errors import KfloError

HEAD = ("classifier.4.weight", "classifier.4.bias")  # LeNet-5's classifier


def _source(path, num_classes: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    """A 'pretrained' LeNet-5 for another task: weights moved away from their initialisation, saved."""
    torch.manual_seed(seed)
    model = kflo.create_model("lenet5", num_classes=num_classes)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    kflo.save(model, path)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _prepare(tmp_path, recipe: list[str], init_from: list[str], fraction: float = 0.4):
    from kflo_cli.train import resolve_config
    from kflo_cli.train.source import prepare

    config = resolve_config({"source": "lenet5", "recipe": recipe, "init_from": init_from, "data": "digits",
                             "train_fraction": fraction, "in_chans": 1, "img_size": 28, "seed": 0})
    return prepare(config)


@pytest.mark.parametrize("recipe", [None, *(r.name for r in kflo.list_recipes())])
def test_every_recipe_starts_from_another_tasks_network_with_a_fresh_classifier(tmp_path, recipe):
    """The run started from a 3-class network is exactly the run started from the same network with the seeded
    fresh 10-class classifier in place of its own: every expanded tensor equal, for every recipe."""
    source = _source(tmp_path / "three.safetensors")
    recipes = [recipe] if recipe else []
    prepared = _prepare(tmp_path, recipes, [str(tmp_path / "three.safetensors")])
    assert "trained for 3 classes and this model has 10" in prepared.note
    assert "classifier.4.weight" in prepared.note
    torch.manual_seed(0)  # the run's seed: what its model starts from
    reference = kflo.create_model("lenet5", num_classes=10)
    reference.load_state_dict({**source, **{k: reference.state_dict()[k] for k in HEAD}})
    kflo.save(reference, tmp_path / "ten.safetensors")
    expected = _prepare(tmp_path, recipes, [str(tmp_path / "ten.safetensors")])
    assert "classes" not in expected.note
    got, want = prepared.model.state_dict(), expected.model.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert prepared.data.num_classes == 10


def test_a_function_preserving_expansion_starts_at_the_source_network(tmp_path):
    source = _source(tmp_path / "three.safetensors")
    plain = kflo.collapse(_prepare(tmp_path, ["kflo:depth=2,width=4"], [str(tmp_path / "three.safetensors")]).model)
    for key, value in source.items():
        if key not in HEAD:  # float64 composition: equal to rounding
            torch.testing.assert_close(plain.state_dict()[key].float(), value, rtol=1e-5, atol=1e-6, msg=key)


def test_the_fresh_classifier_is_the_seeded_initialisation(tmp_path):
    _source(tmp_path / "three.safetensors")
    torch.manual_seed(0)
    reference = kflo.create_model("lenet5", num_classes=10)
    prepared = _prepare(tmp_path, [], [str(tmp_path / "three.safetensors")])
    for key in HEAD:
        assert torch.equal(prepared.model.state_dict()[key], reference.state_dict()[key])
    full = _prepare(tmp_path, [], [str(tmp_path / "three.safetensors")], fraction=1.0)
    assert 0.38 < len(prepared.data.train) / len(full.data.train) < 0.42  # --train-fraction 0.4 of each class


def test_kflo_stacking_skips_the_classifier_of_networks_for_another_task(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    first, second = _source(a, seed=1), _source(b, seed=2)
    prepared = _prepare(tmp_path, ["kflo:width=2"], [str(a), str(b)])
    assert "stacked 2 pretrained networks into W_1 of 4 layers" in prepared.note  # 5 layers, the classifier not
    model = prepared.model
    for name in ("features.0", "features.3", "classifier.0", "classifier.2"):
        w1 = model.get_submodule(name).parametrizations.weight[0].w1
        out = first[f"{name}.weight"].shape[0]
        assert torch.equal(w1[out:2 * out], second[f"{name}.weight"].reshape(out, -1)), name
    head = model.get_submodule("classifier.4").weight
    assert head.shape == (10, 84) and not torch.allclose(head[:3], first["classifier.4.weight"])


def test_the_terminal_says_the_classifier_was_reinitialised(tmp_path):
    _source(tmp_path / "three.safetensors")
    r = CliRunner().invoke(app, ["train", "lenet5", "--recipe", "kflo", "--init-from", str(tmp_path / "three.safetensors"),
                                 "--data", "digits", "--train-fraction", "0.4", "--epochs", "1", "--threads", "1",
                                 "--stop-after-steps", "2", "-o", str(tmp_path / "run")], env={"COLUMNS": "300"})
    assert r.exit_code in (0, 130), r.output
    assert "trained for 3 classes and this model has 10" in " ".join(r.output.split())


def test_expand_reinitialises_the_classifier_too(tmp_path):
    _source(tmp_path / "three.safetensors")
    out = tmp_path / "e.safetensors"
    r = CliRunner().invoke(app, ["expand", "lenet5", "--recipe", "acnet", "--init-from", str(tmp_path / "three.safetensors"),
                                 "-o", str(out)], env={"COLUMNS": "300"})
    assert r.exit_code == 0, r.output
    assert "starts from a fresh initialisation" in " ".join(r.output.split()) and out.exists()


def test_other_differences_are_still_another_architecture(tmp_path):
    torch.manual_seed(0)
    model = kflo.create_model("lenet5", num_classes=10)
    state = model.state_dict()
    rgb = {**state, "features.0.weight": torch.zeros(6, 3, 5, 5)}  # another in_chans: not a classifier difference
    assert classifier_mismatch(model, rgb) is None
    hidden = {**state, "classifier.2.weight": torch.zeros(50, 120), "classifier.2.bias": torch.zeros(50)}
    assert classifier_mismatch(model, hidden) is None  # the model's side (84) is not its class count (10)
    assert classifier_mismatch(model, state) is None  # nothing differs
    head = {**state, "classifier.4.weight": torch.zeros(4, 84), "classifier.4.bias": torch.zeros(4)}
    assert classifier_mismatch(model, head) == (list(HEAD)[::-1], 4, 10)
    kflo.save(kflo.create_model("lenet5", num_classes=10, in_chans=3), tmp_path / "rgb.safetensors")
    with pytest.raises(KfloError, match="does not fit this model"):
        kflo.load_plain_weights(model, tmp_path / "rgb.safetensors", new_classifier=True)
    _source(tmp_path / "three.safetensors")
    with pytest.raises(KfloError, match="does not fit this model"):  # the library default stays strict
        kflo.load_plain_weights(model, tmp_path / "three.safetensors")
