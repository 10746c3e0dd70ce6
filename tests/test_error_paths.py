"""Every command's error paths, through the real entry point: one line on stderr, exit 2, no traceback, and
nothing written (no output file, no temporary file, no run directory)."""

from __future__ import annotations

import os
import pickle
import sys

import pytest

from kflo_cli.cli import main

MISSING = "missing.safetensors"


def _files(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs} | {
        os.path.relpath(os.path.join(d, x), root) + "/" for d, xs, _ in os.walk(root) for x in xs}


@pytest.fixture
def inputs(tmp_path):
    (tmp_path / "random.safetensors").write_bytes(os.urandom(300))
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "pickled.pth").write_bytes(pickle.dumps({"w": [1.0, 2.0]}))
    (tmp_path / "adir").mkdir()
    (tmp_path / "bad.toml").write_text("this is [not toml\n")
    (tmp_path / "unknown.toml").write_text('name = "x"\nmodels = ["lenet5"]\nbogus = 1\n')
    return tmp_path


# (arguments, a fragment the one line must hold); OUT is replaced by a path in the test's folder
CASES = [
    (["expand"], "Missing argument 'model'"),
    (["expand", "lenet5", "--bogus"], "No such option: --bogus"),
    (["expand", "lenet5", "--seed", "abc"], "--seed"),
    (["expand", "no_such_model_xyz", "--recipe", "kflo", "-o", "OUT/m.safetensors"], "unknown model"),
    (["expand", "lenet5", "--recipe", "kflo:width=1e300", "--dry-run"], "out of range"),
    (["expand", "lenet5", "--recipe", "kflo:depth=two", "-o", "OUT/m.safetensors"], "depth"),
    (["expand", "lenet5", "--recipe", "nosuchrecipe", "-o", "OUT/m.safetensors"], "nosuchrecipe"),
    (["expand", "resnet18", "--in-chans", "0", "--recipe", "kflo", "-o", "OUT/m.safetensors"], "--in-chans"),
    (["expand", "lenet5", "--num-classes", "-3", "--recipe", "kflo", "-o", "OUT/m.safetensors"], "--num-classes"),
    (["expand", "lenet5", "--recipe", "kflo", "-o", "OUT/no/such/dir/m.safetensors"], "does not exist"),
    (["expand", "lenet5", "--recipe", "kflo", "-o", "OUT/adir"], "directory"),
    (["expand", "lenet5", "--recipe", "kflo", "--init-from", "OUT/pickled.pth", "-o", "OUT/m.safetensors"], "pickle"),
    (["collapse", "OUT/" + MISSING, "-o", "OUT/p.safetensors"], "does not exist"),
    (["collapse", "OUT/random.safetensors", "-o", "OUT/p.safetensors"], "safetensors"),
    (["collapse", "OUT/empty.safetensors", "-o", "OUT/p.safetensors"], "safetensors"),
    (["collapse", "OUT/pickled.pth", "-o", "OUT/p.safetensors"], "kflo convert"),
    (["collapse", "OUT/adir", "-o", "OUT/p.safetensors"], "directory"),
    (["collapse", "OUT/random.safetensors", "-o", "OUT/p.safetensors", "--dtype", "int8"], ""),
    (["verify-equivalence", "OUT/" + MISSING, "OUT/random.safetensors"], "does not exist"),
    (["verify-equivalence", "OUT/random.safetensors", "OUT/random.safetensors", "--rtol", "-1"], ""),
    (["inspect", "OUT/random.safetensors"], "safetensors"),
    (["inspect", "OUT/pickled.pth"], "kflo convert"),
    (["convert", "OUT/" + MISSING, "-o", "OUT/c.safetensors"], "does not exist"),
    (["convert", "OUT/random.safetensors", "-o", "OUT/c.safetensors"], ""),
    (["bench", "lenet5", "--recipe", "kflo", "--batch-size", "0"], "--batch-size 0"),
    (["bench", "lenet5", "--recipe", "kflo", "--mode", "fastest"], "--mode fastest"),
    (["bench", "lenet5", "--recipe", "acnet", "--mode", "feature"], "--mode feature"),
    (["train", "lenet5", "--epochs", "0", "-o", "OUT/run"], "epochs"),
    (["train", "lenet5", "--lr", "nan", "-o", "OUT/run"], "--lr"),
    (["train", "lenet5", "--recipe-file", "OUT/bad.toml", "-o", "OUT/run"], "bad.toml"),
    (["train", "lenet5", "--data", "nosuchdata", "-o", "OUT/run"], "nosuchdata"),
    (["train", "--resume", "OUT/adir"], ""),
    (["quickstart", "-o", "OUT/random.safetensors"], ""),
    (["sweep", "OUT/bad.toml", "-o", "OUT/sweep"], "bad.toml"),
    (["sweep", "OUT/unknown.toml", "-o", "OUT/sweep"], "bogus"),
    (["sweep", "OUT/" + MISSING, "-o", "OUT/sweep"], ""),
]


@pytest.mark.parametrize("args,fragment", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_every_error_is_one_line_exit_2_and_writes_nothing(inputs, capsys, monkeypatch, args, fragment):
    argv = [a.replace("OUT", str(inputs)) for a in args]
    before = _files(inputs)
    monkeypatch.setattr(sys, "argv", ["kflo", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2, (out, err)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err + out and fragment in err, err
    assert _files(inputs) == before, _files(inputs) - before


@pytest.mark.parametrize("option", [["--rtol", "inf"], ["--rtol", "0"], ["--rtol", "nan"], ["--rtol", "0.5"],
                                    ["--trials", "100000"], ["--batch-size", "100000"],
                                    ["--input-size", "1,100000,100000"]])
def test_verification_refuses_options_that_pass_vacuously_or_never_end(tmp_path, capsys, monkeypatch, option):
    import kflo_cli as kflo

    expanded = kflo.expand(kflo.create_model("lenet5"), "kflo")
    kflo.save(expanded, tmp_path / "e.safetensors")
    kflo.save(kflo.collapse(expanded), tmp_path / "p.safetensors")
    monkeypatch.setattr(sys, "argv", ["kflo", "verify-equivalence", str(tmp_path / "e.safetensors"),
                                      str(tmp_path / "p.safetensors"), *option])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out, err = capsys.readouterr()
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, (out, err)
    assert option[0] in err and "PASS" not in out


def test_non_finite_weights_are_never_written(tmp_path, capsys, monkeypatch):
    import torch

    import kflo_cli as kflo
    from kflo_cli.errors import KfloError

    model = kflo.expand(kflo.create_model("lenet5"), "kflo")
    kflo.save(model, tmp_path / "e.safetensors")
    with torch.no_grad():
        next(model.parameters())[0].fill_(float("nan"))
    with pytest.raises(KfloError, match="holds NaN values"):
        kflo.save(model, tmp_path / "nan.safetensors")
    assert not (tmp_path / "nan.safetensors").exists()
    # a file edited to hold infinity: collapse says so in one line and writes nothing
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(tmp_path / "e.safetensors"), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(tmp_path / "e.safetensors"))
    first = next(iter(tensors))
    tensors[first][..., 0] = float("inf")
    save_file(tensors, str(tmp_path / "inf.safetensors"), metadata=meta)
    monkeypatch.setattr(sys, "argv", ["kflo", "collapse", str(tmp_path / "inf.safetensors"), "-o",
                                      str(tmp_path / "p.safetensors")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and ("infinite" in err or "NaN" in err), err
    assert not (tmp_path / "p.safetensors").exists()
