"""kflo in a PyTorch Lightning run: :class:`KfloCallback` expands the LightningModule's model at ``setup``, applies
the recipes' optimisation rules to the optimizer ``configure_optimizers`` returns, and collapses, verifies and writes
the original architecture when ``fit`` ends (docs/integrations.md).

>>> import lightning as L
>>> from kflo_cli.lightning import KfloCallback
>>> trainer = L.Trainer(max_epochs=10, callbacks=[KfloCallback(recipe="kflo:depth=2,width=4")])  # doctest: +SKIP
>>> trainer.fit(module, loader)  # module.model: a model from kflo_cli.create_model  # doctest: +SKIP

Needs the optional extra: ``pip install 'kflo[lightning]'``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .checkpoint import model_metadata
from .errors import KfloError
from .pipeline import expand_model, save_collapsed
from .record import record
from .roles import composed_decays, decay_penalty, param_roles, step_scales
from .surgery import collapse, is_expanded, rewritten_layers
from .train.optim import (
    BASE_DECAY,
    NORM_BIAS,
    GroupSpec,
    ModifiedAdaptiveStep,
    build_param_groups,
    param_groups,
    rules_config,
    torch_param_groups,
)
from .train.parts import pretouched
from .verify import EquivalenceReport, verify_equivalence


class LightningMissing(KfloError, ImportError):
    """PyTorch Lightning is not installed (or too old); also an ``ImportError`` so ``try: import`` guards work."""


try:
    import lightning
    import lightning.pytorch as pl
except ImportError as _exc:
    raise LightningMissing("kflo_cli.lightning needs PyTorch Lightning, which is not installed; "
                           "pip install 'kflo[lightning]'") from _exc

if tuple(int(x) for x in lightning.__version__.split(".")[:2] if x.isdigit()) < (2, 2):
    raise LightningMissing(f"kflo_cli.lightning needs lightning>=2.2 but found {lightning.__version__}; "
                           "pip install -U 'kflo[lightning]'")


#: Strategies that flatten or shard parameters, so kflo cannot find a parameter's role by its name.
SHARDING_STRATEGIES = ("FSDP", "DeepSpeed", "ModelParallel")


def _device_type(module: nn.Module) -> str:
    """The device type of a module's first tensor (for ``torch.autocast``)."""
    first = next(iter(module.parameters()), None)
    return first.device.type if first is not None else "cpu"


class KfloCallback(pl.Callback):
    """Expand, train with the recipes' rules, collapse: kflo as a Lightning callback.

    * ``setup`` (fit only, before ``configure_optimizers``): expands ``getattr(pl_module, attr)`` in place with
      :func:`kflo_cli.expand_model`, the expansion ``kflo expand`` and ``kflo train`` use. The attribute must exist
      and be an ``nn.Module`` by then (built in ``__init__``: Lightning calls the module's own ``setup`` and
      ``configure_model`` after the callbacks'); otherwise one :class:`KfloError`. A model expanded already (a
      second ``fit``) is kept as it is.
    * ``on_fit_start`` (after ``configure_optimizers``, before a checkpoint's optimizer state is restored): splits
      each optimizer group by the recipes' parameter roles (:func:`kflo_cli.param_roles`): each part keeps the
      group's settings, its weight decay becomes the role's (the group's own decay standing for "the run's"), the
      modified adaptive step is attached for AdamW, and when a recipe decays a composed weight the module's
      ``training_step`` is wrapped to add :func:`kflo_cli.decay_penalty` to the loss it returns (logged as
      ``kflo_penalty``). Refused, in one sentence with the fix (the full list: docs/integrations.md): manual
      optimization, sharding strategies (FSDP, DeepSpeed), an optimizer that holds none of the expanded layers'
      parameters, groups that must be split while an LR scheduler is bound to them (build them with
      :func:`kflo_cli.param_groups`) or in an optimizer that cannot take more groups (LBFGS), and a modified
      adaptive step for an optimizer other than SGD or AdamW.
    * ``on_fit_end`` (rank zero): collapses the model, proves it equivalent in eval mode
      (:func:`kflo_cli.verify_equivalence`; a failure raises :class:`KfloError`) and writes ``collapse_to``
      atomically as a plain kflo checkpoint that loads with ``strict=True`` into the original architecture.
      ``pl_module`` keeps the trained *expanded* model (Lightning checkpoints and ``trainer.test`` use it); the
      plain one is ``callback.collapsed``, the proof ``callback.report``.

    Args:
        recipe: what :func:`kflo_cli.expand` takes: ``"kflo:depth=2,width=4"``, a list of specs, recipe instances.
        include, exclude: fnmatch globs over the model's module names.
        collapse_to: the plain checkpoint to write (relative to ``trainer.default_root_dir``); ``None`` writes
            nothing (the model then needs no kflo record; ``callback.collapsed`` still holds the plain model).
        attr: the LightningModule attribute holding the model.
        verify: prove the collapsed model equivalent before writing it.
        seed: seeds the random parts of the expansion (every rank expands alike).
        input_size: the verification's input size without the batch; default: the first training batch's, else the
            model's configured size.
        verify_rtol: the verification's tolerance (default: by dtype, :data:`kflo_cli.verify.DEFAULT_RTOL`).
    """

    def __init__(self, recipe: Any, *, include: Sequence[str] = (), exclude: Sequence[str] = (),
                 collapse_to: str | os.PathLike | None = "collapsed.safetensors", attr: str = "model",
                 verify: bool = True, seed: int | None = 0, input_size: Sequence[int] | None = None,
                 verify_rtol: float | None = None) -> None:
        super().__init__()
        self.recipe = recipe
        self.include = tuple(include)
        self.exclude = tuple(exclude)
        self.collapse_to = collapse_to
        self.attr = attr
        self.verify = verify
        self.seed = seed
        self.input_size = tuple(input_size) if input_size is not None else None
        self.verify_rtol = verify_rtol
        #: After fit: the collapsed (plain) model, and the equivalence proof (``None`` with ``verify=False``).
        self.collapsed: nn.Module | None = None
        self.report: EquivalenceReport | None = None
        #: After ``on_fit_start``: the decay of the composed-weight penalty (0: none) and the modified steps.
        self.penalty_decay = 0.0
        self._steps: list[ModifiedAdaptiveStep] = []
        self._seen_size: tuple[int, ...] | None = None
        self._wrapped: pl.LightningModule | None = None

    # -- setup: expand ------------------------------------------------------------------------------------------

    def model_of(self, pl_module: pl.LightningModule) -> nn.Module:
        """The model this callback expands (``getattr(pl_module, attr)``), refused unless it is an ``nn.Module``."""
        model = getattr(pl_module, self.attr, None)
        if not isinstance(model, nn.Module):
            found = "has no attribute" if model is None else f"holds a {type(model).__name__}, not an nn.Module, in"
            raise KfloError(f"KfloCallback expands {type(pl_module).__name__}.{self.attr} at setup, but the module "
                            f"{found} '{self.attr}' then; build the model in __init__ (Lightning runs the module's own "
                            f"setup and configure_model after the callbacks') or pass attr='NAME' naming it")
        return model

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        model = self.model_of(pl_module)
        if not pl_module.automatic_optimization:
            raise KfloError("KfloCallback applies the recipes' rules to Lightning's automatic optimization, but "
                            f"{type(pl_module).__name__} sets automatic_optimization = False; use automatic "
                            "optimization, or drop the callback and apply kflo_cli.param_roles and "
                            "kflo_cli.decay_penalty in your own steps (docs/integrations.md)")
        strategy = type(trainer.strategy).__name__
        if any(name in strategy for name in SHARDING_STRATEGIES):
            raise KfloError(f"KfloCallback cannot find the recipes' parameters under {strategy}, which flattens or "
                            "shards them; train with a single-device or DDP strategy")
        if self.collapse_to is not None and not record(model).model_id:
            raise KfloError(f"{type(pl_module).__name__}.{self.attr} has no kflo record, so collapse_to cannot be "
                            "written as a self-describing checkpoint; build the model with kflo_cli.create_model(NAME, "
                            "...) (or attach a record with kflo_cli.set_record), or pass collapse_to=None and save "
                            "callback.collapsed yourself")
        if not is_expanded(model):
            expand_model(model, self.recipe, include=self.include, exclude=self.exclude, seed=self.seed)
        if self.collapse_to is not None:
            model_metadata(model)  # refuse a model kflo could not write now, not after training

    # -- on_fit_start: the optimisation rules -------------------------------------------------------------------

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        model = self.model_of(pl_module)
        if not is_expanded(model):
            raise KfloError(f"{type(pl_module).__name__}.{self.attr} is not expanded at fit start (it was replaced "
                            "after setup); keep the model the callback expanded")
        layer_params = {id(p) for _, module, _ in rewritten_layers(model) for p in module.parameters()}
        held = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        if layer_params and not layer_params & held:
            raise KfloError("the optimizer holds none of the expanded layers' parameters; build it inside "
                            "configure_optimizers from self.parameters() (KfloCallback expands the model at setup, "
                            "before that hook runs), not in __init__")
        self._steps = []
        decays: set[float] = set()
        for optimizer in trainer.optimizers:
            decays |= self._apply_rules(trainer, model, optimizer)
        if len(decays) > 1:
            raise KfloError(f"the optimizer's groups give the layers whose composed weight kflo decays different weight "
                            f"decays ({', '.join(map(str, sorted(decays)))}); put those parameters in one group or "
                            "build the groups with kflo_cli.param_groups")
        self.penalty_decay = decays.pop() if decays else 0.0
        if self._steps and trainer.gradient_clip_val:
            raise KfloError("a recipe's modified adaptive step divides the gradients by its step scales before "
                            "Lightning clips them, so gradient_clip_val would clip other gradients than kflo train "
                            "does; drop gradient_clip_val or train with SGD")
        self._wrap_training_step(pl_module, model)

    def _apply_rules(self, trainer: pl.Trainer, model: nn.Module, optimizer: torch.optim.Optimizer) -> set[float]:
        """Split ``optimizer``'s groups by role, in place; return the decays of groups whose composed weight is
        decayed (the penalty's decay)."""
        adaptive = isinstance(optimizer, torch.optim.AdamW)
        roles = param_roles(model)
        composed = {id(p) for n, p in model.named_parameters() if n in roles and roles[n].decay_target == "composed"}
        names = {id(p): n for n, p in model.named_parameters()}
        held = {names[id(p)] for g in optimizer.param_groups for p in g["params"] if id(p) in names}
        if held & set(step_scales(model)) and not isinstance(optimizer, (torch.optim.AdamW, torch.optim.SGD)):
            raise KfloError(f"a recipe needs kflo's modified adaptive step, which KfloCallback applies to AdamW only "
                            f"(SGD needs none), not to {type(optimizer).__name__}; configure torch.optim.AdamW or SGD")
        specs_by_decay: dict[tuple[float, bool], dict[int, GroupSpec]] = {}
        new_groups: list[dict[str, Any]] = []
        scaled_specs: list[GroupSpec] = []
        decays: set[float] = set()
        for group in optimizer.param_groups:
            base = float(group.get(BASE_DECAY, group.get("weight_decay", 0.0)))
            if any(id(p) in composed for p in group["params"]):
                decays.add(base)
            # the group's own decay stands for the run's; 1-D parameters keep it unless param_groups said otherwise
            key = (base, bool(group.get(NORM_BIAS, True)))
            if key not in specs_by_decay:
                specs = build_param_groups(model, rules_config(base, adaptive=adaptive, decay_norm_bias=key[1]))
                specs_by_decay[key] = {id(p): spec for spec in specs for p in spec.params}
            where = specs_by_decay[key]
            parts: dict[int, GroupSpec] = {}
            others: list[torch.Tensor] = []
            for p in group["params"]:
                spec = where.get(id(p))
                if spec is None:  # not a trainable parameter of the model: left exactly as the user set it
                    others.append(p)
                    continue
                part = parts.setdefault(id(spec), GroupSpec(spec.label, spec.weight_decay, spec.scaled))
                part.names.append(names[id(p)])
                part.params.append(p)
            settings = {k: v for k, v in group.items() if k != "params"}
            for part in parts.values():
                new_groups.extend({**settings, **g, BASE_DECAY: base, NORM_BIAS: key[1]}
                                  for g in torch_param_groups([part]))
                if part.scaled:
                    scaled_specs.append(part)
            if others:
                new_groups.append({**settings, "params": others})
        same_shape = len(new_groups) == len(optimizer.param_groups) and all(
            [id(p) for p in a["params"]] == [id(p) for p in b["params"]]
            for a, b in zip(new_groups, optimizer.param_groups))
        if not same_shape:
            self._check_splittable(trainer, optimizer)
        optimizer.param_groups.clear()  # in place: Lightning's LightningOptimizer shares this list
        for group in new_groups:
            optimizer.add_param_group(group)
        if scaled_specs:
            self._steps.append(ModifiedAdaptiveStep(model, optimizer, scaled_specs, pre_hook=False))
        return decays

    @staticmethod
    def _check_splittable(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> None:
        kind = type(optimizer).__name__
        if not isinstance(optimizer, torch.optim.Optimizer) or isinstance(optimizer, torch.optim.LBFGS) or (
                kind == "ZeroRedundancyOptimizer"):
            raise KfloError(f"KfloCallback must split the parameter groups of {kind} by the recipes' roles, which "
                            "this optimizer cannot take; configure a torch.optim optimizer such as SGD or AdamW")
        for config in trainer.lr_scheduler_configs:
            if getattr(config.scheduler, "optimizer", None) is optimizer:
                raise KfloError(f"KfloCallback must split the parameter groups of {kind} by the recipes' roles, but LR "
                                f"scheduler {type(config.scheduler).__name__} is already bound to them; build the "
                                "optimizer in configure_optimizers from kflo_cli.param_groups(self.model, "
                                "weight_decay) and the scheduler on it")

    def _wrap_training_step(self, pl_module: pl.LightningModule, model: nn.Module) -> None:
        """Wrap ``training_step`` as kflo train's step runs (:func:`kflo_cli.train.loop.forward_loss`): under
        ``parametrize.cached()``, each composed weight computed once, up front and outside autocast (float32 under
        mixed precision), for the forward and the penalty alike; the composed-weight penalty added to the loss it
        returns, so Lightning's closure scales, accumulates and back-propagates it with the loss (logged as
        ``kflo_penalty``). Not wrapped when the model has neither parametrized weights nor a penalty (ACNet)."""
        self._unwrap()
        decay = self.penalty_decay
        penalised = bool(composed_decays(model, decay))
        touched = pretouched(model)
        if not penalised and not touched:
            return
        original: Callable[..., Any] = pl_module.training_step
        device_type = _device_type(model)

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            with parametrize.cached():
                with torch.autocast(device_type, enabled=False):
                    for module, name in touched:
                        getattr(module, name)
                out = original(*args, **kwargs)
                if out is None or not penalised:  # None: the user skips this batch
                    return out
                with torch.autocast(device_type, enabled=False):  # as the forward composes: in float32
                    penalty = decay_penalty(model, decay)
            loss = out["loss"] if isinstance(out, Mapping) else out
            if not isinstance(loss, torch.Tensor):
                return out  # Lightning refuses it with its own message
            total = loss + penalty.to(device=loss.device, dtype=loss.dtype)
            pl_module.log("kflo_penalty", penalty.detach())
            return {**out, "loss": total} if isinstance(out, Mapping) else total

        pl_module.training_step = training_step  # type: ignore[method-assign]
        self._wrapped = pl_module

    def _unwrap(self) -> None:
        if self._wrapped is not None and "training_step" in vars(self._wrapped):
            del self._wrapped.training_step
        self._wrapped = None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        """The modified adaptive step's first half, between backward and the update (in Lightning, backward runs
        inside ``optimizer.step``, after its pre-hooks). Skipped when AMP's scaler will skip the step."""
        for step in self._steps:
            if step.optimizer is not optimizer:
                continue
            if getattr(trainer.precision_plugin, "scaler", None) is not None and not all(
                    bool(torch.isfinite(p.grad).all()) for g in optimizer.param_groups for p in g["params"]
                    if p.grad is not None):
                continue
            step.prepare()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._seen_size is None:
            first = batch[0] if isinstance(batch, (list, tuple)) and batch else batch
            if isinstance(first, torch.Tensor) and first.is_floating_point() and first.ndim >= 2:
                self._seen_size = tuple(first.shape[1:])

    # -- on_fit_end: collapse, verify, write --------------------------------------------------------------------

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._unwrap()
        if not trainer.is_global_zero:
            return
        model = self.model_of(pl_module)
        plain = collapse(model)
        self.report = None
        if self.verify:
            size = self.input_size or self._seen_size
            report = verify_equivalence(model, plain, input_size=size, rtol=self.verify_rtol)
            if not report.passed:
                why = f"; {report.reason}" if report.reason else ""
                raise KfloError(f"the collapsed model does not compute what the trained expanded model does (relative "
                                f"error {report.rel_error:.3g} > {report.rtol:.3g}{why}); nothing was written: report "
                                f"this recipe bug and keep the expanded {type(pl_module).__name__}.{self.attr}")
            self.report = report
        if self.collapse_to is not None:
            path = Path(self.collapse_to)
            if not path.is_absolute():
                path = Path(trainer.default_root_dir) / path
            save_collapsed(plain, path, extra={"trained_with": "lightning", "global_step": int(trainer.global_step)})
        self.collapsed = plain

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._unwrap()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._unwrap()


__all__ = ["KfloCallback", "LightningMissing", "param_groups"]
