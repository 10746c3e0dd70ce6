"""KfloCallback: a real Lightning fit on CPU (scikit-learn's digits), the recipes' optimizer rules and penalty, the
collapsed file, and the refusals."""

from __future__ import annotations

import sys
from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lightning")
import lightning as L  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import kflo_cli as kflo  # noqa: E402
from kflo_cli.lightning import KfloCallback  # noqa: E402

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*")  # Lightning's own use of a torch API

WD = 5e-4
#: The collapsed float32 model against the expanded one on real images: max |difference| / max |output|.
OUTPUT_RTOL = 1e-4


@lru_cache(maxsize=1)
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """640 training and 256 test images of scikit-learn's digits, upsampled to 16 x 16 and standardised."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0
    x = F.interpolate(x, size=16, mode="bilinear", align_corners=False)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:640], order[640:896]
    return x[train], y[train], x[test], y[test]


def fresh_lenet() -> torch.nn.Module:
    return kflo.create_model("lenet5", num_classes=10, img_size=16)


class Digits(L.LightningModule):
    """LeNet-5 on digits; records what the tests check (losses, the penalty, whether the model was expanded)."""

    def __init__(self, *, scheduler: bool = False, kflo_groups: bool = False, manual: bool = False,
                 adamw: bool = False) -> None:
        super().__init__()
        self.adamw = adamw
        torch.manual_seed(0)
        self.model = fresh_lenet()
        self.scheduler, self.kflo_groups = scheduler, kflo_groups
        self.automatic_optimization = not manual
        self.losses: list[float] = []
        self.expected: list[float] = []  # task loss + kflo.decay_penalty, computed here
        self.returned: list[float] = []  # the loss Lightning back-propagated
        self.expanded: list[bool] = []
        self.start: dict[str, torch.Tensor] = {}

    def on_fit_start(self) -> None:  # after the callbacks' on_fit_start: the expanded model's starting values
        self.start = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.losses.append(float(loss.detach()))
        self.expected.append(float(loss.detach()) + float(kflo.decay_penalty(self.model, WD).detach()))
        self.expanded.append(kflo.is_expanded(self.model))
        return loss

    def on_train_batch_end(self, outputs: dict, batch: object, batch_idx: int) -> None:
        self.returned.append(float(outputs["loss"]))

    def configure_optimizers(self) -> object:
        params = kflo.param_groups(self.model, WD) if self.kflo_groups else self.parameters()
        if self.adamw:
            optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=WD)
        else:
            optimizer = torch.optim.SGD(params, lr=0.02, momentum=0.9, weight_decay=WD)
        if self.scheduler:
            return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 1, 0.5)}
        return optimizer


def fit(module: L.LightningModule, callback: KfloCallback, epochs: int = 3, batches: int | None = None,
        shuffle: bool = True) -> L.Trainer:
    x, y, _, _ = digits()
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=shuffle, generator=torch.Generator().manual_seed(0))
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_train_batches=batches,
                        callbacks=[callback])
    trainer.fit(module, loader)
    return trainer


@pytest.mark.parametrize("recipe", ["kflo:depth=2,width=4", "acnet"])
def test_fit_trains_expanded_then_writes_an_equivalent_plain_checkpoint(recipe: str, tmp_path) -> None:
    module = Digits()
    callback = KfloCallback(recipe=recipe, collapse_to=tmp_path / "collapsed.safetensors")
    trainer = fit(module, callback)

    # trained expanded: every step saw the expanded model, every tensor moved (BatchNorm statistics too)
    assert module.expanded and all(module.expanded) and kflo.is_expanded(module.model)
    end = module.model.state_dict()
    moved = [k for k, v in module.start.items() if v.is_floating_point() and not torch.equal(v, end[k])]
    assert moved == [k for k, v in module.start.items() if v.is_floating_point()]
    if recipe == "acnet":
        assert any(k.endswith("_bn.running_mean") for k in moved)

    # the recipe's rules are in the optimizer, and its penalty in the loss Lightning back-propagated
    groups = trainer.optimizers[0].param_groups
    decay_of = {g["kflo_label"]: g["weight_decay"] for g in groups}
    if recipe.startswith("kflo"):
        assert decay_of["kflo-w1 (decay on composed weight)"] == 0.0  # its decay is the loss term
        assert decay_of["kflo-cascade"] == 1e-9
        assert decay_of["ordinary"] == WD
        assert callback.penalty_decay == WD and trainer.callback_metrics["kflo_penalty"] > 0
        assert module.returned == pytest.approx(module.expected, rel=1e-6)
        assert module.returned[0] > module.losses[0]
    else:  # ACNet has no rule of its own: the user's decay everywhere, no penalty
        assert set(decay_of.values()) == {WD} and callback.penalty_decay == 0.0
        assert module.returned == pytest.approx(module.losses, rel=1e-6)
    assert sum(module.losses[-5:]) < 0.6 * sum(module.losses[:5])

    # the file: the original architecture, strict, computing what the trained expanded model computes
    assert callback.report is not None and callback.report.passed
    plain = fresh_lenet()
    plain.load_state_dict(load_file(tmp_path / "collapsed.safetensors"), strict=True)
    assert not kflo.is_expanded(kflo.load(tmp_path / "collapsed.safetensors"))
    _, _, x_test, y_test = digits()
    with torch.no_grad():
        want = module.model.eval()(x_test)
        got = plain.eval()(x_test)
    assert float((got - want).abs().max() / want.abs().max()) < OUTPUT_RTOL
    assert float((got.argmax(1) == y_test).float().mean()) > 0.5  # chance: 0.1


def test_groups_built_with_param_groups_keep_their_scheduler(tmp_path) -> None:
    module = Digits(scheduler=True, kflo_groups=True)
    trainer = fit(module, KfloCallback(recipe="kflo", collapse_to=None, verify=False), epochs=1, batches=2)
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert len(scheduler.base_lrs) == len(trainer.optimizers[0].param_groups)
    assert min(g["weight_decay"] for g in trainer.optimizers[0].param_groups) == 0.0


def test_modified_adaptive_step_matches_kflo_train() -> None:
    """The compander's modified AdamW step under Lightning (backward inside optimizer.step) moves the weights as
    kflo train's optimizer does from the same start on the same batches."""
    from kflo_cli.train.config import TrainConfig
    from kflo_cli.train.optim import ModifiedAdaptiveStep, build_optimizer, build_param_groups, optimizer_step

    recipe, steps = "compander:learnable=fine", 3
    module = Digits(adamw=True)
    callback = KfloCallback(recipe=recipe, collapse_to=None, verify=False)
    fit(module, callback, epochs=1, batches=steps, shuffle=False)
    assert len(callback._steps) == 1 and callback._steps[0].active

    reference = kflo.expand(fresh_lenet(), recipe, seed=0)
    reference.load_state_dict(module.start)
    config = TrainConfig(optimizer="adamw", lr=1e-2, weight_decay=WD, decay_norm_bias=True)
    groups = build_param_groups(reference, config)
    optimizer = build_optimizer(groups, config)
    ModifiedAdaptiveStep(reference, optimizer, groups)
    x, y, _, _ = digits()
    for i in range(steps):
        loss = F.cross_entropy(reference(x[32 * i: 32 * (i + 1)]), y[32 * i: 32 * (i + 1)])
        optimizer_step(loss + kflo.decay_penalty(reference, WD), optimizer, reference.parameters())
    trained = module.model.state_dict()
    for name, value in reference.state_dict().items():
        assert not torch.equal(value, module.start[name]) or name.endswith("num_batches_tracked")
        torch.testing.assert_close(trained[name], value, rtol=1e-4, atol=1e-5)  # fused vs. plain AdamW


@pytest.mark.parametrize("case, match", [
    ("scheduler", "LR scheduler StepLR is already bound"),
    ("manual", "automatic_optimization = False"),
    ("no-model", "has no attribute 'model'"),
    ("no-record", "has no kflo record"),
])
def test_refusals(case: str, match: str, tmp_path) -> None:
    module = Digits(scheduler=case == "scheduler", manual=case == "manual")
    if case == "no-model":
        del module.model
    if case == "no-record":
        module.model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 10))
    with pytest.raises(kflo.KfloError, match=match):
        fit(module, KfloCallback(recipe="kflo", collapse_to=tmp_path / "c.safetensors"), epochs=1, batches=1)
    assert not (tmp_path / "c.safetensors").exists()


def test_import_without_lightning_names_the_extra(monkeypatch) -> None:
    import importlib

    monkeypatch.setitem(sys.modules, "lightning", None)  # what `import lightning` meets when it is not installed
    monkeypatch.delitem(sys.modules, "kflo_cli.lightning")
    with pytest.raises(kflo.KfloError) as caught:
        importlib.import_module("kflo_cli.lightning")
    assert isinstance(caught.value, ImportError)
    assert str(caught.value) == ("kflo_cli.lightning needs PyTorch Lightning, which is not installed; "
                                 "pip install 'kflo[lightning]'")
