"""Mixed precision and torch.compile with every built-in recipe: training runs, the weights move, and the
collapse afterwards is exact (the end-of-training verification, in float32 against the stated tolerance)."""

from __future__ import annotations

import json

import pytest
import torch
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


@pytest.mark.parametrize("recipe", ["kflo", "expandnet-ck", "doconv", None])
def test_accumulate_gives_the_whole_batch_gradient(tmp_path, recipe):
    # LeNet-5 has no BatchNorm, so a batch's gradient is the weighted sum of its micro-batches': training with
    # --accumulate 4 (each kernel composed once per step, its gradient accumulated) must end where the plain run does
    from safetensors.torch import load_file

    ends = []
    for accumulate in ("1", "4"):
        run = tmp_path / f"a{accumulate}"
        args = ["train", "lenet5", *(["--recipe", recipe] if recipe else []), *TINY, "--accumulate", accumulate,
                "-o", str(run)]
        r = runner.invoke(app, args)
        assert r.exit_code == 0, r.output
        ends.append(load_file(str(run / "last.safetensors")))
    assert ends[0].keys() == ends[1].keys()
    for key in ends[0]:
        torch.testing.assert_close(ends[1][key], ends[0][key], rtol=1e-4, atol=1e-5, msg=key)


def test_accumulate_is_bounded(tmp_path):
    r = runner.invoke(app, ["train", "lenet5", *TINY, "--accumulate", "64", "-o", str(tmp_path / "r")])
    assert r.exit_code == 2 and "--accumulate 64 is out of range" in r.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_accumulate_under_compile_gives_the_whole_batch_gradient(tmp_path):
    # the compiled forward reads the composed kernels as leaves from parametrize's cache: it must see the leaves of
    # each step (not a constant captured at the first), so the run ends where the uncompiled plain run does
    ends = []
    for flags in ([], ["--accumulate", "4", "--compile"]):
        run = tmp_path / ("plain" if not flags else "compiled")
        r = runner.invoke(app, ["train", "lenet5", "--recipe", "kflo:decay=factors", *TINY, *flags, "-o", str(run)])
        assert r.exit_code == 0, r.output
        ends.append(load_file(str(run / "last.safetensors")))
    for key in ends[0]:
        torch.testing.assert_close(ends[1][key], ends[0][key], rtol=1e-4, atol=1e-5, msg=key)


def _resumed_equals_uninterrupted(tmp_path, recipe: str, *flags: str) -> None:
    """A run stopped after 5 steps and resumed ends bit for bit where the uninterrupted run ends: the weights, the
    EMA, and (with --amp, --compile) whatever the precision and the compiler change."""
    common = ["train", "lenet5", "--recipe", recipe, *flags, *TINY[:-4], "--epochs", "2", "--threads", "1", "--ema", "0.9"]
    r = runner.invoke(app, [*common, "-o", str(tmp_path / "full")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, [*common, "--stop-after-steps", "5", "-o", str(tmp_path / "part")])
    assert r.exit_code == 130, r.output
    r = runner.invoke(app, ["train", "--resume", str(tmp_path / "part")])
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "part" / "config.json").read_text())
    assert all(config[k] for k in ("ema", *(f.lstrip("-") for f in flags)))  # resume kept the options
    for name in ("last", "ema", "collapsed"):
        a = load_file(str(tmp_path / "full" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "part" / f"{name}.safetensors"))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert json.loads((tmp_path / "part" / "verification.json").read_text())["verification"]["passed"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_amp_with_ema_resumes_exactly_for_every_recipe(tmp_path, recipe):
    _resumed_equals_uninterrupted(tmp_path, recipe, "--amp")


@pytest.mark.slow
def test_compile_with_amp_and_ema_resumes_exactly(tmp_path):
    _resumed_equals_uninterrupted(tmp_path, "kflo:decay=factors", "--compile", "--amp")
