"""`kflo bench`: side-by-side measurements of an expansion against the vanilla model."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kflo_cli.bench import bench, with_mode
from kflo_cli.cli import app
from kflo_cli.errors import KfloError

runner = CliRunner()


def test_bench_measures_both_models_and_collapses_to_the_original_size():
    r = bench("lenet5", ["kflo"], batch_size=8, steps=2, warmup=1)
    assert r.params_collapsed == r.params_vanilla == 61_706  # LeNet-5 with 10 classes
    assert r.params_training > r.params_vanilla
    # KFLO 2x4 composes each kernel once per batch (eval: every layer picks the kernel at batch 8): more MACs per
    # image than vanilla, fewer than the paper's feature form (W_1 with 4x the output channels on every position)
    assert r.macs_feature_form > r.macs_executed > r.macs_vanilla > 0
    assert r.step_vanilla.samples == r.step_expanded.samples == 2
    assert r.step_ratio == pytest.approx(r.step_expanded.median / r.step_vanilla.median)
    assert r.step_ratio_min == pytest.approx(r.step_expanded.min / r.step_vanilla.min)
    # the expansion holds ~5x the parameters (+ momentum): its resident bytes alone exceed vanilla's
    assert r.memory_expanded > r.memory_vanilla > 0
    # the target's allowance: 1.3x vanilla's peak + the extra state, float32 parameter + gradient + SGD momentum
    extra = 4 * 3 * (r.params_training - r.params_vanilla)
    assert r.memory_allowance == int(1.3 * r.memory_vanilla + extra)
    assert r.memory_within_target == (r.memory_expanded <= r.memory_allowance)
    assert r.expand_seconds > 0 and r.collapse_seconds > 0
    assert {row["recipe"] for row in r.layers} == {"kflo"} and len(r.layers) == 5


def test_feature_form_macs_are_reported_for_recipes_with_a_mode():
    r = bench("smallnet_k7", ["expandnet-ck:rate=4,init=random"], batch_size=4, steps=1, warmup=0,
              input_size=(3, 16, 16))
    assert r.macs_feature_form is not None and r.macs_feature_form > r.macs_vanilla
    assert r.recipes == ["expandnet-ck:rate=4,init=random"]
    assert r.input_size == [3, 16, 16]  # the zoo model was built for 16x16 (img_size), as kflo train does
    with pytest.raises(KfloError, match="does not take inputs of size 1,16"):
        bench("smallnet_k7", ["expandnet-ck:rate=4,init=random"], batch_size=4, steps=1, warmup=0, input_size=(1, 16))


def test_with_mode_adds_the_mode_only_where_a_recipe_has_one():
    assert with_mode(["expandnet-ck:rate=4", "acnet"], "feature") == ["expandnet-ck:rate=4,mode=feature", "acnet"]
    assert with_mode(["expandnet-fc"], "kernel") == ["expandnet-fc:mode=kernel"]
    assert with_mode(["kflo"], None) == ["kflo"]
    assert with_mode(["kflo:2x4"], "auto") == ["kflo:2x4,mode=auto"]
    with pytest.raises(KfloError, match="contradicts"):
        with_mode(["expandnet-ck:mode=kernel"], "feature")
    with pytest.raises(KfloError, match="unknown"):
        with_mode(["expandnet-ck"], "fastest")
    with pytest.raises(KfloError, match="none of the recipes"):
        with_mode(["acnet", "compander"], "feature")


def test_bench_cli_writes_json_and_refuses_bad_options(tmp_path):
    out = tmp_path / "b.json"
    r = runner.invoke(app, ["bench", "lenet5", "--recipe", "kflo", "--steps", "1", "--warmup", "0", "--batch-size", "4",
                            "--threads", "1", "--json", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert data["params_collapsed"] == data["params_vanilla"] and data["step_vanilla"]["samples"] == 1
    assert "training step" in r.output and "peak training memory" in r.output
    for args, needle in ((["--batch-size", "0"], "--batch-size 0 is out of range"),
                         (["--steps", "0"], "--steps 0 is out of range"),
                         (["--input-size", "1,99999,28"], "--input-size 1,99999,28 is out of range"),
                         (["--threads", "0"], "--threads 0 is out of range")):
        r = runner.invoke(app, ["bench", "lenet5", "--recipe", "kflo", *args, "--json", str(tmp_path / "x.json")])
        assert r.exit_code == 2 and needle in r.stderr and r.stderr.count("\n") == 1, r.output
        assert not (tmp_path / "x.json").exists()


def test_bench_reports_each_layers_execution_form():
    # batch 1, KFLO with the decay on W_1: a 28x28 convolution composes its kernel (784 positions share it), while a
    # Linear layer seen once per step is cheaper through its factors than composing out x R x F
    r = bench("lenet5", ["kflo:decay=factors"], batch_size=1, steps=1, warmup=0)
    forms = {row["layer"]: row["form"] for row in r.layers}
    assert forms == {"features.0": "kernel", "features.3": "kernel", "classifier.0": "feature",
                     "classifier.2": "feature", "classifier.4": "feature"}
    # the paper's decay on W' composes every kernel anyway: every layer runs on it
    r = bench("lenet5", ["kflo"], batch_size=1, steps=1, warmup=0)
    assert {row["form"] for row in r.layers} == {"kernel"}


def test_bench_runs_both_models_with_accumulation_and_bounds_it():
    r = bench("lenet5", ["kflo"], batch_size=8, steps=1, warmup=0, accumulate=4)
    assert r.accumulate == 4 and r.step_ratio > 0 and r.params_collapsed == r.params_vanilla
    with pytest.raises(KfloError, match="--accumulate 16 is out of range"):
        bench("lenet5", ["kflo"], batch_size=8, steps=1, warmup=0, accumulate=16)


def test_compare_modes_times_every_mode_in_the_same_rounds():
    from kflo_cli.bench import compare_modes

    # batch 1, KFLO with the decay on W_1: auto runs LeNet-5's Linear layers through their factors (as
    # test_bench_reports_each_layers_execution_form shows), kernel none, feature every layer
    r = compare_modes("lenet5", ["kflo:decay=factors"], batch_size=1, steps=2, warmup=0)
    rows = {row.mode: row for row in r.rows}
    assert list(rows) == ["kernel", "feature", "auto"] and not r.skipped
    assert r.vanilla.samples == 2 and all(row.step.samples == 2 for row in r.rows)
    assert rows["kernel"].feature_layers == [] and len(rows["feature"].feature_layers) == rows["feature"].layers == 5
    assert rows["auto"].feature_layers == ["classifier.0", "classifier.2", "classifier.4"]
    for row in r.rows:
        assert row.ratio == pytest.approx(row.step.median / r.vanilla.median)
        assert row.ratio_min == pytest.approx(row.step.min / r.vanilla.min)
    best = min((rows["kernel"], rows["feature"]), key=lambda row: row.step.median)
    assert r.best_fixed == best.mode
    assert r.auto_vs_best == pytest.approx(rows["auto"].step.median / best.step.median)
    assert r.auto_within == (r.auto_vs_best <= 1.05)
    assert r.to_dict()["auto_within"] == r.auto_within


def test_compare_modes_skips_a_mode_a_recipe_refuses_and_needs_a_recipe_with_modes():
    from kflo_cli.bench import compare_modes

    with pytest.raises(KfloError, match="none of the recipes .* has an execution mode; drop --compare-modes"):
        compare_modes("lenet5", ["acnet"], batch_size=2, steps=1, warmup=0)
    with pytest.raises(KfloError, match="mode fastest is unknown"):
        compare_modes("lenet5", ["kflo"], modes=("fastest",), batch_size=2, steps=1, warmup=0)
    r = compare_modes("lenet5", ["kflo"], modes=("kernel", "auto"), batch_size=2, steps=1, warmup=0)
    assert [row.mode for row in r.rows] == ["kernel", "auto"] and r.best_fixed == "kernel"
    # a spec that names its mode is timed in that mode only; the others are reported as skipped, with the reason
    r = compare_modes("lenet5", ["kflo:mode=kernel"], batch_size=2, steps=1, warmup=0)
    assert [row.mode for row in r.rows] == ["kernel"] and set(r.skipped) == {"feature", "auto"}
    assert "contradicts kflo:mode=kernel" in r.skipped["auto"] and r.auto_vs_best is None and r.auto_within is None


def test_bench_cli_compares_modes_and_refuses_it_with_mode(tmp_path):
    out = tmp_path / "m.json"
    r = runner.invoke(app, ["bench", "lenet5", "--recipe", "kflo:decay=factors", "--compare-modes", "--steps", "1",
                            "--warmup", "0", "--batch-size", "2", "--threads", "1", "--json", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    assert [row["mode"] for row in data["rows"]] == ["kernel", "feature", "auto"]
    assert "the faster fixed form" in r.output and "bound" in r.output
    r = runner.invoke(app, ["bench", "lenet5", "--recipe", "kflo", "--compare-modes", "--mode", "auto",
                            "--json", str(tmp_path / "x.json")])
    assert r.exit_code == 2 and "--mode and --compare-modes contradict" in r.stderr, r.output
    assert not (tmp_path / "x.json").exists()
