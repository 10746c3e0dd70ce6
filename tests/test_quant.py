"""`kflo quant-check`: INT8 weight quantization per layer and end to end, and calibrated INT8 activations."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from typer.testing import CliRunner

from kflo_cli.cli import app
from kflo_cli.errors import KfloError

from conftest import assert_user_error

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


@pytest.fixture(scope="module")
def expanded(tmp_path_factory):
    """An untrained LeNet-5 expanded with KFLO (quant-check collapses it in memory)."""
    path = tmp_path_factory.mktemp("quant") / "e.safetensors"
    r = run("expand", "lenet5", "--recipe", "kflo", "-o", str(path))
    assert r.exit_code == 0, r.output
    return path


def test_int8_weight_quantization_matches_a_hand_computed_channel():
    from kflo_cli.quant import fake_quantize_weight

    # channel 0: max |w| = 1.27, scale 0.01 -> 0.123 rounds to 0.12; channel 1: scale 2/127
    w = torch.tensor([[1.27, -0.5, 0.123], [2.0, 1.0, -0.004]])
    q = fake_quantize_weight(w)
    torch.testing.assert_close(q[0], torch.tensor([1.27, -0.5, 0.12]), rtol=0, atol=1e-6)
    step = 2.0 / 127
    torch.testing.assert_close(q[1], torch.tensor([2.0, round(1.0 / step) * step, 0.0]), rtol=0, atol=1e-6)


def test_activation_observers_choose_the_grid_computed_by_hand():
    from kflo_cli.quant import activation_params, make_observer

    # unsigned affine [0, 255]: min 0, max 2.55 -> scale 2.55 / 255 = 0.01, zero point 0
    obs = make_observer("minmax", signed=False)
    obs(torch.tensor([0.0, 1.0, 2.55]))
    p = activation_params(obs)
    assert (p.dtype, p.zero_point, p.quant_min, p.quant_max) == ("quint8", 0, 0, 255)
    assert p.scale == pytest.approx(0.01, rel=1e-6) and (p.min, p.max) == pytest.approx((0.0, 2.55))
    # the grid keeps 0 exact: min 0.51, max 3.06 still gives [0, 3.06], scale 0.012
    obs = make_observer("minmax", signed=False)
    obs(torch.tensor([0.51, 3.06]))
    assert activation_params(obs).scale == pytest.approx(0.012, rel=1e-6)
    # signed symmetric [-127, 127]: max |x| = 1.27 -> scale 0.01, zero point 0
    obs = make_observer("minmax", signed=True)
    obs(torch.tensor([-1.27, 0.5]))
    p = activation_params(obs)
    assert (p.dtype, p.zero_point, p.quant_min, p.quant_max) == ("qint8", 0, -127, 127)
    assert p.scale == pytest.approx(0.01, rel=1e-6)
    with pytest.raises(KfloError, match="--observer"):
        make_observer("entropy", signed=False)


def test_fake_quantized_activations_of_a_known_tensor():
    from kflo_cli.quant import ActivationQuant

    unsigned = ActivationQuant("quint8", 0.0, 2.55, 0.01, 0, 0, 255)
    x = torch.tensor([0.004, 0.006, 1.234, 3.0, -0.1])
    # rounds to the 0.01 grid and clips to [0, 2.55]
    torch.testing.assert_close(unsigned.apply(x), torch.tensor([0.0, 0.01, 1.23, 2.55, 0.0]), rtol=0, atol=1e-6)
    signed = ActivationQuant("qint8", -1.27, 0.5, 0.01, 0, -127, 127)
    torch.testing.assert_close(signed.apply(torch.tensor([-1.5, 0.123, 1.3])), torch.tensor([-1.27, 0.12, 1.27]),
                               rtol=0, atol=1e-6)
    assert signed.bounds == pytest.approx((-1.27, 1.27))
    # 1.274 only rounds to the last grid point; 1.3 is clipped
    assert signed.saturated(torch.tensor([-1.3, -1.274, 0.0, 1.274, 1.3])).tolist() == [True, False, False, False, True]


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).eval()


def test_the_pre_hooks_equal_fake_quantizing_each_layer_input_by_hand():
    from kflo_cli.quant import activation_quantized, calibrate_activations, fake_quantize_weight

    model = _tiny()
    gen = torch.Generator().manual_seed(1)
    calib = [(torch.randn(16, 1, 6, 6, generator=gen), torch.zeros(16, dtype=torch.long)) for _ in range(3)]
    params = calibrate_activations(model, calib)
    assert sorted(params) == ["0", "3"]
    assert params["0"].dtype == "qint8" and params["3"].dtype == "quint8"  # the image is signed, post-ReLU is not
    everything = torch.cat([images for images, _ in calib])
    assert params["0"].min == pytest.approx(float(everything.min())) and params["0"].max == pytest.approx(float(everything.max()))

    def by_hand(x: torch.Tensor, quantize_weights: bool) -> torch.Tensor:
        def fq(t: torch.Tensor, name: str) -> torch.Tensor:
            p = params[name]
            return torch.fake_quantize_per_tensor_affine(t, p.scale, p.zero_point, p.quant_min, p.quant_max)

        conv, linear = model[0], model[3]
        w0 = fake_quantize_weight(conv.weight) if quantize_weights else conv.weight
        w3 = fake_quantize_weight(linear.weight) if quantize_weights else linear.weight
        h = torch.relu(nn.functional.conv2d(fq(x, "0"), w0, conv.bias)).flatten(1)
        return nn.functional.linear(fq(h, "3"), w3, linear.bias)

    x = torch.randn(8, 1, 6, 6, generator=gen) * 1.5  # also values beyond the calibrated range: clipped
    with torch.no_grad():
        a8 = activation_quantized(model, params)(x)
        w8a8 = activation_quantized(model, params, weights=True)(x)
        torch.testing.assert_close(a8, by_hand(x, False), rtol=0, atol=0)
        torch.testing.assert_close(w8a8, by_hand(x, True), rtol=0, atol=0)
        assert not torch.equal(a8, model(x))
    assert not model[0]._forward_pre_hooks  # the model itself is left without hooks


def test_the_calibration_images_are_training_images_never_test_images():
    from kflo_cli.data import build_data
    from kflo_cli.quant import calibration_batches

    bundle = build_data("digits", augment=False)
    calib = calibration_batches(bundle.train, 8)
    assert len(calib) == 8 and all(images.shape[0] == 128 for images, _ in calib)
    images = torch.cat([images for images, _ in calib]).flatten(1)
    assert torch.unique(images, dim=0).shape[0] == 1024  # distinct images
    test = torch.stack([bundle.test[i][0] for i in range(len(bundle.test))]).flatten(1)

    def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.cdist(a.double(), b.double(), compute_mode="donot_use_mm_for_euclid_dist")

    assert float(distance(images, test).min()) > 0.5  # no calibration image is a test image
    train = torch.stack([bundle.train[i][0] for i in range(len(bundle.train))]).flatten(1)
    assert float(distance(images, train).min(1).values.max()) == 0  # every one is a training image
    torch.testing.assert_close(torch.cat([i for i, _ in calibration_batches(bundle.train, 8)]).flatten(1), images)
    with pytest.raises(KfloError, match="at least 1"):
        calibration_batches(bundle.train, 0)
    with pytest.raises(KfloError, match="use at most 11"):
        calibration_batches(bundle.train, 12)


def test_w8a8_accuracy_of_a_small_trained_model_stays_close_to_float():
    from kflo_cli.data import build_data
    from kflo_cli.quant import calibration_batches, quant_check
    from kflo_cli.train.loader import eval_loader, iterate

    bundle = build_data("digits", augment=False)  # native 1 x 8 x 8
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train = list(iterate(torch.utils.data.DataLoader(bundle.train, batch_size=64, shuffle=True,
                                                     generator=torch.Generator().manual_seed(0))))
    for _ in range(4):
        for images, labels in train:
            opt.zero_grad()
            nn.functional.cross_entropy(model(images), labels).backward()
            opt.step()
    test = list(iterate(eval_loader(bundle.test, 256)))
    report = quant_check(model.eval(), (1, 8, 8), data=test, calibration=calibration_batches(bundle.train, 4))
    e2e = report.end_to_end
    assert list(e2e) == ["float32", "w8", "a8", "w8a8"]
    assert e2e["float32"].accuracy > 85 and e2e["float32"].output_rel_error == 0
    for name in ("w8", "a8", "w8a8"):
        assert abs(e2e[name].accuracy - e2e["float32"].accuracy) <= 2, (name, e2e)
        assert 0 < e2e[name].output_rel_error < 0.05, (name, e2e)
    assert report.int8_accuracy == e2e["w8"].accuracy and report.calibration == {"observer": "minmax", "batches": 4,
                                                                                    "images": 512}
    for layer in report.layers:
        a = layer.activation
        # about a step / sqrt(12) per value against values of the order of the range: well under 2 %
        assert a is not None and 0 < a.rel_error < 0.02 and 0 <= a.clipped < 0.01, (layer.name, a)
    with pytest.raises(KfloError, match="test data"):
        quant_check(model, (1, 8, 8), calibration=test)


def test_quant_check_reports_every_layer_and_the_accuracy_with_int8_weights(expanded, tmp_path):
    out = tmp_path / "q.json"
    r = run("quant-check", str(expanded), "--data", "digits", "--json", str(out), "--threads", "1")
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert [x["name"] for x in report["layers"]] == ["features.0", "features.3", "classifier.0", "classifier.2",
                                                    "classifier.4"]
    # 8 bits per channel: a relative error of about 1/(127*sqrt(3)) of a uniform weight, well under 1 %
    assert all(0 < x["rel_error"] < 0.01 and x["outlier"] > 1 for x in report["layers"])
    assert 0 < report["output_rel_error"] < 0.05
    assert abs(report["int8_accuracy"] - report["float_accuracy"]) < 5
    assert_user_error(run("quant-check", str(tmp_path / "missing.safetensors")), "does not exist")


def test_quant_check_with_data_calibrates_activations_and_reports_w8a8(expanded, tmp_path):
    out = tmp_path / "q.json"
    r = run("quant-check", str(expanded), "--data", "digits", "--calib-batches", "2", "--json", str(out),
            "--threads", "1")
    assert r.exit_code == 0, r.output
    for text in ("input range", "input scale", "input error", "INT8 activations (A8)", "both (W8A8)",
                 "256 digits training images (2 batches of 128", "359 digits test images"):
        assert text in r.output, r.output
    report = json.loads(out.read_text())
    assert report["calibration"] == {"observer": "minmax", "batches": 2, "images": 256}
    assert list(report["end_to_end"]) == ["float32", "w8", "a8", "w8a8"]
    assert report["end_to_end"]["w8"]["accuracy"] == report["int8_accuracy"]
    assert all(0 < report["end_to_end"][k]["output_rel_error"] < 0.05 for k in ("w8", "a8", "w8a8"))
    acts = [layer["activation"] for layer in report["layers"]]
    # the normalised image is signed; every later layer reads a ReLU's output
    assert [a["dtype"] for a in acts] == ["qint8"] + ["quint8"] * 4
    assert all(a["min"] < a["max"] and a["scale"] > 0 and 0 < a["rel_error"] < 0.02 for a in acts)
    assert acts[0]["scale"] == pytest.approx(max(-acts[0]["min"], acts[0]["max"]) / 127, rel=1e-5)
    assert acts[1]["scale"] == pytest.approx(acts[1]["max"] / 255, rel=1e-5)

    r = run("quant-check", str(expanded), "--json", str(out), "--threads", "1")
    assert r.exit_code == 0 and "note: activations are not quantized" in r.output and "input range" not in r.output
    report = json.loads(out.read_text())
    assert report["calibration"] is None and report["end_to_end"] == {}
    assert all(layer["activation"] is None for layer in report["layers"])

    assert_user_error(run("quant-check", str(expanded), "--calib-batches", "0"), "--calib-batches 0", "at least 1")
    assert_user_error(run("quant-check", str(expanded), "--data", "digits", "--calib-batches", "12"),
                      "1,438", "use at most 11")
    assert_user_error(run("quant-check", str(expanded), "--observer", "entropy"), "minmax, histogram")
