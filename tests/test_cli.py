"""The kflo CLI: every foundation command and its error paths (one stderr line, exit 2, no traceback)."""

from __future__ import annotations

import subprocess
import sys
import traceback

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from kflo_cli.cli import app
from kflo_cli.errors import KfloError

from conftest import assert_user_error

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))



@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    exp, plain = d / "r.safetensors", d / "p.safetensors"
    r = run("expand", "timm:test_resnet", "--recipe", "kflo:depth=2,width=2", "--num-classes", "5", "-o", str(exp))
    assert r.exit_code == 0, r.output
    r = run("collapse", str(exp), "-o", str(plain))
    assert r.exit_code == 0, r.output
    return d, exp, plain


def test_expand_collapse_verify(files):
    d, exp, plain = files
    r = run("verify-equivalence", str(exp), str(plain), "--input-size", "3,32,32")
    assert r.exit_code == 0, r.output
    assert "PASS" in r.output and "relative" in r.output
    model = timm.create_model("test_resnet", num_classes=5)
    model.load_state_dict(load_file(str(plain)), strict=True)


def test_verify_fails_on_a_different_model(files, tmp_path):
    d, exp, plain = files
    tensors = load_file(str(plain))
    tensors["fc.weight"] = tensors["fc.weight"] * 1.01
    from safetensors import safe_open

    with safe_open(str(plain), "pt") as f:
        meta = f.metadata()
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    r = run("verify-equivalence", str(exp), str(bad), "--input-size", "3,32,32")
    assert r.exit_code == 1
    assert "FAIL" in r.output and "per-layer error" in r.output


def test_float64_collapse_verifies_to_1e_10(files):
    d, exp, _ = files
    p64 = d / "p64.safetensors"
    assert run("collapse", str(exp), "-o", str(p64), "--dtype", "float64").exit_code == 0
    r = run("verify-equivalence", str(exp), str(p64), "--input-size", "3,32,32")
    # An expanded float32 checkpoint limits the tolerance to float32's 1e-5; the float64 collapse itself is exact.
    assert r.exit_code == 0 and "tolerance 1e-05" in r.output


def test_dry_run_prints_plan_and_totals(tmp_cwd):
    r = run("expand", "lenet5", "--recipe", "kflo", "--dry-run", "--exclude", "features.0")
    assert r.exit_code == 0, r.output
    assert "excluded by --exclude" in r.output and "total parameters" in r.output
    assert "61,706" in r.output  # vanilla LeNet-5 for 10 classes
    assert not list(tmp_cwd.iterdir())


def test_dry_run_shows_why_a_recipe_matches_no_layer(tmp_cwd):
    # the error tells the user to run --dry-run to see why each layer was skipped, so --dry-run must show it
    r = run("expand", "lenet5", "--recipe", "expandnet-fc:classifier=keep", "--include", "classifier.4", "--dry-run")
    assert_user_error(r, "recipe 'expandnet-fc' matches no layer")
    assert "classifier.4" in r.stdout and "the classifier (logit layer) stays plain" in r.stdout
    assert "classifier.0" in r.stdout and "not matched by --include" in r.stdout
    r = run("expand", "lenet5", "--recipe", "expandnet-fc:classifier=keep", "--include", "classifier.4", "-o", "x.safetensors")
    assert_user_error(r, "recipe 'expandnet-fc' matches no layer")
    assert not r.stdout and not list(tmp_cwd.iterdir())  # without --dry-run: the one line alone


def test_recipe_file_by_name_and_path(tmp_path):
    out = tmp_path / "a.safetensors"
    r = run("expand", "lenet5", "--recipe-file", "kflo-3x2", "-o", str(out))
    assert r.exit_code == 0, r.output
    r = run("inspect", str(out))
    assert r.exit_code == 0 and "depth': 3" in r.output and "rewritten layers" in r.output
    toml = tmp_path / "mine.toml"
    toml.write_text('[[recipe]]\nname = "kflo"\nwidth = 1.5\ninclude = ["classifier.*"]\n')
    r = run("expand", "lenet5", "--recipe-file", str(toml), "--dry-run")
    assert r.exit_code == 0 and "not matched by kflo's include" in r.output


def test_init_from_plain_checkpoint(files, tmp_path):
    d, exp, plain = files
    out = tmp_path / "again.safetensors"
    r = run("expand", "timm:test_resnet", "--num-classes", "5", "--recipe", "kflo", "--init-from", str(plain), "-o", str(out))
    assert r.exit_code == 0, r.output
    again = tmp_path / "again-plain.safetensors"
    assert run("collapse", str(out), "-o", str(again)).exit_code == 0
    a, b = load_file(str(plain)), load_file(str(again))
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a)


def test_recipes_and_inspect(files):
    r = run("recipes")
    assert r.exit_code == 0 and "kflo" in r.output and "depth=2" in r.output and "built-in" in r.output
    assert "kflo-2x4" in r.output
    _, _, plain = files
    r = run("inspect", str(plain))
    assert r.exit_code == 0 and "plain" in r.output and "collapsed from" in r.output


@pytest.mark.parametrize("args,fragment", [
    (["expand", "resnet181", "--recipe", "kflo", "-o", "x.safetensors"], "did you mean: timm:resnet18"),
    (["expand", "foo:resnet18", "--recipe", "kflo", "-o", "x.safetensors"], "unknown model source"),
    (["expand", "lenet5", "--recipe", "nope", "-o", "x.safetensors"], "unknown recipe 'nope'"),
    (["expand", "lenet5", "--recipe", "KFLO", "-o", "x.safetensors"], "did you mean: kflo"),
    (["expand", "lenet5", "--recipe", "kflo:depth=1", "-o", "x.safetensors"], "depth=1 is out of range"),
    (["expand", "lenet5", "--recipe", "kflo:bogus=1", "-o", "x.safetensors"], "has no parameter bogus"),
    (["expand", "lenet5", "--recipe", "kflo", "--include", "nothing*", "-o", "x.safetensors"], "--include 'nothing*' matches no module"),
    (["expand", "lenet5", "--recipe", "expandnet-fc", "--include", "features.0", "-o", "x.safetensors"], "recipe 'expandnet-fc' matches no layer"),
    (["expand", "lenet5", "--recipe", "kflo", "-o", "."], "is a directory; pass a file path"),
    (["expand", "lenet5", "--recipe", "kflo:depth=99999999999999999999", "-o", "x.safetensors"], "is out of range; use an integer from 2 to 16"),
    (["expand", "lenet5", "--in-chans", "0", "--recipe", "kflo", "-o", "x.safetensors"], "--in-chans (in_chans) 0 is out of range; pass an integer from 1 to 4,096"),
    (["expand", "lenet5", "--recipe", "kflo", "--recipe", "kflo:width=2", "-o", "x.safetensors"], "claimed by both"),
    (["expand", "lenet5", "-o", "x.safetensors"], "no recipe given"),
    (["expand", "lenet5", "--recipe", "kflo"], "no output file"),
    (["expand", "lenet5", "--recipe-file", "nofile", "-o", "x.safetensors"], "neither a file nor a bundled recipe"),
    (["expand", "lenet5", "--recipe", "kflo", "-o", "missing-dir/x.safetensors"], "does not exist"),
    (["expand", "torchvision:resnet18", "--in-chans", "1", "--recipe", "kflo", "-o", "x.safetensors"], "does not take in_chans"),
    (["collapse", "missing.safetensors", "-o", "y.safetensors"], "does not exist"),
    (["inspect", "missing.safetensors"], "does not exist"),
])
def test_user_errors(tmp_cwd, args, fragment):
    assert_user_error(run(*args), fragment)
    assert not list(tmp_cwd.glob("*.safetensors"))


def test_collapse_errors(files, tmp_cwd):
    _, exp, plain = files
    assert_user_error(run("collapse", str(plain), "-o", "y.safetensors"), "already a plain checkpoint")
    junk = tmp_cwd / "junk.safetensors"
    junk.write_text("hello")
    assert_user_error(run("collapse", str(junk), "-o", "y.safetensors"), "not a readable safetensors file")
    assert_user_error(run("collapse", str(exp), "-o", "y.safetensors", "--dtype", "int8"), "unknown dtype")
    assert_user_error(run("verify-equivalence", str(exp), str(plain), "--input-size", "a,b"), "--input-size")
    assert not (tmp_cwd / "y.safetensors").exists()


def test_init_from_expanded_is_refused(files, tmp_cwd):
    _, exp, _ = files
    r = run("expand", "timm:test_resnet", "--num-classes", "5", "--recipe", "kflo", "--init-from", str(exp), "-o", "z.safetensors")
    assert_user_error(r, "collapse it first")


def test_init_from_another_architecture_names_the_likely_cause(files, tmp_cwd):
    _, _, plain = files  # written for 5 classes and 3 input channels
    r = run("expand", "timm:test_resnet", "--num-classes", "5", "--in-chans", "1", "--recipe", "kflo", "--init-from", str(plain), "-o", "z.safetensors")
    assert_user_error(r, "does not fit this model (wrong shape: ")
    assert "--num-classes" in r.output and not (tmp_cwd / "z.safetensors").exists()
    # another class count is transfer learning: the classifier starts afresh, and the terminal says so
    r = run("expand", "timm:test_resnet", "--num-classes", "7", "--recipe", "kflo", "--init-from", str(plain), "-o", "z.safetensors")
    assert r.exit_code == 0 and "trained for 5 classes and this model has 7" in " ".join(r.output.split()), r.output


def test_debug_shows_traceback(tmp_cwd):
    """--debug lets the error propagate with its traceback instead of turning it into one line and exit 2.

    (typer's CliRunner records even a clean exit as ``r.exception = SystemExit(2)``, so what tells the two apart is
    the exception's type and its traceback reaching into the library, not ``r.exception`` being set.)
    """
    r = run("expand", "resnet181", "--recipe", "kflo", "-o", "x.safetensors")
    assert_user_error(r, "unknown model 'resnet181'")
    assert isinstance(r.exception, SystemExit)  # the one-line path
    r = run("--debug", "expand", "resnet181", "--recipe", "kflo", "-o", "x.safetensors")
    assert isinstance(r.exception, KfloError) and "unknown model 'resnet181'" in str(r.exception), repr(r.exception)
    assert r.exit_code == 1 and "error: " not in r.stderr  # raised, not printed as one line
    frames = "".join(traceback.format_exception(*r.exc_info))
    assert frames.startswith("Traceback (most recent call last)") and "create_model" in frames, frames


@pytest.mark.slow
def test_python_dash_m_and_console_script(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kflo_cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("kflo ")
    r = subprocess.run([sys.executable, "-m", "kflo_cli", "expand", "nosuchmodel", "--recipe", "kflo", "-o", str(tmp_path / "x")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: unknown model") and "Traceback" not in r.stderr


def test_stacking_pretrained_networks_into_w1(tmp_path):
    """KFLO paper 4.1: rho = number of pretrained networks; the start reproduces the first network exactly."""
    import kflo_cli as kflo

    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        net = kflo.create_model("lenet5")
        paths.append(tmp_path / f"net{seed}.safetensors")
        kflo.save(net, paths[-1])
    out = tmp_path / "stacked.safetensors"
    r = run("expand", "lenet5", "--recipe", "kflo:width=2", "--init-from", str(paths[0]), "--init-from", str(paths[1]), "-o", str(out))
    assert r.exit_code == 0, r.output
    assert "stacked 2 pretrained networks into W_1 of 5 layers" in r.output
    expanded, first, second = kflo.load(out), kflo.load(paths[0]), kflo.load(paths[1])
    x = torch.randn(3, 1, 28, 28)
    assert torch.allclose(expanded(x), first(x), atol=1e-6)
    w1 = expanded.classifier[0].parametrizations.weight[0].w1
    assert torch.equal(w1[:120], first.classifier[0].weight) and torch.equal(w1[120:], second.classifier[0].weight)
    r = run("expand", "lenet5", "--recipe", "kflo:width=1.5", "--init-from", str(paths[0]), "--init-from", str(paths[1]), "-o", str(out))
    assert_user_error(r, "use width >= 2")


def _with_metadata(src, dst, edit):
    """A copy of ``src`` whose kflo metadata went through ``edit`` (a damaged or hand-edited file)."""
    import json

    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:
        meta = json.loads(f.metadata()["kflo"])
    new = edit(meta)  # edits in place, or returns a replacement list
    save_file(load_file(str(src)), str(dst), metadata={"kflo": json.dumps(new if isinstance(new, list) else meta)})
    return dst


@pytest.mark.parametrize("edit,fragment", [
    (lambda m: m.pop("kind") and None, "kind must be 'expanded' or 'plain'"),
    (lambda m: [m], "metadata that is not kflo's"),
    (lambda m: m.update(model_kwargs=[1]), "model_kwargs must be a table"),
    (lambda m: m.update(input_size="abc"), "input_size must be a list of positive integers"),
    (lambda m: m.pop("layers") and None, "layers must be a list"),
    (lambda m: m["layers"][0].update(recipe_index="zero"), "layers must be a list"),
    (lambda m: m["model_kwargs"].update(num_classes="ten"), "gives the model constructor num_classes='ten', but kflo writes"),
    (lambda m: m["layers"][0].update(name="nowhere.conv"), "lists layers that timm:test_resnet does not have"),
])
def test_damaged_metadata_is_one_clear_error_everywhere(files, tmp_cwd, edit, fragment):
    _, exp, plain = files
    bad = _with_metadata(exp, tmp_cwd / "bad.safetensors", edit)
    for args in (["collapse", str(bad), "-o", "y.safetensors"], ["inspect", str(bad)],
                 ["verify-equivalence", str(bad), str(plain)]):
        r = run(*args)
        if args[0] == "inspect" and r.exit_code == 0:
            continue  # inspect only reads what it shows; a field it does not rebuild from may be odd
        assert_user_error(r, fragment)
    assert not (tmp_cwd / "y.safetensors").exists()


def test_verify_catches_nan_outputs_unrelated_files_and_wrong_input_sizes(files, tmp_path):
    _, exp, plain = files
    tensors = load_file(str(exp))
    tensors["fc.bias"] = torch.full_like(tensors["fc.bias"], float("nan"))
    from safetensors import safe_open

    with safe_open(str(exp), "pt") as f:
        meta = f.metadata()
    nan = tmp_path / "nan.safetensors"
    save_file(tensors, str(nan), metadata=meta)
    r = run("verify-equivalence", str(nan), str(plain), "--input-size", "3,32,32")
    assert r.exit_code == 1 and "FAIL" in r.output and "NaN or inf" in r.output
    other = tmp_path / "lenet.safetensors"
    assert run("expand", "lenet5", "--recipe", "kflo", "-o", str(other)).exit_code == 0
    assert_user_error(run("verify-equivalence", str(other), str(plain)), "compare an expanded checkpoint with its own collapse")
    assert_user_error(run("verify-equivalence", str(exp), str(plain), "--input-size", "3,32"), "does not take inputs of size (3, 32)")


def test_output_paths_that_are_not_plain_files_are_refused(files, tmp_cwd):
    import os

    _, exp, _ = files
    os.mkfifo(tmp_cwd / "fifo")
    assert_user_error(run("expand", "lenet5", "--recipe", "kflo", "-o", "fifo"), "not a regular file")
    assert (tmp_cwd / "fifo").exists() and not (tmp_cwd / "fifo").is_file()
    copy = tmp_cwd / "copy.safetensors"
    copy.write_bytes(exp.read_bytes())
    assert_user_error(run("collapse", str(copy), "-o", str(copy)), "would overwrite the expanded checkpoint")
    assert copy.read_bytes() == exp.read_bytes()
    for dtype in ("float8_e4m3fn", ""):
        assert_user_error(run("collapse", str(exp), "-o", "y.safetensors", "--dtype", dtype), "unknown dtype")
    nometa = tmp_cwd / "nometa.safetensors"
    save_file({"w": torch.zeros(2)}, str(nometa))
    assert_user_error(run("collapse", str(nometa), "-o", "y.safetensors"), "has no kflo metadata")
    assert not (tmp_cwd / "y.safetensors").exists()


def test_recipe_file_shapes_are_checked(tmp_cwd):
    def expand_with(text):
        (tmp_cwd / "r.toml").write_text(text)
        return run("expand", "lenet5", "--recipe-file", "r.toml", "--dry-run")

    r = expand_with('[[recipe]]\nname = "kflo"\ninclude = "classifier.*"\n')  # one glob, not its characters
    assert r.exit_code == 0 and "not matched by kflo's include" in r.output
    assert_user_error(expand_with('[[recipe]]\nname = "kflo"\ninclude = [1]\n'), "is not a list of module-name globs")
    assert_user_error(expand_with('[[recipes]]\nname = "kflo"\n'), "unknown top-level key(s) recipes")
    assert_user_error(expand_with('[[recipe]]\nname = "kflo"\nwidth = true\n'), "width=True is not a valid float")


def test_excluding_nothing_warns_and_a_truncating_kflo_width_warns(tmp_cwd):
    import warnings

    with pytest.warns(UserWarning, match="--exclude 'nothing' matches no module"):
        assert run("expand", "lenet5", "--recipe", "kflo", "--exclude", "nothing", "--dry-run").exit_code == 0
    with pytest.warns(UserWarning, match="does not preserve its function"):
        assert run("expand", "lenet5", "--recipe", "kflo:width=0.5", "-o", "half.safetensors").exit_code == 0

    import kflo_cli as kflo

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loading rebuilds the expansion: no warning about a start it replaces
        kflo.load(tmp_cwd / "half.safetensors")


def test_allocation_failures_are_a_user_error_not_a_crash():
    from kflo_cli.cli import handle_errors

    @handle_errors
    def too_big():
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to allocate 600000000000 bytes")

    import typer

    with pytest.raises(typer.Exit) as info:
        too_big()
    assert info.value.exit_code == 2


def test_default_input_size_follows_the_first_convolution():
    from kflo_cli.models import default_input_size

    assert default_input_size(torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3))) == (2, 16, 112, 112)
    assert default_input_size(torch.nn.Sequential(torch.nn.Conv1d(5, 4, 3))) == (5, 224)
    assert default_input_size(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3))) == (1, 224, 224)

