"""`kflo quant-check`: INT8 weight quantization per layer and end to end."""

from __future__ import annotations

from typer.testing import CliRunner

from kflo_cli.cli import app

from conftest import assert_user_error

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, list(args))


def test_int8_weight_quantization_matches_a_hand_computed_channel():
    import torch

    from kflo_cli.quant import fake_quantize_weight

    # channel 0: max |w| = 1.27, scale 0.01 -> 0.123 rounds to 0.12; channel 1: scale 2/127
    w = torch.tensor([[1.27, -0.5, 0.123], [2.0, 1.0, -0.004]])
    q = fake_quantize_weight(w)
    torch.testing.assert_close(q[0], torch.tensor([1.27, -0.5, 0.12]), rtol=0, atol=1e-6)
    step = 2.0 / 127
    torch.testing.assert_close(q[1], torch.tensor([2.0, round(1.0 / step) * step, 0.0]), rtol=0, atol=1e-6)


def test_quant_check_reports_every_layer_and_the_accuracy_with_int8_weights(tmp_path):
    import json

    out = tmp_path / "q.json"
    r = run("expand", "lenet5", "--recipe", "kflo", "-o", str(tmp_path / "e.safetensors"))
    assert r.exit_code == 0, r.output
    r = run("quant-check", str(tmp_path / "e.safetensors"), "--data", "digits", "--json", str(out))
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    assert [x["name"] for x in report["layers"]] == ["features.0", "features.3", "classifier.0", "classifier.2",
                                                    "classifier.4"]
    # 8 bits per channel: a relative error of about 1/(127*sqrt(3)) of a uniform weight, well under 1 %
    assert all(0 < x["rel_error"] < 0.01 and x["outlier"] > 1 for x in report["layers"])
    assert 0 < report["output_rel_error"] < 0.05
    assert abs(report["int8_accuracy"] - report["float_accuracy"]) < 5
    assert_user_error(run("quant-check", str(tmp_path / "missing.safetensors")), "does not exist")
