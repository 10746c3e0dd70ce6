"""``kflo bench``: the cost of training through a recipe, measured side by side with the vanilla model.

One process builds the vanilla model and its expansion (same seed, same weights), then measures, interleaved and
after a warm-up:

* parameters at training time and after collapse;
* MACs per image (``torch.utils.flop_counter``, which counts two FLOPs per multiply-accumulate): vanilla, the
  expansion as executed (its kernel compositions shared by the batch), and the paper's feature form where the
  recipe has one (``mode=feature``);
* the training step (forward, loss with the recipes' penalties, backward, optimizer step: what ``kflo train``
  does, with the same parameter groups), as median, min and max over the timed steps and its ratio to vanilla;
* peak memory of a training step: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the bytes resident before
  the step (parameters, buffers, optimizer state) plus the peak of the bytes the step allocates, from the
  PyTorch profiler's allocation events (tensor memory only: the interpreter and allocator caches are not counted,
  for either model);
* inference time of the collapsed model against vanilla (same architecture: 1.00 within noise);
* time to expand and to collapse.

Timings alternate which model runs first in each round, so drift on a busy machine hits both alike.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn

from .errors import KfloError
from .reparam.execution import chosen_forms

#: Bounds on the options (checked before anything is built).
MAX_BATCH = 65_536
MAX_STEPS = 100_000
MODES = ("kernel", "feature", "auto")


@dataclass
class Timing:
    """Seconds per call over the timed rounds."""

    median: float
    min: float
    max: float
    samples: int

    @classmethod
    def of(cls, seconds: Sequence[float]) -> "Timing":
        return cls(statistics.median(seconds), min(seconds), max(seconds), len(seconds))


@dataclass
class BenchSetting:
    """What was measured, and how: shared by :class:`BenchResult` and :class:`ModeComparison`."""

    model: str
    recipes: list[str]
    device: str
    threads: int
    batch_size: int
    input_size: list[int]
    compiled: bool
    amp: bool
    accumulate: int


@dataclass
class BenchResult(BenchSetting):
    """Everything ``kflo bench`` measured; ``ratio`` fields are expanded / vanilla."""

    params_vanilla: int
    params_training: int
    params_collapsed: int
    macs_vanilla: float
    macs_executed: float
    macs_feature_form: float | None
    step_vanilla: Timing
    step_expanded: Timing
    step_ratio: float
    #: The ratio of the fastest steps: on a shared machine other work only ever adds time, so the minimum of the
    #: interleaved steps is the steadier estimate of the intrinsic cost (the median is the headline figure).
    step_ratio_min: float
    memory_vanilla: int
    memory_expanded: int
    memory_ratio: float
    memory_method: str
    #: The issue's memory target: 1.3 x vanilla's peak + what the expansion must hold between steps beyond vanilla
    #: (its extra parameters, their gradients and optimizer state), in bytes; and whether the peak is within it.
    memory_allowance: int
    memory_within_target: bool
    infer_vanilla: Timing
    infer_collapsed: Timing
    infer_ratio: float
    expand_seconds: float
    collapse_seconds: float
    layers: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_options(batch_size: int, steps: int, warmup: int, input_size: Sequence[int] | None,
                   accumulate: int = 1) -> None:
    from .train.config import TrainConfig

    if not 1 <= batch_size <= MAX_BATCH:
        raise KfloError(f"--batch-size {batch_size} is out of range; use an integer from 1 to {MAX_BATCH}")
    if not 1 <= steps <= MAX_STEPS:
        raise KfloError(f"--steps {steps} is out of range; use an integer from 1 to {MAX_STEPS}")
    if not 0 <= warmup <= MAX_STEPS:
        raise KfloError(f"--warmup {warmup} is out of range; use an integer from 0 to {MAX_STEPS}")
    if input_size is not None:
        from .verify import check_options

        check_options(input_size=input_size)  # the input-size bound every command shares
    TrainConfig(batch_size=batch_size, accumulate=accumulate).validate()  # kflo train's own --accumulate bound


def with_mode(specs: Sequence[Any], mode: str | None) -> list[Any]:
    """The recipe specs with ``mode=MODE`` for every recipe that has an execution mode and does not name one.

    Refuses a mode no recipe understands, and a spec that names a different mode.
    """
    from .reparam.registry import get_recipe, parse_spec

    if mode is None:
        return list(specs)
    if mode not in MODES:
        raise KfloError(f"--mode {mode} is unknown; use one of {', '.join(MODES)}")
    out, taken = [], False
    for spec in specs:
        if not isinstance(spec, str):
            out.append(spec)
            continue
        name, values = parse_spec(spec)
        param = get_recipe(name).params.get("mode")
        if param is None:
            out.append(spec)
            continue
        choices = getattr(param, "choices", None)
        if choices and mode not in choices:
            raise KfloError(f"--mode {mode}: recipe {name} runs as one of {', '.join(map(str, choices))}; choose one of those")
        if "mode" in values and values["mode"] != mode:
            raise KfloError(f"--mode {mode} contradicts {spec}; drop one of them")
        taken = True
        out.append(spec if "mode" in values else f"{spec}{',' if ':' in spec else ':'}mode={mode}")
    if not taken:
        raise KfloError(f"--mode {mode}: none of the recipes ({', '.join(map(str, specs))}) has an execution mode; drop --mode")
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence the profiler's C++ log lines (written straight to file descriptor 2)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


class _Trainer:
    """One model with what ``kflo train`` gives it: parameter groups per recipe role, SGD, penalties, AMP."""

    def __init__(self, model: nn.Module, device: torch.device, *, amp: bool, compile_model: bool,
                 accumulate: int = 1) -> None:
        from .train.config import TrainConfig
        from .train.optim import ModifiedAdaptiveStep, build_optimizer, build_param_groups
        from .train.parts import pretouched

        self.config = TrainConfig(accumulate=accumulate)
        self.device = device
        self.model = model.to(device).train()
        groups = build_param_groups(self.model, self.config)
        self.optimizer = build_optimizer(groups, self.config)
        self.modified = ModifiedAdaptiveStep(self.model, self.optimizer, groups)
        self.parametrized = pretouched(self.model)
        self.net = torch.compile(self.model) if compile_model else self.model
        self.amp = amp
        self.scaler = torch.amp.GradScaler("cuda") if amp and device.type == "cuda" else None

    def autocast(self) -> Any:
        if not self.amp:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.device.type == "cpu" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """One training step exactly as kflo train takes it (its forward, loss, penalty and accumulation)."""
        from types import SimpleNamespace

        from .train.loop import accumulated_backward, forward_loss
        from .train.optim import optimizer_step

        if self.config.accumulate > 1:  # kflo train's --accumulate: micro-batches, each kernel composed once
            accumulated_backward(SimpleNamespace(config=self.config), self, images, labels, None)
            optimizer_step(None, self.optimizer, self.model.parameters(), scaler=self.scaler)
            return
        _, loss, penalty = forward_loss(self, self.config, images, labels, None)
        optimizer_step(loss + penalty, self.optimizer, self.model.parameters(), scaler=self.scaler)

    def resident_bytes(self) -> int:
        """Parameters, buffers and optimizer state held between steps."""
        seen: set[int] = set()
        total = 0
        tensors = list(self.model.parameters()) + list(self.model.buffers())
        for state in self.optimizer.state.values():
            tensors.extend(v for v in state.values() if isinstance(v, torch.Tensor))
        for t in tensors:
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        return total


def _state_bytes(trainer: _Trainer) -> int:
    """What a model holds between steps: :meth:`_Trainer.resident_bytes` plus a gradient per trainable parameter."""
    grads = sum(p.numel() * p.element_size() for p in trainer.model.parameters() if p.requires_grad)
    return trainer.resident_bytes() + grads


#: The issue's memory target: a step's peak at most this times vanilla's, beyond the expansion's extra state.
MEMORY_TARGET = 1.3


def _peak_step_bytes(trainer: _Trainer, images: torch.Tensor, labels: torch.Tensor) -> int:
    """Peak tensor memory of one training step (see the module docstring for how)."""
    device = trainer.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        trainer.step(images, labels)
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    from torch.profiler import ProfilerActivity, profile

    resident = trainer.resident_bytes()
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer.step(images, labels)
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return resident + int(peak)


def _macs_per_image(model: nn.Module, images: torch.Tensor) -> float:
    """Multiply-accumulates of one forward pass per image (torch.utils.flop_counter: 2 FLOPs per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    was = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(images)
    finally:
        model.train(was)
    return counter.get_total_flops() / 2 / images.shape[0]


def _interleaved(calls: dict[str, Callable[[], None]], rounds: int, device: torch.device,
                 tick: Callable[[], None]) -> dict[str, list[float]]:
    """Run each call once per round, alternating which goes first; seconds per call."""
    names = list(calls)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            _sync(device)
            start = time.perf_counter()
            calls[name]()
            _sync(device)
            seconds[name].append(time.perf_counter() - start)
        tick()
    return seconds


def _accepts(net: nn.Module, size: Sequence[int]) -> str | None:
    """``None`` if ``net`` runs on one input of ``size``, else the first line of its error."""
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, *size))
    except Exception as exc:  # noqa: BLE001  (any failure means: not this input size)
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return None


def _size_error(model: str, size: Sequence[int], problem: str) -> KfloError:
    """The one sentence for a model that does not take inputs of ``size`` (``problem``: what its forward said)."""
    return KfloError(f"{model} does not take inputs of size {','.join(map(str, size))} ({problem}); pass "
                     "--input-size C,H,W that fits the model (or --in-chans for a timm model)")


def _fitting_kwargs(model: str, kwargs: dict[str, Any], input_size: Sequence[int] | None, seed: int) -> dict[str, Any]:
    """The constructor arguments for inputs of ``input_size``: as given if the model takes that size, else with
    ``img_size`` (and ``in_chans`` for timm models) set to it, as ``kflo train`` builds a model for its data."""
    from .models import create_model, resolve_model_id

    if input_size is None:
        return kwargs
    torch.manual_seed(seed)
    problem = _accepts(create_model(model, **kwargs), input_size)
    if problem is None:
        return kwargs
    sized = dict(kwargs)
    if len(input_size) == 3:
        sized["img_size"] = input_size[1] if input_size[1] == input_size[2] else tuple(input_size[1:])
    if resolve_model_id(model).startswith("timm:") and "in_chans" not in kwargs:
        sized["in_chans"] = input_size[0]
    try:
        torch.manual_seed(seed)
        if _accepts(create_model(model, **sized), input_size) is None:
            return sized
    except KfloError:
        pass
    raise _size_error(model, input_size, problem)


def _vanilla_and_batch(model: str, kwargs: dict[str, Any], input_size: Sequence[int] | None, batch_size: int,
                       seed: int, dev: torch.device) -> tuple[nn.Module, tuple[int, ...], torch.Tensor, torch.Tensor]:
    """The vanilla model (seeded), the input size, and one seeded random batch of images and labels on ``dev``."""
    from .models import create_model, default_input_size

    torch.manual_seed(seed)
    vanilla = create_model(model, **kwargs)
    size = tuple(input_size) if input_size else tuple(default_input_size(vanilla))
    problem = _accepts(vanilla, size)
    if problem is not None:
        raise _size_error(model, size, problem)
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn((batch_size, *size), generator=generator).to(dev)
    with torch.no_grad():
        classes = vanilla.eval()(images[:1].cpu()).shape[-1]
    labels = torch.randint(0, classes, (batch_size,), generator=generator).to(dev)
    return vanilla, size, images, labels


def _layer_rows(model: nn.Module, forms: dict[str, dict[tuple[int, ...], str]]) -> list[dict[str, Any]]:
    """One row per rewritten layer; ``form`` is how it ran in the timed training steps (``kernel``/``feature``, or
    ``None`` for a recipe without execution forms)."""
    from .record import record

    rec = record(model)
    rows = []
    for plan in rec.plan:
        if plan.applied:
            seen = sorted(set(forms.get(plan.name, {}).values()))
            rows.append({"layer": plan.name, "type": plan.type, "recipe": plan.recipe,
                         "params_before": plan.params_before, "params_after": plan.params_after,
                         "form": "/".join(seen) if seen else None})
    return rows


def bench(
    model: str,
    recipes: Sequence[Any],
    *,
    batch_size: int = 64,
    input_size: Sequence[int] | None = None,
    steps: int = 20,
    warmup: int = 3,
    device: str = "cpu",
    mode: str | None = None,
    compile_model: bool = False,
    amp: bool = False,
    accumulate: int = 1,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    model_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
) -> BenchResult:
    """Measure ``model`` expanded with ``recipes`` against the vanilla ``model``; see the module docstring.

    ``progress(phase, done, total)`` is called as the work advances.
    """
    from .models import create_model
    from .pipeline import expand_model
    from .surgery import collapse

    _check_options(batch_size, steps, warmup, input_size, accumulate)
    specs = with_mode(recipes, mode)
    if not specs:
        raise KfloError("no recipe given; pass --recipe NAME[:key=value,...] (`kflo recipes` lists them)")
    dev = torch.device(device)
    say = progress or (lambda phase, done, total: None)
    kwargs = {k: v for k, v in dict(model_kwargs or {}).items() if v is not None}
    total = 2 * (warmup + steps) + 4

    say("build", 0, total)
    kwargs = _fitting_kwargs(model, kwargs, input_size, seed)
    vanilla, size, images, labels = _vanilla_and_batch(model, kwargs, input_size, batch_size, seed, dev)
    torch.manual_seed(seed)
    to_expand = create_model(model, **kwargs)
    start = time.perf_counter()
    expanded = expand_model(to_expand, specs, include=include, exclude=exclude, seed=seed)
    expand_seconds = time.perf_counter() - start
    params_vanilla = sum(p.numel() for p in vanilla.parameters())
    params_training = sum(p.numel() for p in expanded.parameters() if p.requires_grad)

    say("MACs", 1, total)
    macs_vanilla = _macs_per_image(vanilla, images.cpu())
    macs_executed = _macs_per_image(expanded, images.cpu())
    macs_feature = None
    try:
        feature_specs = with_mode(recipes, "feature")
    except KfloError:
        feature_specs = None
    if feature_specs is not None:
        torch.manual_seed(seed)
        feature_model = expand_model(create_model(model, **kwargs), feature_specs, include=include, exclude=exclude,
                                     seed=seed)
        macs_feature = _macs_per_image(feature_model, images.cpu())
        del feature_model

    plain_trainer = _Trainer(vanilla, dev, amp=amp, compile_model=compile_model, accumulate=accumulate)
    expanded_trainer = _Trainer(expanded, dev, amp=amp, compile_model=compile_model, accumulate=accumulate)
    done = [2]

    def tick() -> None:
        done[0] += 2
        say("training steps", done[0], total)

    calls = {"vanilla": lambda: plain_trainer.step(images, labels),
             "expanded": lambda: expanded_trainer.step(images, labels)}
    _interleaved(calls, warmup, dev, tick)
    step_times = _interleaved(calls, steps, dev, tick)

    forms = chosen_forms(expanded)
    say("memory", done[0], total)
    memory_vanilla = _peak_step_bytes(plain_trainer, images, labels)
    memory_expanded = _peak_step_bytes(expanded_trainer, images, labels)
    extra_state = max(0, _state_bytes(expanded_trainer) - _state_bytes(plain_trainer))
    allowance = int(MEMORY_TARGET * memory_vanilla + extra_state)

    say("collapse", done[0] + 1, total)
    expanded.eval()
    start = time.perf_counter()
    collapsed = collapse(expanded).to(dev).eval()
    collapse_seconds = time.perf_counter() - start
    params_collapsed = sum(p.numel() for p in collapsed.parameters())
    vanilla.eval()

    def infer(net: nn.Module) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                net(images)
        return run

    say("inference", done[0] + 2, total)
    infer_calls = {"vanilla": infer(vanilla), "collapsed": infer(collapsed)}
    _interleaved(infer_calls, max(1, warmup), dev, lambda: None)
    infer_times = _interleaved(infer_calls, steps, dev, lambda: None)
    say("done", total, total)

    step_v, step_e = Timing.of(step_times["vanilla"]), Timing.of(step_times["expanded"])
    inf_v, inf_c = Timing.of(infer_times["vanilla"]), Timing.of(infer_times["collapsed"])
    method = ("torch.cuda.max_memory_allocated" if dev.type == "cuda" else
              "resident parameters, buffers and optimizer state + peak of the step's tensor allocations "
              "(torch.profiler memory events)")
    return BenchResult(
        model=model, recipes=[str(s) for s in specs], device=str(dev), threads=torch.get_num_threads(),
        batch_size=batch_size, input_size=list(size), compiled=compile_model, amp=amp, accumulate=accumulate,
        params_vanilla=params_vanilla, params_training=params_training, params_collapsed=params_collapsed,
        macs_vanilla=macs_vanilla, macs_executed=macs_executed, macs_feature_form=macs_feature,
        step_vanilla=step_v, step_expanded=step_e, step_ratio=step_e.median / step_v.median,
        step_ratio_min=step_e.min / step_v.min,
        memory_vanilla=memory_vanilla, memory_expanded=memory_expanded,
        memory_ratio=memory_expanded / memory_vanilla if memory_vanilla else float("nan"), memory_method=method,
        memory_allowance=allowance, memory_within_target=memory_expanded <= allowance,
        infer_vanilla=inf_v, infer_collapsed=inf_c, infer_ratio=inf_c.median / inf_v.median,
        expand_seconds=expand_seconds, collapse_seconds=collapse_seconds, layers=_layer_rows(expanded, forms),
    )


#: The issue's bound on ``mode=auto``: never more than this factor slower than the faster fixed form.
AUTO_TOLERANCE = 1.05


@dataclass
class ModeRow:
    """One execution mode's training step in :func:`compare_modes`; ratios are to vanilla in the same rounds."""

    mode: str
    step: Timing
    ratio: float
    ratio_min: float
    #: Layers that ran through their factors in the timed steps, of ``layers`` with an execution form.
    feature_layers: list[str]
    layers: int


@dataclass
class ModeComparison(BenchSetting):
    """``kflo bench --compare-modes``: vanilla and the expansion in each execution mode, timed in the same rounds."""

    vanilla: Timing
    rows: list[ModeRow]
    #: Modes a recipe refuses, with the reason (e.g. a recipe with no feature form).
    skipped: dict[str, str]
    #: auto's median step over the faster fixed form's (``best_fixed``), and the same for the minima; ``None``
    #: when auto or no fixed form was timed.
    best_fixed: str | None
    auto_vs_best: float | None
    auto_vs_best_min: float | None

    @property
    def auto_within(self) -> bool | None:
        """Whether auto's median step is within :data:`AUTO_TOLERANCE` of the faster fixed form's."""
        return None if self.auto_vs_best is None else self.auto_vs_best <= AUTO_TOLERANCE

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "auto_within": self.auto_within}


def _forms_run(net: nn.Module) -> dict[str, set[str]]:
    """Layer name -> the forms it ran in during training: its fixed form, or an auto layer's choices so far."""
    chosen = chosen_forms(net)
    out = {}
    for name, module in net.named_modules():
        fixed = getattr(type(module), "_kflo_mode", None)
        if fixed is not None:
            out[name] = set(chosen.get(name, {}).values()) if fixed == "auto" else {fixed}
    return out


def compare_modes(
    model: str,
    recipes: Sequence[Any],
    *,
    modes: Sequence[str] = MODES,
    batch_size: int = 64,
    input_size: Sequence[int] | None = None,
    steps: int = 20,
    warmup: int = 3,
    device: str = "cpu",
    compile_model: bool = False,
    amp: bool = False,
    accumulate: int = 1,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    model_kwargs: dict[str, Any] | None = None,
    seed: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
) -> ModeComparison:
    """Time the vanilla model and the expansion in every mode of ``modes`` in the same interleaved rounds.

    Separate ``bench`` calls compare each mode with its own vanilla run, so on a shared machine two modes that run
    the same layers the same way can differ by the drift between the calls; here every mode meets the same drift,
    which is what checking ``mode=auto`` against the fixed forms needs. A spec that names its own mode is timed in
    that mode only (the others are listed in ``skipped``).
    """
    from .models import create_model
    from .pipeline import expand_model

    _check_options(batch_size, steps, warmup, input_size, accumulate)
    if not recipes:
        raise KfloError("no recipe given; pass --recipe NAME[:key=value,...] (`kflo recipes` lists them)")
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise KfloError(f"mode {', '.join(unknown) or '(none)'} is unknown; compare some of {', '.join(MODES)}")
    specs_by_mode: dict[str, list[Any]] = {}
    skipped: dict[str, str] = {}
    for mode in modes:
        try:
            specs_by_mode[mode] = with_mode(recipes, mode)
        except KfloError as exc:
            if "none of the recipes" in str(exc):
                raise KfloError(f"--compare-modes: none of the recipes ({', '.join(map(str, recipes))}) has an "
                                "execution mode; drop --compare-modes") from None
            skipped[mode] = str(exc)
    dev = torch.device(device)
    say = progress or (lambda phase, done, total: None)
    kwargs = _fitting_kwargs(model, {k: v for k, v in dict(model_kwargs or {}).items() if v is not None},
                             input_size, seed)
    total = (len(specs_by_mode) + 1) * (warmup + steps) + 1
    say("build", 0, total)
    vanilla, size, images, labels = _vanilla_and_batch(model, kwargs, input_size, batch_size, seed, dev)
    trainers = {"vanilla": _Trainer(vanilla, dev, amp=amp, compile_model=compile_model, accumulate=accumulate)}
    expanded: dict[str, nn.Module] = {}
    for mode, specs in specs_by_mode.items():
        torch.manual_seed(seed)
        expanded[mode] = expand_model(create_model(model, **kwargs), specs, include=include, exclude=exclude,
                                      seed=seed)
        trainers[mode] = _Trainer(expanded[mode], dev, amp=amp, compile_model=compile_model, accumulate=accumulate)
    done = [1]

    def tick() -> None:
        done[0] += len(trainers)
        say("training steps", done[0], total)

    calls = {name: (lambda t=trainer: t.step(images, labels)) for name, trainer in trainers.items()}
    _interleaved(calls, warmup, dev, tick)
    seconds = _interleaved(calls, steps, dev, tick)
    say("done", total, total)

    vanilla_t = Timing.of(seconds["vanilla"])
    rows = []
    for mode, net in expanded.items():
        t = Timing.of(seconds[mode])
        forms = _forms_run(net)
        feature = sorted(name for name, seen in forms.items() if "feature" in seen)
        rows.append(ModeRow(mode=mode, step=t, ratio=t.median / vanilla_t.median, ratio_min=t.min / vanilla_t.min,
                            feature_layers=feature, layers=len(forms)))
    timed = {row.mode: row for row in rows}
    fixed = [timed[m] for m in ("kernel", "feature") if m in timed]
    best = min(fixed, key=lambda row: row.step.median) if fixed else None
    auto = timed.get("auto")
    vs_best = vs_best_min = None
    if auto is not None and best is not None:
        vs_best = auto.step.median / best.step.median
        vs_best_min = auto.step.min / min(row.step.min for row in fixed)
    return ModeComparison(
        model=model, recipes=[str(s) for s in recipes], device=str(dev), threads=torch.get_num_threads(),
        batch_size=batch_size, input_size=list(size), compiled=compile_model, amp=amp, accumulate=accumulate,
        vanilla=vanilla_t, rows=rows, skipped=skipped, best_fixed=None if best is None else best.mode,
        auto_vs_best=vs_best, auto_vs_best_min=vs_best_min,
    )


__all__ = ["AUTO_TOLERANCE", "BenchResult", "MEMORY_TARGET", "ModeComparison", "ModeRow", "Timing", "bench",
           "compare_modes", "with_mode"]
