"""Filter-normalised loss landscapes (Li, Xu, Taylor, Studer & Goldstein, NeurIPS 2018), as ExpandNets (Guo,
Alvarez & Salzmann, NeurIPS 2020) section 5.2 draws them.

The loss is evaluated at ``theta + a * d1`` (1-D) or ``theta + a * d1 + b * d2`` (2-D) for ``a, b`` on a grid of
``steps`` points in ``[-span, span]``. Each direction ``d`` is Gaussian noise over the model's trainable parameters,
rescaled filter by filter: every output row ``d[i]`` of a weight tensor (a convolution's filter, a linear layer's
row, a factor's row) gets the norm of the same row of the model's tensor, ``||d[i]|| = ||theta[i]||``. Parameters
with at most one dimension (biases, BatchNorm's scale and shift, per-channel gains, scalars) get a zero direction,
Li et al.'s ``ignore biasbn`` setting: the plot moves the weights only. Buffers (BatchNorm's running statistics)
are not parameters and stay as they are; the model is evaluated in eval mode.

For an expanded model the trainable parameters are the factors (``<layer>.parametrizations.weight.0.*``), so the
directions live in the expanded weight space: a different space, of a different dimension, with a different
normalisation than the collapsed model's, although both models compute the same function at the origin
(docs/analysis.md).

>>> import kflo_cli as kflo
>>> from kflo_cli.analysis import loss_landscape
>>> model = kflo.create_model("lenet5")
>>> batches = [(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))]
>>> land = loss_landscape(model, batches, dim=1, steps=5, span=1.0, seed=0)
>>> len(land.alphas), len(land.loss)
(5, 5)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._atomic import atomic_path
from ..errors import KfloError

#: Bounds of the options (the CLI's and the library's): grid points per axis, half-width of the grid, batches.
STEPS_RANGE = (2, 201)
MAX_SPAN = 10.0
BATCHES_RANGE = (1, 10000)
BATCH_SIZE_RANGE = (1, 4096)

Batches = Sequence[tuple[torch.Tensor, torch.Tensor]]
Progress = Callable[[int, int], None]
#: ``criterion(outputs, labels)``: the summed loss of a batch (default: cross-entropy, summed over the samples).
Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Landscape:
    """The loss (mean cross-entropy) and top-1 error (%) on a grid around a model's weights.

    ``loss[i]`` is the value at ``alphas[i]`` (1-D); ``loss[i][j]`` at ``alphas[i]``, ``betas[j]`` (2-D).
    """

    dim: int
    steps: int
    span: float
    seed: int
    alphas: list[float]
    betas: list[float] | None
    loss: list[Any]
    error: list[Any]
    origin_loss: float
    origin_error: float
    samples: int
    #: names of the parameters that move (a random, filter-normalised direction)
    moved: list[str] = field(default_factory=list)
    #: names of the parameters held fixed (zero direction: at most one dimension, or not trainable)
    fixed: list[str] = field(default_factory=list)
    moved_values: int = 0
    title: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_options(*, dim: int, steps: int, span: float, batches: int | None = None,
                  batch_size: int | None = None) -> None:
    """One sentence per option out of range (:class:`KfloError`)."""
    if dim not in (1, 2):
        raise KfloError(f"--dim {dim} is not 1 or 2; draw a curve (--dim 1) or a contour map (--dim 2)")
    if not STEPS_RANGE[0] <= steps <= STEPS_RANGE[1]:
        raise KfloError(f"--steps {steps} is out of range; use an integer from {STEPS_RANGE[0]} to {STEPS_RANGE[1]} "
                        "(grid points per axis)")
    if not (math.isfinite(span) and 0 < span <= MAX_SPAN):
        raise KfloError(f"--span {span} is out of range; use a number above 0 and at most {MAX_SPAN:g} (the grid's "
                        "half-width in units of the filter-normalised direction)")
    if batches is not None and not BATCHES_RANGE[0] <= batches <= BATCHES_RANGE[1]:
        raise KfloError(f"--batches {batches} is out of range; use an integer from {BATCHES_RANGE[0]} to "
                        f"{BATCHES_RANGE[1]}")
    if batch_size is not None and not BATCH_SIZE_RANGE[0] <= batch_size <= BATCH_SIZE_RANGE[1]:
        raise KfloError(f"--batch-size {batch_size} is out of range; use an integer from {BATCH_SIZE_RANGE[0]} to "
                        f"{BATCH_SIZE_RANGE[1]}")


def grid(steps: int, span: float) -> list[float]:
    """``steps`` evenly spaced points from ``-span`` to ``span`` (the middle one exactly 0 when ``steps`` is odd)."""
    values = torch.linspace(-span, span, steps, dtype=torch.float64).tolist()
    if steps % 2:
        values[steps // 2] = 0.0
    return values


def moving_parameters(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter]], list[str]]:
    """The parameters a direction moves (trainable, at least two dimensions) and the names of those it does not."""
    moved, fixed = [], []
    for name, p in model.named_parameters():
        (moved if p.requires_grad and p.dim() >= 2 else fixed).append((name, p))
    return moved, [name for name, _ in fixed]


def filter_normalized_direction(params: Iterable[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """One Gaussian direction per tensor, each output row (filter) rescaled to the norm of that row of the tensor.

    Rows of zero norm get a zero direction. Drawn on the CPU in float64 (the same numbers on every device), returned
    in each tensor's dtype and device.
    """
    out = []
    for p in params:
        ref = p.detach().to("cpu", torch.float64)
        d = torch.randn(ref.shape, generator=generator, dtype=torch.float64)
        rows, drows = ref.reshape(ref.shape[0], -1), d.reshape(d.shape[0], -1)
        want = rows.norm(dim=1, keepdim=True)
        have = drows.norm(dim=1, keepdim=True)
        scale = torch.where(have > 0, want / have.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(want))
        out.append((drows * scale).reshape(ref.shape).to(p.device, p.dtype))
    return out


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches, criterion: Criterion | None = None) -> tuple[float, float, int]:
    """Mean loss per sample (cross-entropy unless ``criterion``, computed in float64) and top-1 error (%) of
    ``model`` on ``batches``, and the sample count."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    total, wrong, count = 0.0, 0, 0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        if criterion is None:
            total += float(F.cross_entropy(logits.double(), y, reduction="sum"))
        else:
            total += float(criterion(logits, y))
        wrong += int((logits.argmax(dim=1) != y).sum())
        count += int(y.numel())
    if count == 0:
        raise KfloError("no samples to evaluate the loss on; pass --batches 1 or more on a data set with images")
    return total / count, 100.0 * wrong / count, count


@torch.no_grad()
def loss_landscape(model: nn.Module, batches: Batches, dim: int = 1, steps: int = 21, span: float = 1.0,
                   seed: int = 0, progress: Progress | None = None, criterion: Criterion | None = None) -> Landscape:
    """The filter-normalised loss landscape of ``model`` (module docstring) on ``batches`` of ``(images, labels)``.

    The model is evaluated in eval mode; its parameters are restored exactly (and its train/eval mode) afterwards.
    ``progress(done, total)`` is called after each grid point; ``criterion`` replaces the cross-entropy (summed
    over a batch's samples; the landscape is its mean per sample).
    """
    check_options(dim=dim, steps=steps, span=span)
    batches = list(batches)
    moved, fixed = moving_parameters(model)
    if not moved:
        raise KfloError("the model has no trainable weight with two or more dimensions, so there is no direction to "
                        "move in")
    params = [p for _, p in moved]
    generator = torch.Generator().manual_seed(int(seed))
    directions = [filter_normalized_direction(params, generator) for _ in range(dim)]
    origin = [p.detach().clone() for p in params]
    alphas = grid(steps, span)
    betas = grid(steps, span) if dim == 2 else None
    points = [(a, None) for a in alphas] if dim == 1 else [(a, b) for a in alphas for b in betas]  # type: ignore[union-attr]
    was_training = model.training
    model.eval()
    losses, errors = [], []
    try:
        origin_loss, origin_error, samples = evaluate(model, batches, criterion)
        for done, (a, b) in enumerate(points, start=1):
            for p, p0, d1, *d2 in zip(params, origin, *directions):
                value = p0 + a * d1 if b is None else p0 + a * d1 + b * d2[0]
                p.copy_(value)
            loss, error, _ = evaluate(model, batches, criterion)
            losses.append(loss)
            errors.append(error)
            if progress is not None:
                progress(done, len(points))
    finally:
        for p, p0 in zip(params, origin):
            p.copy_(p0)
        model.train(was_training)
    if dim == 2:
        losses = [losses[i * steps:(i + 1) * steps] for i in range(steps)]
        errors = [errors[i * steps:(i + 1) * steps] for i in range(steps)]
    return Landscape(dim, steps, float(span), int(seed), alphas, betas, losses, errors, origin_loss, origin_error,
                     samples, [n for n, _ in moved], fixed, sum(p.numel() for p in params))


# -- the data --------------------------------------------------------------------------------------------------------


def training_batches(dataset: Any, batches: int, batch_size: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``batches`` batches of ``batch_size`` images drawn without replacement from ``dataset`` (a seeded
    permutation; fewer when the data set runs out)."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(int(seed))).tolist()
    order = order[: batches * batch_size]
    out = []
    for start in range(0, len(order), batch_size):
        items = [dataset[i] for i in order[start:start + batch_size]]
        out.append((torch.stack([torch.as_tensor(x) for x, _ in items]),
                    torch.as_tensor([int(y) for _, y in items], dtype=torch.long)))
    return out


def describe(model: nn.Module) -> str:
    """'timm:lenet5 expanded with kflo:depth=2,width=4' / 'timm:lenet5 collapsed from kflo:...' / '... vanilla'."""
    from ..record import record
    from ..reparam import create_recipe

    rec = record(model)
    name = rec.model_id or type(model).__name__
    if rec.expanded:
        return f"{name} expanded with {' + '.join(s.recipe.spec() for s in rec.selections)}"
    if rec.collapsed_from:
        specs = []
        for entry in rec.collapsed_from:
            try:
                specs.append(create_recipe({"name": entry["name"], **dict(entry.get("params", {}))}).spec())
            except Exception:  # noqa: BLE001  (a recipe this kflo does not know: its name is enough)
                specs.append(str(entry.get("name", "?")))
        return f"{name} collapsed from {' + '.join(specs)}"
    return f"{name} vanilla"


def checkpoint_landscape(path: str | Path, data: str, *, data_dir: str | None = None, dim: int = 1, steps: int = 21,
                         span: float = 1.0, batches: int = 4, batch_size: int = 128, seed: int = 0,
                         progress: Progress | None = None) -> Landscape:
    """:func:`loss_landscape` of a kflo checkpoint (plain, collapsed or expanded) on ``batches`` training batches of
    data set ``data``, built (without augmentation) at the input size the checkpoint records."""
    from .. import checkpoint
    from ..data import build_data

    check_options(dim=dim, steps=steps, span=span, batches=batches, batch_size=batch_size)
    meta = checkpoint.read_metadata(path)
    if meta is None:
        raise KfloError(f"{path} has no kflo metadata; pass a checkpoint written by kflo train, expand or collapse")
    size = tuple(meta.get("input_size") or ())
    chans, img = (size[0], size[1]) if len(size) == 3 and size[1] == size[2] else (None, None)
    model = checkpoint.load(path)
    bundle = build_data(data, data_dir=data_dir, seed=seed, augment=False, in_chans=chans, img_size=img)
    if bundle.num_classes != int(meta.get("model_kwargs", {}).get("num_classes", bundle.num_classes)):
        raise KfloError(f"{path} has {meta['model_kwargs']['num_classes']} outputs but {bundle.name} has "
                        f"{bundle.num_classes} classes; pass the data set the model was trained on")
    land = loss_landscape(model, training_batches(bundle.train, batches, batch_size, seed), dim=dim, steps=steps,
                          span=span, seed=seed, progress=progress)
    land.title = f"{describe(model)} on {bundle.name}"
    return land


# -- the plot --------------------------------------------------------------------------------------------------------


#: What a plot can show: the loss, or the top-1 error (%) as ExpandNets' Figure 4 does.
METRICS = {"loss": "training loss (cross-entropy)", "error": "training top-1 error (%)"}


def landscape_figure(land: Landscape, title: str = "", metric: str = "loss") -> Any:
    """The matplotlib figure (not saved): the 1-D curve, or the 2-D contour map with a colour bar, of ``metric``
    (``loss`` or ``error``)."""
    from matplotlib.figure import Figure

    if metric not in METRICS:
        raise KfloError(f"--metric {metric} is not one of {', '.join(METRICS)}")
    values = land.loss if metric == "loss" else land.error
    origin = land.origin_loss if metric == "loss" else land.origin_error
    label = METRICS[metric]

    import textwrap

    title = textwrap.fill(title or land.title, 70)
    subtitle = (f"filter-normalised direction{'s' if land.dim == 2 else ''}, seed {land.seed}, {land.samples} "
                "training images; biases, BN fixed")
    if land.dim == 1:
        fig = Figure(figsize=(6, 4.2))
        ax = fig.add_subplot(1, 1, 1)
        ax.plot(land.alphas, values, marker="o" if land.steps <= 41 else None, markersize=3, color="tab:blue")
        ax.axvline(0.0, color="tab:gray", linewidth=0.8, linestyle="--")
        ax.set_xlabel("alpha (step along direction 1)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    else:
        fig = Figure(figsize=(6, 5))
        ax = fig.add_subplot(1, 1, 1)
        z = torch.tensor(values, dtype=torch.float64).T.numpy()  # rows: beta, columns: alpha
        finite = z[torch.isfinite(torch.from_numpy(z)).numpy()]
        levels = None
        if finite.size and finite.max() > finite.min():
            top = min(float(finite.max()), float(finite.min()) + 10 * max(float(origin) - float(finite.min()), 1.0 if metric == "loss" else 10.0))
            levels = torch.linspace(float(finite.min()), top, 25).tolist()
        contour = ax.contourf(land.alphas, land.betas, z, levels=levels, cmap="viridis", extend="max" if levels else "neither")
        ax.contour(land.alphas, land.betas, z, levels=levels, colors="white", linewidths=0.4, alpha=0.5)
        ax.plot([0.0], [0.0], marker="x", color="red")
        fig.colorbar(contour, ax=ax, label=label)
        ax.set_xlabel("alpha (direction 1)")
        ax.set_ylabel("beta (direction 2)")
    ax.set_title(f"{title}\n{subtitle}" if title else subtitle, fontsize=9)
    fig.tight_layout()
    return fig


def check_output(path: str | Path) -> Path:
    """``path`` as the plot's path (checked before any work): a ``.png`` file name in an existing folder; returns
    the JSON's path beside it."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise KfloError(f"-o {path} does not end in .png; name the plot OUT.png (the grid goes to OUT.json beside it)")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise KfloError(f"cannot write {path}: directory {parent} does not exist; create it or choose another -o path")
    if path.is_dir():
        raise KfloError(f"cannot write {path}: it is a directory; pass a file path such as {path / 'landscape.png'}")
    return path.with_suffix(".json")


def write_landscape(land: Landscape, path: str | Path, title: str = "", metric: str = "loss") -> Path:
    """Write the PNG at ``path`` and the grid as JSON beside it (same name, ``.json``), both atomically: a failure
    while drawing or writing creates or replaces neither file. Returns the JSON's path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    json_path = check_output(path)
    if title:
        land.title = title
    fig = landscape_figure(land, title, metric)
    payload = json.dumps(land.to_dict(), indent=1, allow_nan=True) + "\n"
    with atomic_path(path) as tmp_png, atomic_path(json_path) as tmp_json:
        FigureCanvasAgg(fig)
        fig.savefig(tmp_png, format="png", dpi=100)
        tmp_json.write_text(payload)
    return json_path


__all__ = ["BATCHES_RANGE", "BATCH_SIZE_RANGE", "Landscape", "MAX_SPAN", "METRICS", "STEPS_RANGE", "check_options", "check_output", "checkpoint_landscape", "describe",
           "evaluate", "filter_normalized_direction", "grid", "landscape_figure", "loss_landscape", "moving_parameters",
           "training_batches", "write_landscape"]
