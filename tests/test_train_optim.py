"""Engine units: parameter groups per recipe, penalties, the modified adaptive step, the schedule, the
AMP/clip/step ordering, EMA, configuration precedence, RNG state and the batch plan."""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pytest
import torch
import torch.nn as nn

import kflo_cli as kflo
from kflo_cli.errors import KfloError
from kflo_cli.reparam import ParamRole, WeightRecipe
from kflo_cli.train.config import TrainConfig, check_resume_overrides, resolve_config
from kflo_cli.train.ema import ModelEma
from kflo_cli.train.loader import SeededSamples, epoch_batches
from kflo_cli.train.optim import (
    ModifiedAdaptiveStep,
    Schedule,
    build_optimizer,
    build_param_groups,
    optimizer_step,
    penalty_rows,
    total_penalty,
)
from kflo_cli.train.state import capture_rng, restore_rng

from recipe_checks import builtin_recipe_names, expand_first_applicable


def decays(model: nn.Module, config: TrainConfig) -> dict[str, tuple[str, float, bool]]:
    """Full parameter name -> (group label, weight decay, modified step) from the engine's groups."""
    out = {}
    for g in build_param_groups(model, config):
        for name in g.names:
            assert name not in out, f"{name} is in two groups"
            out[name] = (g.label, g.weight_decay, g.scaled)
    return out


def expanded(spec: str, model_name: str = "lenet5", **kw) -> nn.Module:
    torch.manual_seed(0)
    return kflo.expand(kflo.create_model(model_name, **kw), spec)


# -- parameter groups ------------------------------------------------------------------------------------------
def test_vanilla_groups_follow_the_timm_convention():
    model = kflo.create_model("smallnet_k3", num_classes=10)
    cfg = TrainConfig(weight_decay=5e-4)
    got = decays(model, cfg)
    assert set(got) == {n for n, p in model.named_parameters()}
    for name, p in model.named_parameters():
        label, wd, scaled = got[name]
        assert not scaled
        # conv/linear weights decay; biases and BatchNorm scales/shifts (1-D) do not
        assert wd == (5e-4 if p.ndim > 1 else 0.0), name
    with_1d = decays(model, TrainConfig(weight_decay=5e-4, decay_norm_bias=True))
    assert all(wd == 5e-4 for _, wd, _ in with_1d.values())


def test_kflo_groups_and_penalty_match_the_paper():
    model = expanded("kflo:depth=3,width=2")
    cfg = TrainConfig(weight_decay=5e-4)
    got = decays(model, cfg)
    w1 = [n for n in got if n.endswith(".w1")]
    cascade = [n for n in got if ".cascade." in n]
    assert len(w1) == 5 and len(cascade) == 10  # 5 layers, B - 1 = 2 cascade matrices each
    assert all(got[n][1] == 0.0 and got[n][0] == "kflo-w1 (decay on composed weight)" for n in w1)
    assert all(got[n][1] == 1e-9 and got[n][0] == "kflo-cascade" for n in cascade)
    assert all(got[n][1] == 0.0 for n in got if n.endswith(".bias"))
    # the vanilla decay sits on the composed kernels, with the 1/2 of SGD's convention
    layers = [m for _, m, _ in kflo.rewritten_layers(model)]
    expected = sum(0.5 * 5e-4 * m.weight.pow(2).sum() for m in layers)
    penalty = total_penalty(model, cfg)
    assert torch.allclose(penalty, expected, rtol=1e-6)
    penalty.backward()
    conv = model.features[0]
    # gradient w.r.t. the composed kernel is wd * W' (checked through W_1 = dL/dW' reshaped times the cascade)
    inner = conv.parametrizations.weight[0]
    w_prime = inner.composed_matrix().detach()
    cascade_product = inner.cascade[1].detach() @ inner.cascade[0].detach()
    assert torch.allclose(inner.w1.grad, cascade_product.T @ (5e-4 * w_prime), rtol=1e-4, atol=1e-12)


def test_compander_fixed_decays_psi_not_v():
    model = expanded("compander")
    cfg = TrainConfig(weight_decay=1e-4)
    got = decays(model, cfg)
    v = [n for n in got if n.endswith(".v")]
    assert v and all(got[n][1] == 0.0 for n in v)
    layers = [m for _, m, _ in kflo.rewritten_layers(model)]
    expected = sum(0.5 * 1e-4 * m.weight.pow(2).sum() for m in layers)
    assert torch.allclose(total_penalty(model, cfg), expected, rtol=1e-6)


def test_compander_learnable_decays_v_only_and_scales_adam_steps():
    model = expanded("compander:learnable=fine")
    sgd = decays(model, TrainConfig(weight_decay=1e-4, optimizer="sgd"))
    adam = decays(model, TrainConfig(weight_decay=1e-4, optimizer="adamw"))
    for name, (label, wd, scaled) in adam.items():
        if name.endswith(".v"):
            assert wd == 1e-4 and scaled and label == "compander-v"
            assert not sgd[name][2]  # SGD already gets Psi'(v) from the chain rule
        elif name.endswith((".a", ".b")):
            assert wd == 0.0 and not scaled
    assert float(total_penalty(model, TrainConfig(weight_decay=1e-4))) == 0.0


class _TwoFactor(nn.Module):
    """W = A @ B on the flattened kernel: a stand-in for any factorised plugin recipe."""

    def __init__(self, shape: torch.Size, target: str) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.target = target
        out, fan = shape[0], math.prod(shape[1:])
        self.a = nn.Parameter(torch.empty(out, out))
        self.b = nn.Parameter(torch.empty(out, fan))

    def forward(self) -> torch.Tensor:
        return (self.a @ self.b).reshape(self.shape)

    @torch.no_grad()
    def right_inverse(self, weight: torch.Tensor) -> tuple[()]:
        self.a.copy_(torch.eye(self.a.shape[0]))
        self.b.copy_(weight.reshape(self.b.shape))
        return ()

    def roles(self) -> dict[str, ParamRole]:
        return {"a": ParamRole("two-factor", decay_target=self.target), "b": ParamRole("two-factor", decay_target=self.target)}


class _TwoFactorRecipe(WeightRecipe):
    """A plugin-style recipe whose own parameter says where the decay goes: the trainer knows no recipe names."""

    name = "two-factor-test"
    params = {"decay": kflo.Param(str, "parameter", "where the decay goes", choices=("parameter", "composed"))}

    def make_parametrization(self, layer):
        return _TwoFactor(layer.module.weight.shape, self.values["decay"])


def test_a_role_moves_factor_decay_onto_the_product():
    torch.manual_seed(0)
    model = kflo.expand(kflo.create_model("lenet5"), _TwoFactorRecipe())
    factors = decays(model, TrainConfig(weight_decay=5e-4))
    assert all(wd == 5e-4 for n, (_, wd, _) in factors.items() if n.endswith((".a", ".b")))
    assert float(total_penalty(model, TrainConfig(weight_decay=5e-4))) == 0.0
    model = kflo.expand(kflo.create_model("lenet5"), _TwoFactorRecipe(decay="composed"))
    cfg = TrainConfig(weight_decay=5e-4)
    composed = decays(model, cfg)
    assert all(wd == 0.0 for n, (_, wd, _) in composed.items() if n.endswith((".a", ".b")))
    layers = [m for _, m, _ in kflo.rewritten_layers(model)]
    assert len(layers) == 5
    expected = sum(0.5 * 5e-4 * m.weight.pow(2).sum() for m in layers)
    assert torch.allclose(total_penalty(model, cfg), expected, rtol=1e-6)
    assert penalty_rows(model, cfg) == [("two-factor-test: decay/2 * ||composed W||^2 (loss term)", 5, 5e-4)]


@pytest.mark.parametrize("decay", ["factors", "composed"])
def test_expandnet_decay_parameter(decay):
    torch.manual_seed(0)
    model = kflo.expand(kflo.create_model("smallnet_k7", num_classes=10), f"expandnet-ck:decay={decay}")
    cfg = TrainConfig(weight_decay=5e-4)
    got = decays(model, cfg)
    factors = [n for n in got if ".factors." in n and n.endswith(".weight")]
    assert len(factors) == 9  # 3 convolutions, each a chain of (7 - 1) / 2 = 3 links
    assert all(got[n][1] == (5e-4 if decay == "factors" else 0.0) for n in factors)
    layers = [m for _, m, _ in kflo.rewritten_layers(model)]
    expected = sum(0.5 * 5e-4 * m.weight.pow(2).sum() for m in layers) if decay == "composed" else torch.zeros(())
    assert torch.allclose(total_penalty(model, cfg), expected, rtol=1e-6)


@pytest.mark.parametrize("recipe", builtin_recipe_names())
def test_groups_cover_every_trainable_parameter_once_for_every_recipe(recipe):
    # on the first tiny model the recipe rewrites a layer of; a recipe that applies to none of them fails
    _, model = expand_first_applicable(recipe)
    for opt in ("sgd", "adamw"):
        got = decays(model, TrainConfig(optimizer=opt))
        assert set(got) == {n for n, p in model.named_parameters() if p.requires_grad}, recipe


# -- the modified adaptive step --------------------------------------------------------------------------------
def _adam_reference(v, grads_psi, scales, lr, wd, betas, eps):
    """Hand-written AdamW on g_Psi, with the step multiplied by Psi'(v) (Cakaj et al., III-A3)."""
    m = torch.zeros_like(v)
    s2 = torch.zeros_like(v)
    for t, (g, s) in enumerate(zip(grads_psi, scales), start=1):
        v = v * (1 - lr * wd)
        m = betas[0] * m + (1 - betas[0]) * g
        s2 = betas[1] * s2 + (1 - betas[1]) * g * g
        step = (m / (1 - betas[0] ** t)) / ((s2 / (1 - betas[1] ** t)).sqrt() + eps)
        v = v - lr * step * s
    return v


def test_modified_adaptive_step_matches_a_hand_written_reference():
    torch.manual_seed(0)
    model = kflo.expand(nn.Sequential(nn.Linear(6, 3)), "compander:learnable=fine,b=0.5")
    kflo.set_record(model, dataclasses.replace(kflo.record(model), model_id="test"))
    cfg = TrainConfig(optimizer="adamw", lr=0.01, weight_decay=0.1, betas=[0.9, 0.99], eps=1e-8)
    groups = build_param_groups(model, cfg)
    opt = build_optimizer(groups, cfg)
    hook = ModifiedAdaptiveStep(model, opt, groups)
    assert hook.active
    inner = model[0].parametrizations.weight[0]
    v0 = inner.v.detach().clone().double()
    grads_psi, scales = [], []
    x = torch.randn(8, 6)
    for _ in range(3):
        # only v trains here: freeze a, b so the reference needs no second optimizer
        inner.a.requires_grad_(False)
        inner.b.requires_grad_(False)
        w = model[0].weight  # one evaluation of Psi(v), so that dL/dPsi is observable
        w.retain_grad()
        loss = nn.functional.linear(x, w, model[0].bias).pow(2).sum()
        loss.backward()
        grads_psi.append(w.grad.detach().clone().double())
        scales.append(inner.slope().double())
        opt.step()
        opt.zero_grad()
    expected = _adam_reference(v0, grads_psi, scales, 0.01, 0.1, (0.9, 0.99), 1e-8)
    assert torch.allclose(inner.v.detach().double(), expected, rtol=1e-5, atol=1e-7)
    # and it differs from plain AdamW on dL/dv (the point of the modification)
    plain = _adam_reference(v0, [g * s for g, s in zip(grads_psi, scales)], [torch.ones_like(v0)] * 3, 0.01, 0.1, (0.9, 0.99), 1e-8)
    assert (plain - expected).abs().max() > 1e-4


# -- schedule ---------------------------------------------------------------------------------------------------
def test_schedules():
    cos = Schedule("cosine", total_steps=100, steps_per_epoch=10, warmup_steps=10, min_factor=0.1)
    assert [cos.factor(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert cos.factor(10) == pytest.approx(1.0) and cos.factor(99) == pytest.approx(0.1)
    mid = 10 + 89 / 2
    assert cos.factor(int(mid)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * int(mid - 10) / 89)))
    multi = Schedule("multistep", total_steps=100, steps_per_epoch=10, milestones=(3, 6), gamma=0.1)
    assert [multi.factor(s) for s in (0, 29, 30, 59, 60, 99)] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert Schedule("constant", 100, 10).factor(57) == 1.0
    cfg = TrainConfig(lr=0.2, min_lr=0.02, epochs=5, warmup_epochs=0.5, schedule="cosine")
    s = Schedule.from_config(cfg, steps_per_epoch=8)
    assert s.warmup_steps == 4 and s.total_steps == 40 and s.min_factor == pytest.approx(0.1)


# -- AMP / clipping / step ordering ---------------------------------------------------------------------------
def _quadratic(w0: list[float]):
    w = nn.Parameter(torch.tensor(w0))
    target = torch.tensor([1.0, -2.0])
    return w, lambda: 0.5 * ((w - target) ** 2).sum() * 10.0


def test_step_order_unscales_before_clipping():
    w, loss_fn = _quadratic([3.0, 4.0])
    true_grad = 10.0 * (w.detach() - torch.tensor([1.0, -2.0]))
    opt = torch.optim.SGD([w], lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = w.detach().clone()
    optimizer_step(loss_fn(), opt, [w], scaler=scaler, clip_norm=1.0)
    # the update is the true gradient clipped to norm 1: clipping saw unscaled gradients
    assert torch.allclose(before - w.detach(), true_grad / true_grad.norm(), rtol=1e-5)
    assert w.grad is None  # gradients cleared after the step


def test_step_is_skipped_on_inf_gradients():
    w, _ = _quadratic([3.0, 4.0])
    opt = torch.optim.SGD([w], lr=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    before = w.detach().clone()
    optimizer_step((w * torch.tensor([float("inf"), 1.0])).sum(), opt, [w], scaler=scaler, clip_norm=1.0)
    assert torch.equal(w.detach(), before)
    assert scaler.get_scale() < 2.0**10


def test_step_without_scaler_or_clip_is_plain_sgd():
    w, loss_fn = _quadratic([3.0, 4.0])
    opt = torch.optim.SGD([w], lr=0.01)
    expected = w.detach() - 0.01 * 10.0 * (w.detach() - torch.tensor([1.0, -2.0]))
    optimizer_step(loss_fn(), opt, [w])
    assert torch.allclose(w.detach(), expected)


# -- EMA --------------------------------------------------------------------------------------------------------
def test_ema_averages_parameters_and_bn_statistics():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = ModelEma(model, decay=0.9)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    model.train()(torch.randn(4, 2) * 3)  # moves running stats and num_batches_tracked
    for _ in range(2):
        ema.update(model)
    now = model.state_dict()
    for key, avg in ema.state_dict().items():
        if avg.is_floating_point():
            # two updates towards a constant target: start + (1 - 0.9^2) * (target - start)
            assert torch.allclose(avg, start[key] + (1 - 0.81) * (now[key] - start[key]), atol=1e-6), key
        else:
            assert torch.equal(avg, now[key]), key
    assert not any(p.requires_grad for p in ema.module.parameters())


# -- configuration ----------------------------------------------------------------------------------------------
def test_config_precedence_cli_over_file_over_defaults():
    cfg = resolve_config({"lr": 0.3, "epochs": None}, {"lr": 0.1, "epochs": 7, "weight-decay": 1e-4, "milestones": [2, 4]})
    assert cfg.lr == 0.3 and cfg.epochs == 7 and cfg.weight_decay == 1e-4 and cfg.milestones == [2, 4]
    assert cfg.batch_size == TrainConfig().batch_size


@pytest.mark.parametrize(
    "table, fragment",
    [({"learning_rate": 0.1}, "has no option 'learning_rate'"), ({"epochs": "ten"}, "epochs = 'ten'"),
     ({"source": "lenet5"}, "has no option 'source'"), ({"optimizer": "rmsprop"}, "--optimizer 'rmsprop'")],
)
def test_config_errors_name_the_problem(table, fragment):
    with pytest.raises(KfloError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        resolve_config({}, table)


def test_resume_refuses_changed_options():
    saved = resolve_config({"source": "lenet5", "lr": 0.1})
    check_resume_overrides(saved, {"lr": 0.1, "epochs": None})
    with pytest.raises(KfloError, match="--lr"):
        check_resume_overrides(saved, {"lr": 0.2})


# -- RNG and data order ------------------------------------------------------------------------------------------
def test_rng_capture_restore_roundtrip():
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    saved = capture_rng()
    first = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(5), np.random.rand(5), random.random()
    restore_rng(saved)
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]


def test_ranks_split_each_global_batch_of_the_single_process_order():
    single = epoch_batches(103, 8, seed=5, epoch=2)
    assert len(single) == 12 and all(len(b) == 8 for b in single)
    ranks = [epoch_batches(103, 8, seed=5, epoch=2, rank=r, world_size=2) for r in range(2)]
    for k, batch in enumerate(single):
        assert ranks[0][k] + ranks[1][k] == batch
    assert epoch_batches(103, 8, seed=5, epoch=3) != single  # reshuffled every epoch
    with pytest.raises(KfloError, match="divisible"):
        epoch_batches(103, 9, seed=5, epoch=0, world_size=2)
    with pytest.raises(KfloError, match="larger than the training set"):
        epoch_batches(5, 8, seed=5, epoch=0)


def test_seeded_samples_are_reproducible_and_leave_the_global_rng_alone():
    class Noisy(torch.utils.data.Dataset):
        def __len__(self):
            return 10

        def __getitem__(self, i):
            return torch.rand(2) + i

    ds = SeededSamples(Noisy(), seed=0)
    torch.manual_seed(0)
    expected_next = torch.rand(1)
    torch.manual_seed(0)
    a = ds[(1, 4)]
    assert torch.equal(torch.rand(1), expected_next)  # the loop's stream did not move
    assert torch.equal(ds[(1, 4)], a)
    assert not torch.equal(ds[(2, 4)], a) and not torch.equal(ds[(1, 5)] - 1, a)


class _BrokenAt3(torch.utils.data.Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, i):
        if i == 3:
            raise KfloError("img/3.png cannot be read as an image; replace or remove it")
        return torch.zeros(2), 0


@pytest.mark.parametrize("workers", [0, 1])
def test_data_errors_from_workers_keep_their_one_sentence(workers):
    from kflo_cli.train.loader import iterate

    loader = torch.utils.data.DataLoader(_BrokenAt3(), batch_size=2, num_workers=workers)
    with pytest.raises(KfloError) as err:
        list(iterate(loader))
    assert str(err.value) == "img/3.png cannot be read as an image; replace or remove it"

