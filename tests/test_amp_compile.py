"""Mixed precision and torch.compile with every built-in recipe: training runs, the weights move, and the
collapse afterwards is exact (the end-of-training verification, in float32 against the stated tolerance)."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from kflo_cli.cli import app

runner = CliRunner()
TINY = ["--data", "digits", "--train-fraction", "0.2", "--batch-size", "32", "--epochs", "1", "--threads", "1"]

# every built-in recipe, on LeNet-5 (5x5 convolutions and three Linear layers: each recipe finds layers there)
RECIPES = ["kflo", "kflo:decay=factors", "expandnet-cl", "expandnet-ck", "expandnet-fc:classifier=expand", "doconv",
           "acnet", "compander", "powerprop", "weightnorm"]


def _trained(tmp_path, recipe: str, *flags: str) -> dict:
    run = tmp_path / "run"
    r = runner.invoke(app, ["train", "lenet5", "--recipe", recipe, *flags, *TINY, "-o", str(run)])
    assert r.exit_code == 0, r.output
    report = json.loads((run / "verification.json").read_text())
    assert report["strict_load"] and report["verification"]["passed"], report["verification"]
    assert report["verification"]["rtol"] == 1e-5 and report["verification"]["rel_error"] < 1e-5
    # the weights moved: the deployed model differs from the untrained start the run recorded
    start = runner.invoke(app, ["expand", "lenet5", "--recipe", recipe, "-o", str(tmp_path / "start.safetensors")])
    assert start.exit_code == 0, start.output
    return report


@pytest.mark.parametrize("recipe", RECIPES)
def test_amp_trains_every_recipe_and_collapses_exactly(tmp_path, recipe):
    _trained(tmp_path, recipe, "--amp")
    trained = load_file(str(tmp_path / "run" / "last.safetensors"))
    start = load_file(str(tmp_path / "start.safetensors"))
    moved = [k for k in trained if k in start and trained[k].is_floating_point() and not trained[k].equal(start[k])]
    assert moved, "no parameter changed in training"


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["kflo:decay=factors", "acnet"])
def test_compile_trains_and_collapses_exactly(tmp_path, recipe):
    # KFLO with auto execution forms (a Python-side choice per input shape under the compiler) and a structural
    # recipe; torch.compile needs a C++ compiler on CPU, and takes about a minute here
    _trained(tmp_path, recipe, "--compile")
