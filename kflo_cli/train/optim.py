"""Each recipe's optimisation rules: parameter groups, penalties, the modified adaptive step and the schedule.

* Parameter groups and penalties follow the recipes' parameter roles (:func:`kflo_cli.roles.param_roles`), which
  carry each rule: KFLO (Henig & Giryes) decays the composed kernel (a loss term) and puts 1e-9 on the cascade;
  the weight compander (Cakaj, Mehnert & Yang) decays Psi(v) (fixed a, b) or v (learnable a, b); ExpandNets
  (Guo, Alvarez & Salzmann) decay every factor, or with ``decay=composed`` the product. This module knows no
  recipe by name: a plugin's roles get the same treatment.
* The compander's modified adaptive step (Adam family): the adaptive step is computed from dL/dPsi(v) and then
  multiplied by Psi'(v) (see :class:`ModifiedAdaptiveStep`).
* :func:`optimizer_step` is the one place where backward, AMP unscaling, clipping and the step are ordered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.nn as nn

from ..errors import KfloError
from ..reparam import ParamRole
from ..roles import composed_decays, decay_penalty, param_roles, resolve_decay, step_scales
from .config import ADAPTIVE_OPTIMIZERS, TrainConfig


@dataclass
class GroupSpec:
    """One optimizer parameter group, with what the table at the start of a run prints about it."""

    label: str
    weight_decay: float
    scaled: bool = False
    names: list[str] = field(default_factory=list)
    params: list[nn.Parameter] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def effective_decay(name: str, param: torch.Tensor, role: ParamRole, config: TrainConfig) -> tuple[float, str]:
    """The optimizer's weight decay of one parameter and the label of its group.

    A role whose decay targets the composed weight gets none here (the loss term of :func:`total_penalty` carries
    it). A recipe's explicit ``"none"`` or float wins. ``"default"`` means the run's ``--weight-decay``, except on
    1-D parameters (biases, norm scales and shifts), which get none unless ``--decay-norm-bias`` (timm's
    convention: decaying a BatchNorm scale fights the normalisation, and biases do not over-fit).
    """
    kind = role.kind
    if role.decay_target == "composed":
        return 0.0, f"{kind} (decay on composed weight)"
    if role.weight_decay == "default" and param.ndim <= 1 and not config.decay_norm_bias:
        return 0.0, f"{kind} 1-D (bias/norm)"
    return resolve_decay(role, config.weight_decay), kind


def build_param_groups(model: nn.Module, config: TrainConfig) -> list[GroupSpec]:
    """Group the trainable parameters by (role label, weight decay, modified step), in first-seen order."""
    roles = param_roles(model)
    scaled_names = set(step_scales(model)) if config.optimizer in ADAPTIVE_OPTIMIZERS else set()
    groups: dict[tuple[str, float, bool], GroupSpec] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay, label = effective_decay(name, param, roles[name], config)
        scaled = name in scaled_names
        key = (label, decay, scaled)
        if key not in groups:
            groups[key] = GroupSpec(label, decay, scaled)
        groups[key].names.append(name)
        groups[key].params.append(param)
    return list(groups.values())


#: Keys of the groups :func:`param_groups` returns: the decay they were built for (the run's) and whether 1-D
#: parameters take it, so a trainer that regroups them (:class:`kflo_cli.lightning.KfloCallback`) changes nothing.
BASE_DECAY = "kflo_base_decay"
NORM_BIAS = "kflo_decay_norm_bias"


def rules_config(weight_decay: float, *, adaptive: bool = False, decay_norm_bias: bool = True) -> TrainConfig:
    """A configuration holding the three settings :func:`build_param_groups` reads (for loops other than kflo's)."""
    return TrainConfig(weight_decay=float(weight_decay), decay_norm_bias=decay_norm_bias,
                       optimizer=ADAPTIVE_OPTIMIZERS[0] if adaptive else "sgd")


def param_groups(model: nn.Module, weight_decay: float, *, adaptive: bool = False,
                 decay_norm_bias: bool = True) -> list[dict[str, Any]]:
    """The recipes' optimizer parameter groups of ``model``, for any ``torch.optim`` optimizer in your own loop.

    Each group has the weight decay its parameters' roles ask for (:func:`kflo_cli.param_roles`): ``weight_decay``
    for ordinary parameters (with ``decay_norm_bias=False`` none on 1-D ones, kflo train's default), none where the
    decay goes on the composed weight (add :func:`kflo_cli.decay_penalty` to the loss), a recipe's own number where
    it fixes one. ``adaptive=True`` (AdamW) gives the groups with the modified adaptive step no decay:
    :class:`ModifiedAdaptiveStep` then applies it.

    >>> import kflo_cli as kflo, torch
    >>> m = kflo.expand(kflo.create_model("lenet5"), "kflo")
    >>> opt = torch.optim.SGD(kflo.param_groups(m, 5e-4), lr=0.01, momentum=0.9)
    >>> sorted({g["kflo_label"]: g["weight_decay"] for g in opt.param_groups}.items())[0]
    ('kflo-cascade', 1e-09)
    """
    specs = build_param_groups(model, rules_config(weight_decay, adaptive=adaptive, decay_norm_bias=decay_norm_bias))
    return [{**group, BASE_DECAY: float(weight_decay), NORM_BIAS: decay_norm_bias} for group in torch_param_groups(specs)]


def total_penalty(model: nn.Module, config: TrainConfig) -> torch.Tensor:
    """The loss term of the recipes' composed-weight decays (:func:`kflo_cli.roles.decay_penalty`)."""
    return decay_penalty(model, config.weight_decay)


def penalty_rows(model: nn.Module, config: TrainConfig) -> list[tuple[str, int, float]]:
    """(description, number of layers, weight decay) of every penalty term, for the table at the start."""
    rows: dict[tuple[str, float], int] = {}
    for _, _, recipe, decay in composed_decays(model, config.weight_decay):
        key = (f"{recipe}: decay/2 * ||composed W||^2 (loss term)", decay)
        rows[key] = rows.get(key, 0) + 1
    return [(label, n, decay) for (label, decay), n in rows.items()]


def torch_param_groups(groups: list[GroupSpec]) -> list[dict[str, Any]]:
    """The optimizer's parameter-group dicts of ``groups``: each its own weight decay (0 for groups with the modified
    adaptive step, whose decay :class:`ModifiedAdaptiveStep` applies) and kflo's label and decay, for the table."""
    return [{"params": g.params, "weight_decay": 0.0 if g.scaled else g.weight_decay, "kflo_label": g.label,
             "kflo_decay": g.weight_decay} for g in groups]


def build_optimizer(groups: list[GroupSpec], config: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, nesterov) or AdamW over the groups, each with its own weight decay.

    Groups with the modified adaptive step are given ``weight_decay=0``: :class:`ModifiedAdaptiveStep` applies
    their (decoupled) decay itself so that it is not multiplied by the step scale.
    """
    torch_groups = torch_param_groups(groups)
    fused = fused_supported([p for g in groups for p in g.params])
    if config.optimizer == "sgd":
        return torch.optim.SGD(torch_groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                               fused=fused or None)
    return torch.optim.AdamW(torch_groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps, fused=fused or None)


#: Devices with PyTorch's fused SGD/AdamW kernels (one pass over parameter, gradient and state).
FUSED_DEVICES = ("cpu", "cuda")


def fused_supported(params: list[torch.Tensor]) -> bool:
    """Whether the fused optimizer kernels can take these parameters: all floating point, on one device of
    :data:`FUSED_DEVICES`. On CPU they run the step 5-8x faster than the per-parameter loop PyTorch otherwise uses
    there (it picks ``foreach`` only on CUDA), which matters when a recipe multiplies the parameter count
    (docs/performance.md). Same update rule, so runs stay comparable."""
    if not params:
        return False
    devices = {p.device for p in params}
    return (len(devices) == 1 and next(iter(devices)).type in FUSED_DEVICES
            and all(p.is_floating_point() for p in params))


class ModifiedAdaptiveStep:
    """The weight compander's modified adaptive step (Cakaj et al., after Schwarz et al.'s Powerpropagation).

    With w = Psi(v) the gradient is dL/dv = dL/dPsi * Psi'(v), and an adaptive optimizer would normalise the
    Psi'(v) factor away. Before the optimizer's step, this divides each scaled parameter's gradient by
    s = Psi'(v) (recomputed every step through :func:`kflo_cli.roles.step_scales`), so the optimizer sees
    dL/dPsi; after the step it multiplies the optimizer's update by s. Decoupled weight decay is applied
    before, unscaled, as AdamW would. Entries where s is 0 get no update.

    It hooks the optimizer's ``step``, so a step skipped by AMP's GradScaler is skipped here too. With
    ``pre_hook=False`` only the update is hooked and the caller runs :meth:`prepare` between backward and the step
    (PyTorch Lightning runs backward inside ``optimizer.step(closure)``, after the step's pre-hooks).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, groups: list[GroupSpec], *,
                 pre_hook: bool = True) -> None:
        self.model = model
        self.optimizer = optimizer
        self.targets: list[tuple[str, nn.Parameter, float]] = []
        for spec in groups:
            if spec.scaled:
                self.targets.extend((n, p, spec.weight_decay) for n, p in zip(spec.names, spec.params))
        self._saved: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = []
        self._handles = []
        if self.targets:
            if pre_hook:
                self._handles.append(optimizer.register_step_pre_hook(self._before))
            self._handles.append(optimizer.register_step_post_hook(self._after))

    @property
    def active(self) -> bool:
        return bool(self.targets)

    def prepare(self) -> None:
        """The work of the step's pre-hook (decay, gradients divided by the scales), for ``pre_hook=False``."""
        self._before(self.optimizer, (), {})

    @torch.no_grad()
    def _before(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        scales = step_scales(self.model)
        lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
        self._saved = []
        for name, p, decay in self.targets:
            if name not in scales:
                raise KfloError(f"the recipe gave no step scale for {name} this step; its step_scales() must cover the same parameters every step")
            s = scales[name].to(device=p.device, dtype=p.dtype).expand_as(p)
            if p.grad is None:
                continue
            if decay:
                p.mul_(1.0 - lr_of[id(p)] * decay)
            p.grad.copy_(torch.where(s != 0, p.grad / torch.where(s != 0, s, torch.ones_like(s)), torch.zeros_like(s)))
            self._saved.append((p, p.detach().clone(), s))

    @torch.no_grad()
    def _after(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for p, before, s in self._saved:
            p.copy_(before + (p - before) * s)
        self._saved = []


@dataclass(frozen=True)
class Schedule:
    """The learning-rate factor at each optimizer step (a pure function of the step: nothing to save but it).

    Linear warmup from ``1/warmup_steps`` to 1 over ``warmup_steps``, then ``cosine`` (to ``min_factor`` at
    the last step), ``multistep`` (times ``gamma`` at each milestone epoch) or ``constant``.
    """

    kind: str
    total_steps: int
    steps_per_epoch: int
    warmup_steps: int = 0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    min_factor: float = 0.0

    @classmethod
    def from_config(cls, config: TrainConfig, steps_per_epoch: int) -> "Schedule":
        total = config.epochs * steps_per_epoch
        return cls(
            config.schedule,
            total,
            steps_per_epoch,
            warmup_steps=min(total, int(round(config.warmup_epochs * steps_per_epoch))),
            milestones=tuple(config.milestones),
            gamma=config.gamma,
            min_factor=config.min_lr / config.lr,
        )

    def factor(self, step: int) -> float:
        """The multiplier of the base learning rate for optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        if self.kind == "multistep":
            passed = sum(step >= m * self.steps_per_epoch for m in self.milestones)
            return self.gamma**passed
        span = max(1, self.total_steps - self.warmup_steps - 1)
        t = min(1.0, (step - self.warmup_steps) / span)
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * t))

    def apply(self, optimizer: torch.optim.Optimizer, step: int, base_lr: float) -> float:
        """Set every group's learning rate for ``step``; return it."""
        lr = base_lr * self.factor(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return lr


def optimizer_step(
    loss: torch.Tensor | None,
    optimizer: torch.optim.Optimizer,
    params: Iterable[torch.Tensor],
    *,
    scaler: torch.amp.GradScaler | None = None,
    clip_norm: float | None = None,
) -> None:
    """Backward, then the AMP/clipping/step sequence in the only order that is right.

    1. backward on the (scaled) loss;
    2. ``scaler.unscale_``, so that clipping and the step see true gradients;
    3. clip the total L2 norm to ``clip_norm``;
    4. ``scaler.step`` (skips the step when a gradient is inf/NaN, i.e. the scale was too high) and
       ``scaler.update``, or a plain ``optimizer.step``;
    5. clear the gradients.
    """
    params = [p for p in params if p.requires_grad]
    scaled = scaler is not None and scaler.is_enabled()
    if loss is not None:  # None: the caller has back-propagated already (gradient accumulation)
        (scaler.scale(loss) if scaled else loss).backward()
    if scaled:
        scaler.unscale_(optimizer)
    if clip_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
    if scaled:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


__all__ = [
    "BASE_DECAY",
    "GroupSpec",
    "ModifiedAdaptiveStep",
    "Schedule",
    "build_optimizer",
    "build_param_groups",
    "effective_decay",
    "fused_supported",
    "NORM_BIAS",
    "optimizer_step",
    "param_groups",
    "penalty_rows",
    "rules_config",
    "torch_param_groups",
    "total_penalty",
]
