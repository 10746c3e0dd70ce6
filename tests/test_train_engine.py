"""The training engine end to end on tiny data: each recipe family, outputs, exact resume, divergence, KD."""

from __future__ import annotations

import io
import json
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors.torch import load_file
from torch.utils.data import Dataset, TensorDataset

import kflo_cli as kflo
from kflo_cli.data import DataBundle
from kflo_cli.errors import KfloError
from kflo_cli.train import TrainingDiverged, TrainingInterrupted, resolve_config, resume, start
from kflo_cli.train.engine import task_loss
from kflo_cli.train.state import load_state


class _Augmented(Dataset):
    """Images with a random flip and noise drawn from torch's global RNG, like the data layer's augmentation."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        img = self.x[i]
        if torch.rand(()) < 0.5:
            img = img.flip(-1)
        return img + 0.05 * torch.randn_like(img), int(self.y[i])


def tiny(n: int = 96, classes: int = 3, chans: int = 1, size: int = 28, val: bool = False) -> DataBundle:
    """Class prototypes plus noise: learnable in a few steps, small enough for a CPU test."""
    g = torch.Generator().manual_seed(0)
    protos = torch.randn(classes, chans, size, size, generator=g)

    def draw(m: int):
        y = torch.arange(m) % classes
        return protos[y] + 0.8 * torch.randn(m, chans, size, size, generator=g), y

    x, y = draw(n)
    xt, yt = draw(48)
    xv, yv = draw(24)
    return DataBundle(
        name="tiny", train=_Augmented(x, y), val=TensorDataset(xv, yv) if val else None, test=TensorDataset(xt, yt),
        num_classes=classes, in_chans=chans, img_size=size, mean=(0.0,) * chans, std=(1.0,) * chans,
    )


QUIET = {"console": Console(file=io.StringIO()), "progress": False}
BASE = {"source": "lenet5", "epochs": 2, "batch_size": 16, "threads": 1, "lr": 0.05}


def cfg(**kw):
    return resolve_config({**BASE, **kw})


@pytest.mark.parametrize(
    "model, recipe, extra, data_kw",
    [
        ("lenet5", None, {}, {}),
        ("lenet5", "kflo:depth=3,width=2", {"ema": 0.9, "collapse_from": "ema"}, {}),
        ("lenet5", "compander:learnable=fine", {"optimizer": "adamw", "lr": 1e-3}, {}),
        ("lenet5", "powerprop", {"optimizer": "adamw", "lr": 1e-3}, {}),
        ("lenet5", "weightnorm", {"grad_clip": 1.0}, {}),
        ("smallnet_k3", "doconv", {"val_split": 0.0, "collapse_from": "best"}, {"chans": 3, "size": 32, "val": True}),
        ("smallnet_k3", "acnet", {"amp": True}, {"chans": 3, "size": 32}),
    ],
    ids=["vanilla", "kflo-ema", "compander-adamw", "powerprop-adamw", "weightnorm-clip", "doconv-best", "acnet-amp"],
)
def test_each_recipe_family_trains_collapses_and_verifies(tmp_path, model, recipe, extra, data_kw):
    config = cfg(source=model, epochs=1, recipe=[recipe] if recipe else [], **extra)
    result = start(config, tmp_path / "run", data=tiny(**data_kw), **QUIET)
    run = tmp_path / "run"
    s = result.summary
    for name in ("config.json", "state.safetensors", "last.safetensors", "best.safetensors", "metrics.jsonl",
                 "metrics.csv", "curves.png", "summary.json"):
        assert (run / name).is_file(), name
    assert json.loads((run / "summary.json").read_text())["steps"] == s.steps == 6
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 1 and {"train_loss", "train_acc", "test_loss", "test_acc", "lr"} <= set(history[0])
    assert (run / "metrics.csv").read_text().splitlines()[0].startswith("epoch,step,lr,train_loss")
    saved = json.loads((run / "config.json").read_text())
    assert {k: v for k, v in saved.items() if k not in ("run_id", "fingerprint")} == config.to_dict()
    assert saved["run_id"] == load_state(run)["info"]["run_id"] and len(saved["fingerprint"]) == 16
    last = kflo.load(run / "last.safetensors")
    if recipe is None:
        assert s.kind == "vanilla" and s.collapsed is None and not (run / "collapsed.safetensors").exists()
        assert "collapsed" not in json.loads((run / "summary.json").read_text())  # the keys of earlier versions
        return
    assert kflo.is_expanded(last)
    c = s.collapsed
    assert c.verification.passed and c.strict_load
    saved = json.loads((run / "summary.json").read_text())
    assert saved == json.loads(s.to_json()) and saved["collapsed"]["from"] == c.collapsed_from and "not_collapsed" not in saved
    # the deployed artifact: loads strictly into the untouched architecture and reproduces the reported accuracy
    plain = kflo.create_model(model, num_classes=3, in_chans=data_kw.get("chans", 1))
    plain.load_state_dict(load_file(str(run / "collapsed.safetensors")), strict=True)
    plain.eval()
    test = tiny(**data_kw).test
    with torch.no_grad():
        acc = 100.0 * (plain(test.tensors[0]).argmax(1) == test.tensors[1]).float().mean().item()
    assert acc == pytest.approx(c.test_acc)
    assert json.loads((run / "verification.json").read_text())["verification"]["passed"]


def _final(run_dir):
    state = load_state(run_dir)
    return state, {**{f"model/{k}": v for k, v in state["model"].items()}, **{f"ema/{k}": v for k, v in (state["ema"] or {}).items()}}


@pytest.mark.slow
@pytest.mark.parametrize("optimizer, recipe", [("sgd", "kflo"), ("adamw", "compander:learnable=fine")])
def test_interrupted_and_resumed_runs_end_bit_identical(tmp_path, optimizer, recipe):
    # 3 epochs of 6 steps; warmup, momentum/Adam moments, EMA and augmentation randomness all carry state
    config = cfg(epochs=3, recipe=[recipe], optimizer=optimizer, ema=0.8, warmup_epochs=0.5, lr=0.05 if optimizer == "sgd" else 1e-3)
    start(config, tmp_path / "straight", data=tiny(), **QUIET)
    with pytest.raises(TrainingInterrupted, match="kflo train --resume"):
        start(config, tmp_path / "pieces", data=tiny(), stop_after_steps=4, **QUIET)  # mid-epoch
    for stop in (6, 7, 17):  # end of an epoch (before its evaluation), just after, one step before the end
        with pytest.raises(TrainingInterrupted):
            resume(tmp_path / "pieces", data=tiny(), stop_after_steps=stop, **QUIET)
    resume(tmp_path / "pieces", data=tiny(), **QUIET)
    a_state, a = _final(tmp_path / "straight")
    b_state, b = _final(tmp_path / "pieces")
    assert a.keys() == b.keys() and len(a) > 10
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    opt_a, opt_b = a_state["optimizer"]["state"], b_state["optimizer"]["state"]
    assert all(torch.equal(opt_a[i][k], opt_b[i][k]) for i in opt_a for k in opt_a[i] if isinstance(opt_a[i][k], torch.Tensor))
    drop = ("images_per_s", "seconds")
    strip = lambda h: [{k: v for k, v in r.items() if k not in drop} for r in h]  # noqa: E731
    assert strip(a_state["info"]["history"]) == strip(b_state["info"]["history"])
    assert load_file(str(tmp_path / "straight" / "collapsed.safetensors")).keys() == load_file(str(tmp_path / "pieces" / "collapsed.safetensors")).keys()
    ca, cb = (load_file(str(tmp_path / d / "collapsed.safetensors")) for d in ("straight", "pieces"))
    assert all(torch.equal(ca[k], cb[k]) for k in ca)


def test_divergence_stops_with_a_clear_message_and_keeps_the_last_good_state(tmp_path):
    config = cfg(recipe=["kflo"], lr=1e8, momentum=0.0)
    with pytest.raises(TrainingDiverged, match="lower --lr") as info:
        start(config, tmp_path / "run", data=tiny(), **QUIET)
    assert "diverged" in str(info.value)
    state = load_state(tmp_path / "run")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert kflo.is_expanded(kflo.load(tmp_path / "run" / "last.safetensors"))


def test_weights_blown_up_by_an_epochs_last_step_are_not_saved(tmp_path):
    # One step per epoch: the step's loss is finite, the weights it leaves make non-finite outputs.
    config = cfg(lr=1e38, momentum=0.0, weight_decay=0.0, batch_size=96)
    with pytest.raises(TrainingDiverged, match="non-finite by the end of epoch 1"):
        start(config, tmp_path / "run", data=tiny(), **QUIET)
    state = load_state(tmp_path / "run")
    assert state["info"]["epoch"] == 0 and state["info"]["history"] == []
    last = load_file(str(tmp_path / "run" / "last.safetensors"))
    assert all(v.abs().max() < 1e3 for v in last.values() if v.is_floating_point())


def test_a_non_empty_run_dir_needs_resume_or_overwrite(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(KfloError, match="--resume .* or start over with --overwrite"):
        start(cfg(epochs=1), run, data=tiny(), **QUIET)
    start(cfg(epochs=1), run, data=tiny(), overwrite=True, **QUIET)
    assert (run / "notes.txt").read_text() == "mine"  # --overwrite removes only the run's own files
    with pytest.raises(KfloError, match="--lr differ"):
        resume(run, overrides={"lr": 0.5}, data=tiny(), **QUIET)


def test_knowledge_distillation(tmp_path):
    # the loss: (1 - a) CE + a T^2 KL(teacher_T || student_T)
    s, t, y = torch.randn(5, 3), torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1])
    p_t = F.softmax(t / 2.0, 1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / 2.0, 1))).sum(1).mean()
    assert torch.allclose(task_loss(s, y, t, 0.3, 2.0), 0.7 * F.cross_entropy(s, y) + 0.3 * 4.0 * kl, rtol=1e-5)
    assert torch.equal(task_loss(s, y, None, 0.3, 2.0), F.cross_entropy(s, y))
    start(cfg(epochs=1), tmp_path / "teacher", data=tiny(), **QUIET)
    teacher = tmp_path / "teacher" / "last.safetensors"
    result = start(cfg(epochs=1, recipe=["kflo"], teacher_checkpoint=str(teacher), kd_alpha=0.9), tmp_path / "student", data=tiny(), **QUIET)
    plain = start(cfg(epochs=1, recipe=["kflo"]), tmp_path / "plain", data=tiny(), **QUIET)
    kd_loss = json.loads((tmp_path / "student" / "metrics.jsonl").read_text())["train_loss"]
    ce_loss = json.loads((tmp_path / "plain" / "metrics.jsonl").read_text())["train_loss"]
    assert kd_loss != ce_loss and result.summary.collapsed.verification.passed and plain.summary.steps == 6


def test_checkpoint_sources(tmp_path):
    torch.manual_seed(0)
    plain = kflo.create_model("lenet5", num_classes=3)
    kflo.save(plain, tmp_path / "plain.safetensors")
    kflo.save(kflo.expand(plain, "kflo:depth=2,width=2"), tmp_path / "expanded.safetensors")
    # an expanded checkpoint trains as it is, with its recipe recorded
    result = start(cfg(source=str(tmp_path / "expanded.safetensors"), epochs=1), tmp_path / "a", data=tiny(), **QUIET)
    assert result.summary.kind == "expanded" and result.summary.collapsed.verification.passed
    assert kflo.read_metadata(tmp_path / "a" / "last.safetensors")["recipes"][0]["params"] == {"depth": 2, "width": 2.0, "mode": "auto",
                                                                                      "decay": "composed"}
    with pytest.raises(KfloError, match="already expanded"):
        start(cfg(source=str(tmp_path / "expanded.safetensors"), recipe=["kflo"]), tmp_path / "b", data=tiny(), **QUIET)
    # a plain checkpoint is expanded on the fly, starting from exactly its function
    result = start(cfg(source=str(tmp_path / "plain.safetensors"), epochs=1, recipe=["kflo"]), tmp_path / "c", data=tiny(), **QUIET)
    assert result.summary.kind == "expanded"
    with pytest.raises(KfloError, match="does not fit"):
        start(cfg(source=str(tmp_path / "plain.safetensors")), tmp_path / "d", data=tiny(classes=4), **QUIET)


class _Terminating(_Augmented):
    """Sends SIGTERM to this process when sample 0 is loaded: a signal that arrives in the middle of an epoch."""

    def __getitem__(self, i: int):
        if i == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().__getitem__(i)


def test_sigterm_finishes_the_step_and_saves(tmp_path):
    data = tiny()
    data.train = _Terminating(data.train.x, data.train.y)
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted, match="received SIGTERM") as info:
        start(cfg(recipe=["kflo"]), tmp_path / "run", data=data, **QUIET)
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler is removed again
    saved = load_state(tmp_path / "run")["info"]
    assert saved["global_step"] == info.value.step >= 1 and not saved["finished"]
    resume(tmp_path / "run", data=tiny(), **QUIET)
    assert load_state(tmp_path / "run")["info"]["finished"]


def test_config_json_of_earlier_versions_still_resumes(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        start(cfg(epochs=1), run, data=tiny(), stop_after_steps=2, **QUIET)
    saved = json.loads((run / "config.json").read_text())
    assert saved["init_from"] == [] and saved["init_from_expanded"] is None and saved["from_recipe_file"] == {}
    # before the redesign: decay_on was a training option, init_from one path or null, no newer keys
    old = {k: v for k, v in saved.items() if k not in ("init_from_expanded", "from_recipe_file")}
    (run / "config.json").write_text(json.dumps({**old, "decay_on": "composed", "init_from": None}))
    with pytest.raises(KfloError, match=r"decay_on = \"composed\".*--recipe expandnet-ck:decay=composed"):
        resume(run, data=tiny(), **QUIET)
    (run / "config.json").write_text(json.dumps({**old, "decay_on": "factors", "init_from": None}))
    assert resume(run, data=tiny(), **QUIET).summary.steps == 6
    from kflo_cli.train.config import config_from_dict

    assert config_from_dict({**old, "init_from": "plain.safetensors"}, "config.json").init_from == ["plain.safetensors"]
    with pytest.raises(KfloError, match="no longer a training option; .*expandnet-ck:decay=composed"):
        resolve_config({"decay_on": "composed"})


def test_default_threads_leave_busy_cores_alone(monkeypatch):
    """Without --threads a run takes the idle cores by the 1-minute load average (at least 1, at most torch's
    default), and records the number (a resumed run keeps it)."""
    import os

    import torch

    from kflo_cli.train import engine

    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.4, 3.0, 3.0))
    assert engine.default_threads() == (1, "2 cores, load average 3.4")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 1.0, 1.0))
    assert engine.default_threads()[0] == 8  # 15 idle cores, capped at torch's default
    monkeypatch.setattr(os, "getloadavg", lambda: (14.7, 1.0, 1.0))
    assert engine.default_threads()[0] == 1

    def no_load():
        raise OSError("no load average")

    monkeypatch.setattr(os, "getloadavg", no_load)
    assert engine.default_threads()[0] == 8
