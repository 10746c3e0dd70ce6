"""kflo_cli.analysis: the filter-normalised loss landscape (`kflo landscape`) and the contracted initialisation of
ExpandNets 5.3, checked against known answers (tiny models: LeNet-5 on random or digits batches, a quadratic toy)."""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from typer.testing import CliRunner

import kflo_cli as kflo
from kflo_cli.analysis import contracted_init, loss_landscape, write_landscape
from kflo_cli.analysis.init import fresh_kflo_factors
from kflo_cli.analysis.landscape import filter_normalized_direction, landscape_figure, moving_parameters
from kflo_cli.cli import app
from kflo_cli.errors import KfloError
from kflo_cli.surgery import collapse

KW = {"num_classes": 10, "in_chans": 1}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
runner = CliRunner()


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lenet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return kflo.create_model("lenet5", **KW)


def random_batches(n: int = 2, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 28, 28, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


def plain_loss(model: nn.Module, batches) -> float:
    model.eval()
    with torch.no_grad():
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        return float(F.cross_entropy(model(x), y))


# -- the landscape: known answers ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [1, 2])
def test_origin_is_the_models_loss_and_weights_are_restored(dim):
    model, batches = lenet(), random_batches()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    land = loss_landscape(model, batches, dim=dim, steps=3, span=0.5, seed=1)
    centre = land.loss[1] if dim == 1 else land.loss[1][1]
    assert land.alphas[1] == 0.0
    assert abs(centre - plain_loss(lenet(), batches)) < 1e-6
    assert abs(land.origin_loss - centre) < 1e-9
    assert model.training  # mode restored
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    if dim == 2:
        assert len(land.loss) == 3 and all(len(row) == 3 for row in land.loss)


def test_expanded_and_collapsed_agree_at_the_origin_only():
    """The same function at the weights (so the same loss there); different weight spaces elsewhere."""
    expanded = kflo.expand_model("lenet5", "kflo:depth=2,width=2", model_kwargs=KW, seed=0)
    plain = collapse(expanded)
    batches = random_batches()
    a = loss_landscape(expanded, batches, steps=3, span=0.5, seed=0)
    b = loss_landscape(plain, batches, steps=3, span=0.5, seed=0)
    assert abs(a.loss[1] - b.loss[1]) < 1e-5
    assert any("parametrizations.weight.0.w1" in name for name in a.moved)
    assert not any("parametrizations" in name for name in b.moved)
    assert a.moved_values > b.moved_values
    assert a.loss[0] != pytest.approx(b.loss[0], rel=1e-6)


class Quadratic(nn.Module):
    """loss(W) = ||W - target||^2 for every sample (a known quadratic in the weight; the bias is 1-D, never moved)."""

    def __init__(self, weight: torch.Tensor, target: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.clone())
        self.bias = nn.Parameter(torch.ones(weight.shape[0], dtype=weight.dtype))
        self.register_buffer("target", target.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = ((self.weight - self.target) ** 2).sum() + 0.0 * self.bias.sum()
        return q.expand(x.shape[0], 1)


def quadratic_criterion(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return out.sum()


def test_quadratic_toy_values_exactly():
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(4, 5, generator=g, dtype=torch.float64)
    batches = [(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long))]
    # target = W0: loss(a) = a^2 ||d||^2 = a^2 ||W0||^2 (filter normalisation: every row of d has W0's row norm)
    land = loss_landscape(Quadratic(w0, w0), batches, dim=1, steps=5, span=2.0, seed=7, criterion=quadratic_criterion)
    norm2 = float((w0 ** 2).sum())
    assert land.alphas == [-2.0, -1.0, 0.0, 1.0, 2.0]
    for a, value in zip(land.alphas, land.loss):
        assert value == pytest.approx(a * a * norm2, rel=1e-12, abs=1e-12)
    assert land.loss[0] == pytest.approx(land.loss[-1], rel=1e-12) and land.fixed == ["bias"]
    # target elsewhere: loss(a) = ||W0 - T||^2 + 2a <W0 - T, d> + a^2 ||W0||^2 with d redrawn from the same seed
    target = torch.randn(4, 5, generator=g, dtype=torch.float64)
    land = loss_landscape(Quadratic(w0, target), batches, dim=1, steps=5, span=2.0, seed=7,
                          criterion=quadratic_criterion)
    (d,) = filter_normalized_direction([w0], torch.Generator().manual_seed(7))
    base, cross = float(((w0 - target) ** 2).sum()), float(((w0 - target) * d).sum())
    for a, value in zip(land.alphas, land.loss):
        assert value == pytest.approx(base + 2 * a * cross + a * a * norm2, rel=1e-12)
    # 2-D, target = W0: loss(a, b) = (a^2 + b^2) ||W0||^2 + 2ab <d1, d2>
    land = loss_landscape(Quadratic(w0, w0), batches, dim=2, steps=3, span=1.0, seed=7, criterion=quadratic_criterion)
    gen = torch.Generator().manual_seed(7)
    (d1,), (d2,) = filter_normalized_direction([w0], gen), filter_normalized_direction([w0], gen)
    for i, a in enumerate(land.alphas):
        for j, b in enumerate(land.betas):
            expected = (a * a + b * b) * norm2 + 2 * a * b * float((d1 * d2).sum())
            assert land.loss[i][j] == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_filter_normalisation_and_fixed_parameters():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 4 * 4, 5))
    with torch.no_grad():
        model[0].weight[2].zero_()  # a dead filter gets a zero direction
    moved, fixed = moving_parameters(model)
    assert [n for n, _ in moved] == ["0.weight", "3.weight"]
    assert sorted(fixed) == ["0.bias", "1.bias", "1.weight", "3.bias"]
    params = [p for _, p in moved]
    directions = filter_normalized_direction(params, torch.Generator().manual_seed(0))
    for p, d in zip(params, directions):
        assert d.shape == p.shape and d.dtype == p.dtype
        want = p.detach().reshape(p.shape[0], -1).norm(dim=1)
        have = d.reshape(d.shape[0], -1).norm(dim=1)
        torch.testing.assert_close(have, want, rtol=1e-6, atol=1e-7)
    assert torch.count_nonzero(directions[0][2]) == 0
    again = filter_normalized_direction(params, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(directions, again))  # seeded


# -- the plot and the files ----------------------------------------------------------------------------------------


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("dim", [1, 2])
def test_figure_png_and_json(tmp_path, dim):
    land = loss_landscape(lenet(), random_batches(1, 8), dim=dim, steps=3, span=1.0, seed=0)
    fig = landscape_figure(land, "lenet5 vanilla on noise")
    ax = fig.axes[0]
    assert "lenet5 vanilla on noise" in ax.get_title()
    assert ax.get_xlabel().startswith("alpha")
    assert "error" in landscape_figure(land, metric="error").axes[-1].get_ylabel()
    if dim == 1:
        assert len(fig.axes) == 1 and "loss" in ax.get_ylabel()
    else:
        assert ax.get_ylabel().startswith("beta")
        assert len(fig.axes) == 2 and "loss" in fig.axes[1].get_ylabel()  # the colour bar
    out = tmp_path / "land.png"
    json_path = write_landscape(land, out, "lenet5 vanilla on noise")
    assert json_path == tmp_path / "land.json"
    width, height = png_size(out.read_bytes())
    assert (width, height) == ((600, 420) if dim == 1 else (600, 500))
    grid = json.loads(json_path.read_text())
    assert grid["dim"] == dim and grid["alphas"] == land.alphas and grid["loss"] == land.loss
    assert grid["title"] == "lenet5 vanilla on noise"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["land.json", "land.png"]


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    land = loss_landscape(lenet(), random_batches(1, 4), steps=2, span=1.0, seed=0)

    def broken_savefig(self, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(PNG_SIGNATURE)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(KfloError, match="cannot write .*No space left on device"):
        write_landscape(land, tmp_path / "land.png")
    assert list(tmp_path.iterdir()) == []


# -- the command ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("landscape")
    plain, expanded = folder / "plain.safetensors", folder / "expanded.safetensors"
    kflo.save(lenet(), plain)
    kflo.save(kflo.expand_model("lenet5", "kflo:depth=2,width=2", model_kwargs=KW, seed=0), expanded)
    return plain, expanded


def test_command_writes_plot_and_grid(checkpoints, tmp_path):
    plain, expanded = checkpoints
    for name, path in (("plain", plain), ("expanded", expanded)):
        out = tmp_path / f"{name}.png"
        r = runner.invoke(app, ["landscape", str(path), "--data", "digits", "--steps", "3", "--batches", "1",
                                "--batch-size", "16", "--threads", "1", "-o", str(out)])
        assert r.exit_code == 0, r.output
        assert f"wrote {out}" in r.output
        grid = json.loads(out.with_suffix(".json").read_text())
        assert grid["samples"] == 16 and len(grid["loss"]) == 3 and math.isfinite(grid["origin_loss"])
        assert ("expanded with kflo" in grid["title"]) == (name == "expanded") and "on digits" in grid["title"]
        assert png_size(out.read_bytes())[0] > 0
    a = json.loads((tmp_path / "plain.json").read_text())
    b = json.loads((tmp_path / "expanded.json").read_text())
    assert abs(a["origin_loss"] - b["origin_loss"]) > 0  # different checkpoints (fresh vs expanded weights)


@pytest.mark.parametrize("args, fragment", [
    (["--steps", "1"], "--steps 1 is out of range"),
    (["--steps", "202"], "--steps 202 is out of range"),
    (["--span", "0"], "--span 0.0 is out of range"),
    (["--span", "10.5"], "--span 10.5 is out of range"),
    (["--span", "nan"], "--span nan is out of range"),
    (["--batches", "0"], "--batches 0 is out of range"),
    (["--batches", "10001"], "--batches 10001 is out of range"),
    (["--dim", "3"], "--dim 3 is not 1 or 2"),
    (["--batch-size", "0"], "--batch-size 0 is out of range"),
    (["--metric", "accuracy"], "--metric accuracy is not one of loss, error"),
    (["--data", "nope"], "unknown data set 'nope'"),
    (["-o", "{tmp}/plot.jpg"], "does not end in .png"),
    (["-o", "{tmp}/missing/plot.png"], "does not exist"),
])
def test_bad_options_are_one_line_and_leave_nothing(checkpoints, tmp_path, args, fragment):
    plain, _ = checkpoints
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    base = {"--data": "digits", "-o": str(tmp_path / "plot.png")}
    for flag in base:
        if flag not in args:
            args += [flag, base[flag]]
    r = runner.invoke(app, ["landscape", str(plain), "--threads", "1", *args])
    assert r.exit_code == 2, r.output
    assert r.stderr.startswith("error: ") and fragment in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.output
    assert list(tmp_path.iterdir()) == []


# -- contracted initialisation (ExpandNets 5.3, hypothesis 1) -------------------------------------------------------


def test_contracted_expandnet_is_the_collapse_of_a_fresh_random_expansion():
    got = contracted_init("lenet5", "expandnet-cl:rate=2", seed=4, model_kwargs=KW)
    want = collapse(kflo.expand_model("lenet5", "expandnet-cl:rate=2,init=random", model_kwargs=KW, seed=4))
    assert not kflo.record(got).expanded and kflo.record(got).collapsed_from == ()
    for (name, a), (_, b) in zip(got.state_dict().items(), want.state_dict().items()):
        assert torch.equal(a, b), name
    vanilla = lenet(4).state_dict()
    assert set(got.state_dict()) == set(vanilla)
    # CL rewrites the convolutions: a product of fresh layers is a smaller, differently shaped start than the
    # vanilla one (std about a third on LeNet-5); the classifier (not expanded by CL) keeps the vanilla init
    for key in ("features.0.weight", "features.3.weight"):
        ratio = float(got.state_dict()[key].std() / vanilla[key].std())
        assert ratio < 0.7, (key, ratio)
    assert torch.equal(got.state_dict()["classifier.0.weight"], vanilla["classifier.0.weight"])


def test_contracted_kflo_redraws_the_factors_as_fresh_layers():
    got = contracted_init("lenet5", "kflo:depth=2,width=2", seed=1, model_kwargs=KW)
    expanded = kflo.expand_model("lenet5", "kflo:depth=2,width=2", model_kwargs=KW, seed=1)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in kflo.record(expanded).layers:
            param = expanded.get_submodule(layer.name).parametrizations.weight[0]
            for factor in [param.w1, *param.cascade]:
                bound = 1 / math.sqrt(factor.shape[1])
                factor.copy_(torch.empty(factor.shape, dtype=torch.float64).uniform_(-bound, bound, generator=g))
    want = collapse(expanded)
    for (name, a), (_, b) in zip(got.state_dict().items(), want.state_dict().items()):
        assert torch.equal(a, b), name
    vanilla = lenet(1)
    # KFLO's own start preserves the function: its collapse *is* the vanilla init (why the factors are redrawn)
    same = collapse(kflo.expand_model("lenet5", "kflo:depth=2,width=2", model_kwargs=KW, seed=1))
    torch.testing.assert_close(same.state_dict(), vanilla.state_dict())
    for name, p in vanilla.named_parameters():
        if p.dim() > 1:  # U(-1/sqrt(F)) x U(-1/sqrt(R)) summed over R: std / sqrt(3) of the vanilla layer's
            ratio = float(got.get_parameter(name).detach().std() / p.detach().std())
            assert 0.45 < ratio < 0.7, (name, ratio)
        else:  # biases are not factors
            assert torch.equal(got.get_parameter(name), p), name


def test_contracted_init_takes_a_model_and_leaves_it_alone():
    model = lenet(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = contracted_init(model, "expandnet-ck:rate=2", seed=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not kflo.record(model).expanded
    want = collapse(kflo.expand_model(lenet(2), "expandnet-ck:rate=2,init=random", seed=2))
    for (name, a), (_, b) in zip(got.state_dict().items(), want.state_dict().items()):
        assert torch.equal(a, b), name
    assert fresh_kflo_factors(kflo.expand_model(lenet(2), "expandnet-ck:rate=2,init=random", seed=2), 0) == 0


@pytest.mark.parametrize("spec, fragment", [
    ("doconv", "starts from the compact weights"),
    ("expandnet-cl:init=preserve", "init=preserve starts from the compact weights"),
    ("expandnet-cl:nonlinear=relu,mode=feature", "does not collapse"),
])
def test_contracted_init_refusals(spec, fragment):
    with pytest.raises(KfloError, match=fragment):
        contracted_init("lenet5", spec, seed=0, model_kwargs=KW)


def test_train_init_starts_from_the_contracted_init_and_refuses_other_starts(tmp_path):
    import torch
    from typer.testing import CliRunner

    from kflo_cli.analysis.init import contracted_init
    from kflo_cli.cli import app
    from kflo_cli.models import create_model
    from kflo_cli.train.config import resolve_config
    from kflo_cli.train.source import prepare

    config = resolve_config({"source": "lenet5", "init": "collapsed-expansion:expandnet-ck", "data": "digits"})
    started = prepare(config).model
    torch.manual_seed(0)
    expected = contracted_init(create_model("lenet5"), "expandnet-ck", seed=0)
    for (name, a), (_, b) in zip(started.state_dict().items(), expected.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    torch.manual_seed(0)
    vanilla = create_model("lenet5")
    assert not torch.equal(started.state_dict()["features.0.weight"], vanilla.state_dict()["features.0.weight"])
    r = CliRunner().invoke(app, ["train", "lenet5", "--init", "collapsed-expansion:kflo", "--recipe", "kflo",
                                 "-o", str(tmp_path / "r")])
    assert r.exit_code == 2 and "--init starts a plain model" in r.stderr and not (tmp_path / "r").exists()


def test_percentiles_of_a_known_tensor():
    import torch

    from kflo_cli.analysis.tracking import PERCENTILES, percentiles

    values = torch.arange(101, dtype=torch.float32)[torch.randperm(101)]  # 0..100 shuffled
    assert percentiles(values) == [float(p) for p in PERCENTILES]
    assert percentiles(torch.tensor([0.0, 10.0]), [50, 25]) == [5.0, 2.5]  # linear interpolation, as numpy


def test_track_weights_records_bands_draws_them_and_leaves_the_training_unchanged(tmp_path):
    import json

    import matplotlib
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from kflo_cli.analysis.tracking import PERCENTILES
    from kflo_cli.cli import app

    matplotlib.use("Agg")
    common = ["train", "lenet5", "--recipe", "kflo", "--data", "digits", "--epochs", "2", "--train-fraction", "0.2",
              "--batch-size", "32", "--threads", "1"]
    r = CliRunner().invoke(app, [*common, "-o", str(tmp_path / "plain")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, [*common, "--track", "weights:layers=features.*", "-o", str(tmp_path / "tracked")])
    assert r.exit_code == 0, r.output
    a, b = load_file(str(tmp_path / "plain" / "last.safetensors")), load_file(str(tmp_path / "tracked" / "last.safetensors"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)  # bit-identical trajectory
    rows = [json.loads(line) for line in (tmp_path / "tracked" / "metrics.jsonl").read_text().splitlines()]
    assert [sorted(row["weights"]) for row in rows] == [["features.0", "features.3"]] * 2
    bands = rows[-1]["weights"]["features.0"]
    assert len(bands) == len(PERCENTILES) and bands == sorted(bands, reverse=True)
    png = (tmp_path / "tracked" / "weights.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    r = CliRunner().invoke(app, [*common, "--track", "gradients", "-o", str(tmp_path / "bad")])
    assert r.exit_code == 2 and "unknown measurement 'gradients'" in r.stderr and not (tmp_path / "bad").exists()


def test_gradient_cosine_similarities_match_a_hand_computed_case():
    import torch

    from kflo_cli.analysis.confusion import gaussian_kde, pair_similarities

    # loss = w . x for a single weight vector: the gradient of a batch is the sum of its inputs
    model = torch.nn.Linear(2, 1, bias=False)
    batches = [(torch.tensor([[1.0, 0.0]]), None), (torch.tensor([[1.0, 1.0]]), None),   # cos 45 deg
               (torch.tensor([[0.0, 2.0]]), None), (torch.tensor([[0.0, -1.0]]), None)]  # opposite
    sims = pair_similarities(model, batches, lambda out, _: out.sum())
    assert sims == pytest.approx([2 ** -0.5, -1.0])
    grid = [i / 100 for i in range(-300, 301)]
    density = gaussian_kde([0.0, 0.1, -0.1, 0.2], grid)
    assert sum(density) * 0.01 == pytest.approx(1.0, abs=1e-3)  # a density integrates to 1


def test_track_gradient_confusion_leaves_the_training_unchanged(tmp_path):
    import json

    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from kflo_cli.cli import app

    common = ["train", "lenet5", "--recipe", "expandnet-ck", "--data", "digits", "--epochs", "2", "--train-fraction",
              "0.2", "--batch-size", "32", "--threads", "1"]
    r = CliRunner().invoke(app, [*common, "-o", str(tmp_path / "plain")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, [*common, "--track", "gradient-confusion:pairs=5", "-o", str(tmp_path / "tracked")])
    assert r.exit_code == 0, r.output
    a, b = load_file(str(tmp_path / "plain" / "last.safetensors")), load_file(str(tmp_path / "tracked" / "last.safetensors"))
    assert all(a[k].equal(b[k]) for k in a)  # bit-identical trajectory
    rows = [json.loads(line) for line in (tmp_path / "tracked" / "metrics.jsonl").read_text().splitlines()]
    assert all(len(row["grad_cos"]) == 5 and row["grad_cos_min"] == min(row["grad_cos"]) for row in rows)
    assert all(-1.0 <= v <= 1.0 for row in rows for v in row["grad_cos"])
    assert (tmp_path / "tracked" / "gradient_confusion.png").read_bytes()[:4] == b"\x89PNG"
    r = CliRunner().invoke(app, [*common, "--track", "gradient-confusion:pairs=0", "-o", str(tmp_path / "bad")])
    assert r.exit_code == 2 and "pairs=0 is out of range" in r.stderr


def test_methods_density_draws_one_line_per_method_per_panel(tmp_path, monkeypatch):
    import json

    from kflo_cli.analysis.confusion import last_similarities, methods_figure
    from kflo_cli.sweep.report import confusion_plot

    panels = {"lenet5 · digits": {"vanilla": [0.1, 0.2, 0.05], "expandnet-ck": [0.3, 0.35, 0.4, 0.2]}}
    fig = methods_figure(panels)
    (ax,) = fig.axes
    assert len(ax.get_lines()) == 2 and ax.get_xlabel().startswith("cosine similarity") and ax.get_ylabel() == "density"
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["vanilla (min +0.050, 3 pairs)", "expandnet-ck (min +0.200, 4 pairs)"]
    # a sweep's runs that tracked it: the last epoch's similarities of each finished run, seeds pooled per method
    rows = []
    for method, seed, sims in (("vanilla", 0, [0.1, 0.2]), ("vanilla", 1, [0.05]), ("ck", 0, [0.3, 0.4]),
                               ("ck", 1, None)):
        run = tmp_path / "runs" / method / f"seed{seed}"
        run.mkdir(parents=True)
        if sims is not None:
            lines = [{"epoch": 1, "grad_cos": [0.9]}, {"epoch": 2, "grad_cos": sims}]
            (run / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{\"epoch\": 3, \"grad")
        rows.append({"model": "lenet5", "data": "digits", "method": method, "seed": seed, "status": "done",
                     "run_dir": str(run.relative_to(tmp_path))})
    assert last_similarities(tmp_path / "runs/vanilla/seed0") == (2, [0.1, 0.2])  # the cut last line is skipped
    grid = type("G", (), {"name": "g"})()
    out = tmp_path / "gradient_confusion.png"
    seen = {}
    import kflo_cli.analysis.confusion as confusion

    real = confusion.write_methods_density
    monkeypatch.setattr(confusion, "write_methods_density", lambda p, path, title="": (seen.update(p), real(p, path, title)))
    assert confusion_plot(grid, rows, tmp_path, out)
    assert seen == {"lenet5 · digits": {"vanilla": [0.1, 0.2, 0.05], "ck": [0.3, 0.4]}}
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    assert not confusion_plot(grid, [{**r, "status": "failed"} for r in rows], tmp_path, out) and not out.exists()


def test_gradient_confusion_over_the_composed_weights_is_the_collapsed_networks(tmp_path):
    """params=composed compares the gradients of the composed weights: for y = W' x with loss sum(y), a batch's
    gradient is its summed input, whatever the factors, so the similarities are those of the inputs (the
    hand-computed case above); over the trained factors they differ."""
    from kflo_cli.analysis.confusion import pair_similarities
    from kflo_cli.train.engine import composed_view

    torch.manual_seed(0)
    model = kflo.expand(torch.nn.Sequential(torch.nn.Linear(2, 1, bias=False)), "kflo:depth=2,width=4")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    batches = [(torch.tensor([[1.0, 0.0]]), None), (torch.tensor([[1.0, 1.0]]), None),
               (torch.tensor([[0.0, 2.0]]), None), (torch.tensor([[0.0, -1.0]]), None)]
    loss = lambda out, _: out.sum()  # noqa: E731
    assert pair_similarities(composed_view(model), batches, loss) == pytest.approx([2 ** -0.5, -1.0])
    trained = pair_similarities(model, batches, loss)
    assert trained[0] != pytest.approx(2 ** -0.5, abs=1e-3)


def test_track_gradient_confusion_of_both_parameterizations(tmp_path):
    import json

    from typer.testing import CliRunner

    from kflo_cli.cli import app

    common = ["train", "lenet5", "--data", "digits", "--epochs", "1", "--train-fraction", "0.2", "--batch-size", "32",
              "--threads", "1"]
    r = CliRunner().invoke(app, [*common, "--recipe", "kflo", "--track", "gradient-confusion:pairs=4,params=both",
                                 "-o", str(tmp_path / "both")])
    assert r.exit_code == 0, r.output
    (row,) = [json.loads(line) for line in (tmp_path / "both" / "metrics.jsonl").read_text().splitlines()]
    assert len(row["grad_cos"]) == len(row["grad_cos_composed"]) == 4
    assert row["grad_cos_composed_min"] == min(row["grad_cos_composed"])
    assert row["grad_cos"] != row["grad_cos_composed"]  # the two parameterizations' gradients differ
    # a structural recipe's collapse is another function in training mode: refused before the run starts
    r = CliRunner().invoke(app, [*common, "--recipe", "acnet", "--track", "gradient-confusion:params=composed",
                                 "-o", str(tmp_path / "acnet")])
    assert r.exit_code == 2 and "acnet does not have" in " ".join(r.stderr.split())
    assert not (tmp_path / "acnet" / "metrics.jsonl").exists()
    r = CliRunner().invoke(app, [*common, "--track", "gradient-confusion:params=factors", "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "params=factors is unknown" in r.stderr


def test_run_plots_have_the_expected_content():
    """weights.png: one panel per tracked layer with its median line and four percentile bands; gradient_confusion.png:
    minimum and mean per epoch (and the composed weights' with params=both) and one density per parameterization."""
    from kflo_cli.analysis.confusion import density_figure
    from kflo_cli.analysis.tracking import weight_bands_figure

    bands = [9.0, 7.0, 5.0, 3.0, 0.0, -3.0, -5.0, -7.0, -9.0]
    history = [{"epoch": e, "weights": {"features.0": [b * e for b in bands], "features.3": bands}} for e in (1, 2, 3)]
    fig = weight_bands_figure(history)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == ["features.0", "features.3"]
    for ax in panels:
        assert ax.get_xlabel() == "epoch" and ax.get_ylabel() == "effective weight"
        (median,) = ax.get_lines()
        assert list(median.get_ydata()) == [r["weights"][ax.get_title()][4] for r in history]
        assert len(ax.collections) == 4  # max-min, 93-7, 84-16, 69-31
    assert weight_bands_figure([{"epoch": 1}]) is None

    rows = [{"epoch": e, "grad_cos": [0.1 * e, -0.2, 0.3], "grad_cos_min": -0.2, "grad_cos_mean": 0.1} for e in (1, 2)]
    left, right = density_figure(rows).axes
    assert left.get_xlabel() == "epoch" and len(left.get_lines()) == 2
    assert right.get_ylabel() == "density" and len(right.get_lines()) == 1 and "3 pairs, epoch 2" in right.get_xlabel()
    both = [{**r, "grad_cos_composed": [0.0, 0.5, 0.2], "grad_cos_composed_min": 0.0, "grad_cos_composed_mean": 0.23}
            for r in rows]
    left, right = density_figure(both).axes
    assert len(left.get_lines()) == 4
    assert [t.get_text() for t in right.get_legend().get_texts()] == ["trained parameters", "composed weights"]
    assert density_figure([{"epoch": 1}]) is None
