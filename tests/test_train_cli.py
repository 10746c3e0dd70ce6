"""`kflo train` and `kflo quickstart` from the command line: signals, precedence, refusals, the main job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from kflo_cli.cli import app
from kflo_cli.train import TrainingInterrupted, resume
from kflo_cli.train.state import load_state

from conftest import scaled_timeout

runner = CliRunner()
FAST = ["--data", "digits", "--threads", "1", "--batch-size", "32"]


@pytest.mark.slow
def test_sigint_finishes_the_step_saves_and_exits_130(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "kflo_cli", "train", "lenet5", "--recipe", "kflo", "--epochs", "50", *FAST, "-o", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "COLUMNS": "200"})
    try:
        deadline = time.monotonic() + scaled_timeout(120)
        while not (run / "state.safetensors").exists():  # written once training is about to start
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never started"
            time.sleep(0.05)
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=scaled_timeout(120))
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, (out, err)
    assert f"kflo train --resume {run}" in err and "SIGINT" in err and "Traceback" not in err
    info = load_state(run)["info"]
    assert 0 < info["global_step"] and info["epoch"] < 50 and not info["finished"]
    # the saved state resumes: one more step, then stop again
    with pytest.raises(TrainingInterrupted):
        resume(run, stop_after_steps=info["global_step"] + 1, progress=False)
    assert load_state(run)["info"]["global_step"] == info["global_step"] + 1


def test_cli_beats_recipe_file_beats_defaults(tmp_path):
    recipe = tmp_path / "mine.toml"
    recipe.write_text('[[recipe]]\nname = "kflo"\ndepth = 2\nwidth = 2.0\n\n[train]\nlr = 0.1\nepochs = 3\nmilestones = [2]\nschedule = "multistep"\n')
    run = tmp_path / "run"
    r = runner.invoke(app, ["train", "lenet5", "--recipe-file", str(recipe), "--lr", "0.2", *FAST, "-o", str(run), "--stop-after-steps", "1"])
    assert r.exit_code == 130, r.output
    config = json.loads((run / "config.json").read_text())
    assert (config["lr"], config["epochs"], config["schedule"], config["milestones"]) == (0.2, 3, "multistep", [2])
    assert config["batch_size"] == 32 and config["weight_decay"] == 5e-4  # command line and built-in default
    assert "kflo-w1" in r.output and "kflo: decay/2 * ||composed W||^2" in r.output  # the parameter-group table
    # the settings the recipe file gave are printed at the start and recorded (--lr came from the command line)
    assert f"from recipe file {recipe}: epochs=3, milestones=[2], schedule=multistep\n" in r.output
    assert config["from_recipe_file"] == {"epochs": 3, "milestones": [2], "schedule": "multistep"}
    # reusing the directory needs --resume or --overwrite; --resume refuses changed options
    r = runner.invoke(app, ["train", "lenet5", *FAST, "-o", str(run)])
    assert r.exit_code == 2 and "--overwrite" in r.stderr
    r = runner.invoke(app, ["train", "--resume", str(run), "--lr", "0.3"])
    assert r.exit_code == 2 and "--lr differ" in r.stderr
    r = runner.invoke(app, ["train", "lenet5", "--resume", str(run)])
    assert r.exit_code == 2 and "drop SOURCE" in r.stderr


def _cli_sample(name, field, hint):
    """Command-line words giving option ``name`` a non-default value, and the value TrainConfig should get."""
    import types
    import typing

    option = "--" + name.replace("_", "-")
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
    base = [a for a in typing.get_args(hint) if a is not type(None)][0] if optional else hint
    if field.metadata["comma_list"] is not None:
        kind = field.metadata["comma_list"]
        return [option, "3,4"], [kind(3), kind(4)]
    if base is bool:
        return ([f"--no-{option[2:]}"], False) if field.default else ([option], True)
    if base is int:
        return [option, "7"], 7
    if base is float:
        return [option, "0.25"], 0.25
    if base is str:
        return ([] if field.metadata["argument"] else [option]) + ["abc"], "abc"
    assert typing.get_args(base) == (str,), f"{name}: add a sample for {hint}"
    return [option, "a", option, "b"], ["a", "b"]


def test_train_options_are_built_from_train_config(monkeypatch):
    """One definition: every TrainConfig field is an option of `kflo train` with its help, type and default, and
    the command has no training option that TrainConfig lacks."""
    import dataclasses
    import typing

    import typer.main
    from rich.markup import escape

    import kflo_cli.train.commands as commands
    from kflo_cli.train.config import FIELDS, OPTIONS, TrainConfig, resolve_config

    command = typer.main.get_command(app).commands["train"]
    params = {p.name: p for p in command.params}
    assert set(params) == set(OPTIONS) | {"output", "resume", "overwrite", "stop_after_steps"}
    assert set(FIELDS) - set(OPTIONS) == {"from_recipe_file"}  # recorded by a run, not set by anyone
    for name, field in OPTIONS.items():
        assert params[name].help.startswith(escape(field.metadata["help"])), name
        if not field.metadata["argument"]:
            assert params[name].opts[0] == "--" + name.replace("_", "-"), name
    seen = {}
    monkeypatch.setattr(commands, "run_train", lambda **kw: seen.update(kw) or 0)
    # nothing given: every option arrives as "not given", so TrainConfig's own defaults apply
    assert runner.invoke(app, ["train"]).exit_code == 0
    assert set(seen["overrides"]) == set(OPTIONS) and all(v is None for v in seen["overrides"].values())
    assert resolve_config(seen["overrides"]) == TrainConfig()
    # every option given: each arrives as the value (and type) its field holds
    hints = typing.get_type_hints(TrainConfig)
    words, expected = [], {}
    for name, field in OPTIONS.items():
        said, expected[name] = _cli_sample(name, field, hints[name])
        words += said
    r = runner.invoke(app, ["train", *words])
    assert r.exit_code == 0, r.output
    assert seen["overrides"] == expected
    for name, value in expected.items():
        default = field.default_factory() if (field := OPTIONS[name]).default is dataclasses.MISSING else field.default
        assert value != default and type(value) is type(default) or default is None, name


def test_user_errors_are_one_line(tmp_path):
    r = runner.invoke(app, ["train", "lenet5", "--optimizer", "rmsprop", "-o", str(tmp_path / "r")])
    assert r.exit_code == 2 and r.stderr.startswith("error: --optimizer 'rmsprop' is not one of sgd, adamw")
    r = runner.invoke(app, ["train", "lenet5"])
    assert r.exit_code == 2 and "-o RUN_DIR" in r.stderr
    r = runner.invoke(app, ["train", "lenet5", "--milestones", "a,b", "-o", str(tmp_path / "r")])
    assert r.exit_code == 2 and "--milestones" in r.stderr
    r = runner.invoke(app, ["train", "lenet5", "--decay-on", "composed", "-o", str(tmp_path / "r")])
    assert r.exit_code == 2 and "No such option: --decay-on" in r.stderr  # now a recipe parameter (docs/training.md)


def test_non_finite_values_and_bad_recipe_file_values_are_named(tmp_path):
    for flag, value in (("--warmup-epochs", "inf"), ("--gamma", "nan"), ("--kd-temperature", "inf")):
        r = runner.invoke(app, ["train", "lenet5", flag, value, "-o", str(tmp_path / "r")])
        assert r.exit_code == 2 and r.stderr == f"error: {flag} {value} is not a finite number; give a finite value\n"
    recipe = tmp_path / "bad.toml"
    recipe.write_text('[[recipe]]\nname = "kflo"\n\n[train]\nepochs = 0\n')
    r = runner.invoke(app, ["train", "lenet5", "--recipe-file", str(recipe), "-o", str(tmp_path / "r")])
    assert r.exit_code == 2 and f"{recipe} [train]: epochs = 0 is invalid" in r.stderr and "--epochs" in r.stderr
    assert not (tmp_path / "r").exists()


def test_a_teacher_name_that_contradicts_its_checkpoint_is_refused(tmp_path):
    teacher = tmp_path / "teacher.safetensors"
    r = runner.invoke(app, ["expand", "lenet5", "--recipe", "kflo", "-o", str(teacher)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train", "lenet5", "--teacher", "resnet18", "--teacher-checkpoint", str(teacher), *FAST,
                            "-o", str(tmp_path / "r")])
    assert r.exit_code == 2 and "--teacher resnet18 does not match" in r.stderr and "timm:lenet5" in r.stderr
    assert not (tmp_path / "r").exists()


def test_interrupted_quickstart_exits_130_without_a_stale_resume_hint(tmp_path, monkeypatch):
    import kflo_cli.train.quickstart as qs

    def interrupted(output, **_):
        raise TrainingInterrupted(tmp_path / "gone" / "vanilla", 0, 3, "received SIGINT")

    monkeypatch.setattr(qs, "quickstart", interrupted)
    r = runner.invoke(app, ["quickstart"])
    assert r.exit_code == 130 and "received SIGINT" in r.stderr and "--resume" not in r.stderr
    assert "run kflo quickstart again" in r.stderr
    r = runner.invoke(app, ["quickstart", "-o", str(tmp_path / "kept")])
    assert r.exit_code == 130 and f"kflo train --resume {tmp_path / 'gone' / 'vanilla'}" in r.stderr


@pytest.mark.slow
def test_quickstart_prints_both_accuracies_and_the_verification(tmp_path):
    # 6 epochs at the quickstart's batch of 64: as many steps as 3 epochs at its former batch of 32
    r = runner.invoke(app, ["quickstart", "--epochs", "6", "-o", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert "vanilla" in r.output and "KFLO 2x4, collapsed" in r.output and "PASS" in r.output
    kflo_run = json.loads((tmp_path / "kflo-2x4" / "summary.json").read_text())
    vanilla_run = json.loads((tmp_path / "vanilla" / "summary.json").read_text())
    # both learn the digits (10 classes: chance is 10 %); the KFLO number is the collapsed plain model's
    assert kflo_run["collapsed"]["strict_load"] and kflo_run["collapsed"]["test_acc"] > 80
    assert vanilla_run["kind"] == "vanilla" and vanilla_run["final_test_acc"] > 80
    assert f"{kflo_run['collapsed']['test_acc']:.2f}%" in r.output and f"{vanilla_run['final_test_acc']:.2f}%" in r.output


def test_a_teacher_trained_at_another_resolution_gets_resized_batches(tmp_path):
    # the digits sweep's case: an 8x8 Cifar-quick teacher (digits at their own size) for a 28x28 LeNet-5 student
    teacher_run = tmp_path / "teacher"
    r = runner.invoke(app, ["train", "cifar_quick", *FAST, "--epochs", "1", "--img-size", "8", "-o", str(teacher_run)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["train", "lenet5", *FAST, "--epochs", "1", "--teacher-checkpoint",
                            str(teacher_run / "last.safetensors"), "-o", str(tmp_path / "student")])
    assert r.exit_code == 0, r.output
    assert "the teacher reads 8x8 images" in " ".join(r.output.split())
    assert (tmp_path / "student" / "summary.json").exists()


def test_resized_input_resizes_and_calls_the_module():
    import torch
    from kflo_cli.train.source import ResizedInput

    seen = []
    wrapped = ResizedInput(torch.nn.Flatten(), (8, 8))
    wrapped.module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape))
    out = wrapped(torch.ones(2, 1, 28, 28))
    assert seen == [torch.Size([2, 1, 8, 8])] and torch.allclose(out, torch.ones(2, 64))  # a constant stays constant
