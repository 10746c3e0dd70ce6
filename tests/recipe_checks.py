"""Checks shared by the recipe test files: random layer configurations, a zoo round trip and a CLI round trip."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
from hypothesis import strategies as st
from safetensors.torch import load_file
from typer.testing import CliRunner

import kflo_cli as kflo
from kflo_cli.cli import app
from kflo_cli.errors import KfloError

from conftest import move_bn_stats, perturb, rel_err

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@st.composite
def paddings(draw, d: int, stride: tuple[int, ...]):
    """``(stride, padding, padding_mode)`` for a ``d``-dimensional convolution: int tuples, "same" (stride 1, as
    PyTorch requires) or "valid", and every padding mode where there is padding."""
    kind = draw(st.sampled_from(["int", "int", "same", "valid"]))
    if kind == "same":
        stride, padding = (1,) * d, "same"
    elif kind == "valid":
        padding = "valid"
    else:
        padding = tuple(draw(st.integers(0, 3)) for _ in range(d))
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    if padding == "valid" or padding == (0,) * d:
        mode = "zeros"
    return stride, padding, mode


@st.composite
def conv_configs(draw, dims=(1, 2, 3), min_taps: int = 1, square_odd: bool = False):
    """``(class, kwargs, input shape)`` of a random convolution: groups, depthwise, stride, dilation, padding
    (int, "same", "valid") and every padding mode."""
    d = draw(st.sampled_from(dims))
    groups = draw(st.sampled_from([1, 1, 2, 3, "depthwise"]))
    if groups == "depthwise":
        cin = draw(st.integers(1, 5))
        groups, cout = cin, cin * draw(st.integers(1, 2))
    else:
        cin = groups * draw(st.integers(1, 3))
        cout = groups * draw(st.integers(1, 3))
    if square_odd:
        k = draw(st.sampled_from([3, 3, 5]))
        kernel = (k,) * d
    else:
        kernel = tuple(draw(st.integers(1, 3 if d == 3 else 4)) for _ in range(d))
        if math.prod(kernel) < min_taps:
            kernel = (2,) + kernel[1:]
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(d))
    stride = tuple(draw(st.integers(1, 2)) for _ in range(d))
    stride, padding, mode = draw(paddings(d, stride))
    bias = draw(st.booleans())
    size = tuple(max(kk * dd + 4, 7) for kk, dd in zip(kernel, dilation))
    kwargs = dict(in_channels=cin, out_channels=cout, kernel_size=kernel, stride=stride, padding=padding,
                  dilation=dilation, groups=groups, bias=bias, padding_mode=mode)
    return CONV[d], kwargs, (cin, *size)


def zoo_roundtrip(model_id: str, kwargs: dict, input_size: tuple[int, ...], spec: str, tmp_path: Path, *,
                  exact_start: bool = True, rtol: float = 1e-5) -> nn.Module:
    """Expand a real model, train-like perturb it, collapse, and check everything a user relies on.

    The model is moved away from its initial state (parameters perturbed, BatchNorm statistics updated in train
    mode) before and after expansion; equivalence is checked in eval mode against ``rtol`` (float32 models).
    Returns the expanded model.
    """
    torch.manual_seed(0)
    model = kflo.create_model(model_id, **kwargs)
    move_bn_stats(model, input_size)
    perturb(model, 0.02, seed=1)
    model.eval()
    x = torch.randn(2, *input_size)
    with torch.no_grad():
        before = model(x)
    kflo.expand(model, spec, seed=0)
    assert any(r.applied for r in kflo.record(model).plan), f"{spec} must apply to some layer of {model_id}"
    with torch.no_grad():
        after = model.eval()(x)
    if exact_start:
        assert rel_err(before, after) < rtol, "expansion must not change the function"

    model.train()
    model(x).float().pow(2).mean().backward()  # a train-mode forward and backward run
    model.zero_grad(set_to_none=True)
    perturb(model, 0.05, seed=2)
    move_bn_stats(model, input_size, seed=3)
    model.eval()
    plain = kflo.collapse(model)
    assert not kflo.is_expanded(plain)

    reference = kflo.create_model(model_id, **kwargs)
    ref_sd, plain_sd = reference.state_dict(), plain.state_dict()
    assert list(plain_sd) == list(ref_sd)
    assert all(plain_sd[k].shape == ref_sd[k].shape and plain_sd[k].dtype == ref_sd[k].dtype for k in ref_sd)
    path = tmp_path / "plain.safetensors"
    kflo.save(plain, path)
    reference.load_state_dict(load_file(str(path)), strict=True)  # what a user without kflo does
    report = kflo.verify_equivalence(model, reference, input_size=input_size, batch_size=2, trials=1)
    assert report.passed and report.rel_error < rtol and report.output_scale > 0, report

    saved = tmp_path / "expanded.safetensors"
    kflo.save(model, saved)
    again = kflo.load(saved)
    with torch.no_grad():
        assert torch.equal(again(x), model.eval()(x))
    return model


def cli_roundtrip(model: str, recipe_args: list[str], tmp_path: Path, input_size: str, extra: list[str] = ()) -> Path:
    """``kflo expand`` -> ``kflo collapse`` -> ``kflo verify-equivalence`` through the CLI; returns the plain file."""
    runner = CliRunner()
    exp, plain = tmp_path / "cli-exp.safetensors", tmp_path / "cli-plain.safetensors"
    r = runner.invoke(app, ["expand", model, *recipe_args, *extra, "-o", str(exp)])
    assert r.exit_code == 0, r.output
    # Stand-in for training: move the factors and BatchNorm statistics, then write the checkpoint back.
    trained = kflo.load(exp)
    size = tuple(int(s) for s in input_size.split(","))
    perturb(trained, 0.05, seed=4)
    move_bn_stats(trained, size, seed=5)
    kflo.save(trained, exp)
    r = runner.invoke(app, ["collapse", str(exp), "-o", str(plain)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["verify-equivalence", str(exp), str(plain), "--input-size", input_size])
    assert r.exit_code == 0 and "PASS" in r.output, r.output
    return plain


def layer_roundtrip(layer: nn.Module, spec: str, x: torch.Tensor, *, exact_start: bool = True, tol: float = 1e-10,
                    seed: int = 0) -> nn.Module:
    """Expand one float64 layer, check the start, perturb, collapse, check equivalence; returns the expanded model
    (``nn.Sequential`` of the layer: the expansion's record, hence its training rules, lives on it)."""
    cls = type(layer)
    y0 = layer(x)
    model = nn.Sequential(layer)
    kflo.expand(model, spec, seed=seed)
    expanded = model[0]
    if exact_start:
        assert rel_err(y0, expanded(x)) < tol
    perturb(model, 0.2, seed=seed)
    plain = kflo.collapse(model)
    assert type(plain[0]) is cls
    assert rel_err(model(x), plain(x)) < tol
    return model


#: Tiny zoo models: registry-wide checks run a recipe on the first of them it rewrites a layer of. The SmallNets
#: come first because they have BatchNorm layers (LeNet-5 has none); SmallNet 3x3's kernels are too small for
#: ExpandNet-CK, which moves on to SmallNet 7x7.
TINY_MODELS = ("smallnet_k3", "smallnet_k7", "lenet5")


def builtin_recipe_names() -> list[str]:
    """The names of the built-in recipes, read from the registry (plugins excluded), for ``parametrize``."""
    return [cls.name for cls in kflo.list_recipes() if cls.source == "built-in"]


def expand_first_applicable(spec: str, models: tuple[str, ...] = TINY_MODELS, *,
                            dtype: torch.dtype = torch.float32) -> tuple[str, nn.Module]:
    """Expand the first of ``models`` (10 classes, ``dtype``) that recipe ``spec`` rewrites a layer of.

    Returns ``(model name, expanded model)``. Fails the test, with each model's reason, when the recipe rewrites
    nothing in any of them: a recipe that silently stopped applying must not make a registry-wide test vacuous.
    """
    reasons = []
    for model_id in models:
        torch.manual_seed(0)
        model = kflo.create_model(model_id, num_classes=10).to(dtype)
        try:
            kflo.expand(model, spec, seed=0)
        except KfloError as exc:
            reasons.append(f"{model_id}: {exc}")
            continue
        if next(kflo.rewritten_layers(model), None) is not None:
            return model_id, model
        reasons.append(f"{model_id}: expanded without error but rewrote no layer")
    raise AssertionError(f"recipe {spec!r} rewrites no layer of any of {', '.join(models)}: " + "; ".join(reasons))
