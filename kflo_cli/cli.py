"""The ``kflo`` command line: thin commands that parse options and call the library."""

from __future__ import annotations

import contextlib
import functools
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import KfloError, is_out_of_memory

app = typer.Typer(
    name="kflo",
    help="Expand any timm/torchvision model with a reparameterization recipe, train it, collapse it back.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
_STATE = {"debug": False}


class _LazyConsole:
    """A rich console bound to the current stdout at print time; wide when stdout is not a terminal (logs, pipes),
    so tables are never truncated there."""

    def print(self, *args: Any, **kwargs: Any) -> None:
        Console(width=None if sys.stdout.isatty() else 200).print(*args, **kwargs)


console = _LazyConsole()


def fail(message: str, code: int = 2) -> None:
    """Print one line on stderr and exit with ``code``."""
    print(f"error: {message}", file=sys.stderr)
    raise typer.Exit(code)


def handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn KfloError into one stderr line and exit 2; other failures into one line and exit 1 (--debug: raise)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except KfloError as exc:
            if _STATE["debug"]:
                raise
            fail(str(exc), 2)
        except (MemoryError, RuntimeError) as exc:
            if _STATE["debug"]:
                raise
            if not is_out_of_memory(exc):
                fail(f"{type(exc).__name__}: {exc} (rerun with --debug for the traceback)", 1)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            fail(f"out of memory ({first}); choose a smaller model, recipe width/rate, batch or input size", 2)
        except Exception as exc:  # noqa: BLE001  (the CLI's last line of defence)
            if _STATE["debug"]:
                raise
            fail(f"{type(exc).__name__}: {exc} (rerun with --debug for the traceback)", 1)

    return wrapper


def _version(value: bool) -> None:
    if value:
        from . import __version__

        print(f"kflo {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = None,
) -> None:
    """kflo: linear over-parameterization as model surgery."""
    _STATE["debug"] = debug


def _parse_size(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        size = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        size = ()
    if not size or any(s <= 0 for s in size):
        raise KfloError(f"--input-size '{text}' is not a list of positive integers; write it as C,H,W (e.g. 3,32,32)")
    return size


def _fmt(n: int) -> str:
    return f"{n:,}"


def print_plan(rows: list[Any], title: str) -> None:
    table = Table(title=title, show_lines=False)
    for col in ("layer", "type", "shape", "recipe / reason", "params before", "params after"):
        table.add_column(col, justify="right" if col.startswith("params") else "left")
    for r in rows:
        status = f"[green]{r.recipe}[/]" if r.applied else f"[dim]skipped: {r.reason}[/]"
        table.add_row(r.name, r.type, "x".join(map(str, r.shape)), status, _fmt(r.params_before), _fmt(r.params_after))
    console.print(table)


def print_totals(before: int, after: int, applied: int) -> None:
    ratio = after / before if before else float("nan")
    console.print(f"layers rewritten: {applied}   total parameters: {_fmt(before)} -> {_fmt(after)} ({ratio:.2f}x)")


ModelArg = Annotated[str, typer.Argument(help="Model name: timm's if timm knows it, else torchvision's; or timm:NAME / torchvision:NAME.")]


@app.command()
@handle_errors
def expand(
    model: ModelArg,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Expanded checkpoint to write (.safetensors).")] = None,
    recipe: Annotated[Optional[list[str]], typer.Option("--recipe", "-r", help="NAME or NAME:key=value,...; repeat to combine recipes.", rich_help_panel="Recipe")] = None,
    recipe_file: Annotated[Optional[list[str]], typer.Option("--recipe-file", help="TOML recipe file, by path or bundled name (e.g. kflo-2x4).", rich_help_panel="Recipe")] = None,
    include: Annotated[Optional[list[str]], typer.Option("--include", help="Only rewrite layers whose names match this glob (repeatable).", rich_help_panel="Layers")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="Never rewrite layers whose names match this glob (repeatable).", rich_help_panel="Layers")] = None,
    num_classes: Annotated[Optional[int], typer.Option("--num-classes", help="Passed to the model constructor.", rich_help_panel="Model")] = None,
    in_chans: Annotated[Optional[int], typer.Option("--in-chans", help="Input channels (timm models).", rich_help_panel="Model")] = None,
    pretrained: Annotated[bool, typer.Option("--pretrained", help="Load the source library's pretrained weights.", rich_help_panel="Model")] = False,
    init_from: Annotated[Optional[list[Path]], typer.Option("--init-from", help="Plain checkpoint of the original architecture to start from (strict). Repeat with KFLO to stack further pretrained networks into W_1 (paper 4.1).", rich_help_panel="Model")] = None,
    init_from_expanded: Annotated[Optional[Path], typer.Option("--init-from-expanded", help="ExpandNet +Init: an expanded checkpoint (the trained nonlinear counterpart) whose tensors start this expansion; without --recipe its recipes are reused with nonlinear=none, mode=kernel.", rich_help_panel="Model")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed for model construction and the random parts of the expansion.")] = 0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and parameter counts; write nothing.")] = False,
) -> None:
    """Rewrite a model's layers with one or more recipes and write the expanded checkpoint."""
    import torch

    from .checkpoint import load_plain_weights, save
    from .models import create_model
    from .recipefile import load_recipe_file
    from .reparam.base import rebuilding
    from .surgery import as_selections, expand as do_expand

    specs: list[Any] = []
    for ref in recipe_file or []:
        specs.extend(load_recipe_file(ref).recipes)
    specs.extend(recipe or [])
    if init_from_expanded is not None:
        from .checkpoint import read_metadata
        from .reparam.expandnet import linear_counterpart_specs

        if init_from:
            raise KfloError("--init-from and --init-from-expanded both set the starting weights; pass only one")
        source_specs = linear_counterpart_specs(init_from_expanded)
        specs = specs or source_specs
        source_kwargs = read_metadata(init_from_expanded).get("model_kwargs", {})
        num_classes = num_classes if num_classes is not None else source_kwargs.get("num_classes")
        in_chans = in_chans if in_chans is not None else source_kwargs.get("in_chans")
    if not specs:
        raise KfloError("no recipe given; pass --recipe NAME[:key=value,...] or --recipe-file FILE (`kflo recipes` lists them)")
    selections = as_selections(specs)
    if output is None and not dry_run:
        raise KfloError("no output file; pass -o OUT.safetensors (or --dry-run to only print the plan)")
    torch.manual_seed(seed)
    net = create_model(model, num_classes=num_classes, in_chans=in_chans, pretrained=pretrained)
    if init_from:
        load_plain_weights(net, init_from[0])
    before = sum(p.numel() for p in net.parameters())
    # With --init-from-expanded the transferred tensors replace the start, so expand as a rebuild does (no
    # function-preserving initialisation, no warnings or refusals about a start that is thrown away).
    with rebuilding() if init_from_expanded is not None else contextlib.nullcontext():
        do_expand(net, selections, include=include or [], exclude=exclude or [], seed=seed)
    if init_from_expanded is not None:
        from .reparam.expandnet import transfer_factors

        count = transfer_factors(net, init_from_expanded)
        console.print(f"started from {count} tensors of {init_from_expanded}")
    if init_from and len(init_from) > 1:
        from .reparam.kflo import stack_pretrained

        others = []
        for path in init_from[1:]:
            reference = create_model(model, num_classes=num_classes, in_chans=in_chans)
            load_plain_weights(reference, path)
            others.append(reference.state_dict())
        stacked = stack_pretrained(net, others)
        console.print(f"stacked {len(others) + 1} pretrained networks into W_1 of {len(stacked)} layers")
    after = sum(p.numel() for p in net.parameters())
    applied = sum(r.applied for r in net.kflo_plan)
    if dry_run:
        print_plan(net.kflo_plan, f"{net.kflo_model_id} with {' + '.join(s.recipe.spec() for s in selections)}")
        print_totals(before, after, applied)
        return
    save(net, output)
    print_totals(before, after, applied)
    console.print(f"wrote {output}")


@app.command()
@handle_errors
def collapse(
    expanded: Annotated[Path, typer.Argument(help="Expanded checkpoint from kflo expand or kflo train.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Plain checkpoint to write (.safetensors).")],
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="float32, float64, float16 or bfloat16 (default: the checkpoint's).")] = None,
) -> None:
    """Compose every rewritten layer (in float64) into a checkpoint of the original architecture."""
    from .checkpoint import load, parse_dtype, read_metadata, save
    from .models import create_model
    from .surgery import collapse as do_collapse

    meta = read_metadata(expanded)
    if meta is None:
        raise KfloError(f"{expanded} has no kflo metadata, so it is not an expanded checkpoint; pass a file written by "
                        "kflo expand or kflo train")
    if meta["kind"] == "plain":
        raise KfloError(f"{expanded} is already a plain checkpoint, so there is nothing to collapse; pass an expanded one")
    if output.resolve() == expanded.resolve():
        raise KfloError(f"-o {output} would overwrite the expanded checkpoint it collapses; choose another output path")
    target_dtype = parse_dtype(dtype) if dtype is not None else None
    model = load(expanded)
    plain = do_collapse(model, dtype=target_dtype)
    reference = create_model(meta["model_id"], **meta.get("model_kwargs", {})).state_dict()
    got = plain.state_dict()
    if set(got) != set(reference) or any(tuple(got[k].shape) != tuple(reference[k].shape) for k in reference):
        raise KfloError(f"collapsing {expanded} did not reproduce the original architecture's keys; this is a bug in a recipe, please report it")
    save(plain, output)
    console.print(f"wrote {output} ({meta['model_id']}, {len(got)} tensors, {str(next(iter(plain.parameters())).dtype).replace('torch.', '')})")


@app.command("verify-equivalence")
@handle_errors
def verify_equivalence(
    expanded: Annotated[Path, typer.Argument(help="Expanded checkpoint.")],
    collapsed: Annotated[Path, typer.Argument(help="Collapsed (plain) checkpoint.")],
    input_size: Annotated[Optional[str], typer.Option("--input-size", help="C,H,W of the random inputs (default: the model's).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 4,
    trials: Annotated[int, typer.Option("--trials", min=1)] = 3,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    rtol: Annotated[Optional[float], typer.Option("--rtol", help="Pass threshold on max |error| / output scale (default: 1e-5 for float32, 1e-10 for float64).")] = None,
) -> None:
    """Prove numerically (eval mode, float64 compute) that the collapsed model computes what the expanded one does."""
    from .checkpoint import load, read_metadata
    from .verify import verify_equivalence as do_verify

    meta, other = read_metadata(expanded), read_metadata(collapsed)
    a, b = load(expanded), load(collapsed)
    built = [(m["model_id"], m.get("model_kwargs", {})) for m in (meta, other)]
    if built[0] != built[1]:
        raise KfloError(f"{expanded} holds {built[0][0]} {built[0][1]} but {collapsed} holds {built[1][0]} {built[1][1]}; "
                        "compare an expanded checkpoint with its own collapse")
    size = _parse_size(input_size) or (tuple(meta["input_size"]) if meta and meta.get("input_size") else None)
    report = do_verify(a, b, input_size=size, batch_size=batch_size, trials=trials, seed=seed, rtol=rtol)
    console.print(
        f"input {tuple(report.input_size)} x {batch_size}, {trials} trials: max |error| {report.max_abs_error:.3e}, "
        f"output scale {report.output_scale:.3e}, relative {report.rel_error:.3e} (tolerance {report.rtol:.0e})"
    )
    if report.passed:
        console.print("[green]PASS[/]: the collapsed model computes the same function")
        return
    table = Table(title="per-layer error (largest first)")
    for col in ("layer", "max |error|", "relative"):
        table.add_column(col)
    for row in report.layers[:20]:
        table.add_row(row.name, f"{row.max_abs:.3e}", f"{row.rel:.3e}")
    console.print(table)
    console.print(f"[red]FAIL[/]: {report.reason or 'outputs differ beyond the tolerance'}")
    raise typer.Exit(1)


@app.command()
@handle_errors
def recipes() -> None:
    """List the recipes with their parameters, defaults and origin, and the bundled recipe files."""
    from .recipefile import bundled_recipe_files
    from .reparam import PLUGIN_ERRORS, list_recipes

    table = Table(title="recipes")
    for col in ("name", "parameters (default)", "description", "source"):
        table.add_column(col)
    for cls in list_recipes():
        params = "\n".join(f"{k}={p.default!r} ({p.type.__name__}): {p.help}" for k, p in cls.params.items()) or "-"
        table.add_row(cls.name, params, cls.description, cls.source)
    console.print(table)
    files = bundled_recipe_files()
    if files:
        console.print("recipe files: " + ", ".join(files))
    for name, problem in PLUGIN_ERRORS:
        print(f"warning: plugin '{name}' was skipped: {problem}", file=sys.stderr)


@app.command()
@handle_errors
def inspect(path: Annotated[Path, typer.Argument(help="A kflo checkpoint (.safetensors).")]) -> None:
    """Show a checkpoint's metadata and a per-layer summary."""
    from .checkpoint import load_tensors, read_metadata

    meta = read_metadata(path)
    if meta is None:
        raise KfloError(f"{path} has no kflo metadata; it was not written by kflo")
    tensors = load_tensors(path)
    total = sum(t.numel() for t in tensors.values())
    head = Table(show_header=False, title=str(path))
    for key in ("kind", "model_id", "model_kwargs", "input_size", "dtype", "kflo_version", "format_version"):
        head.add_row(key, str(meta.get(key)))
    if meta["kind"] == "expanded":
        head.add_row("recipes", "; ".join(f"{r['name']} {r['params']}" for r in meta["recipes"]))
    else:
        head.add_row("collapsed from", "; ".join(f"{r['name']} {r['params']}" for r in meta.get("collapsed_from", [])) or "-")
    head.add_row("tensors", f"{len(tensors)} ({_fmt(total)} values)")
    console.print(head)
    if meta["kind"] == "expanded":
        table = Table(title="rewritten layers")
        for col in ("layer", "type", "shape", "recipe", "stored values"):
            table.add_column(col)
        for layer in meta["layers"]:
            prefix = layer["name"] + "."
            count = sum(t.numel() for k, t in tensors.items() if k.startswith(prefix))
            table.add_row(layer["name"], layer["type"], "x".join(map(str, layer["shape"])), layer["recipe"], _fmt(count))
        console.print(table)


_P_RUN, _P_MODEL, _P_DATA, _P_OPT, _P_KD = "Run", "Model", "Data", "Optimisation", "Distillation"


@app.command()
@handle_errors
def train(
    source: Annotated[Optional[str], typer.Argument(help="Model name (vanilla, or expanded on the fly with --recipe), or a checkpoint (expanded or plain); omit with --resume.")] = None,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Run directory to create.", rich_help_panel=_P_RUN)] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue the run in this directory, exactly.", rich_help_panel=_P_RUN)] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a previous run's files in RUN_DIR.", rich_help_panel=_P_RUN)] = False,
    recipe: Annotated[Optional[list[str]], typer.Option("--recipe", "-r", help="NAME or NAME:key=value,...; repeat to combine.", rich_help_panel=_P_MODEL)] = None,
    recipe_file: Annotated[Optional[list[str]], typer.Option("--recipe-file", help="TOML recipe file (path or bundled name); its \\[train] table sets defaults.", rich_help_panel=_P_MODEL)] = None,
    include: Annotated[Optional[list[str]], typer.Option("--include", help="Only rewrite layers matching this glob.", rich_help_panel=_P_MODEL)] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="Never rewrite layers matching this glob.", rich_help_panel=_P_MODEL)] = None,
    init_from: Annotated[Optional[str], typer.Option("--init-from", help="Plain checkpoint of the architecture to start from.", rich_help_panel=_P_MODEL)] = None,
    pretrained: Annotated[Optional[bool], typer.Option("--pretrained/--no-pretrained", help="Start from the library's pretrained weights.", rich_help_panel=_P_MODEL)] = None,
    data: Annotated[Optional[str], typer.Option("--data", help="digits (default, bundled), fashion-mnist, mnist, cifar10, cifar100, imagefolder, synthetic.", rich_help_panel=_P_DATA)] = None,
    data_dir: Annotated[Optional[str], typer.Option("--data-dir", help="Where the data set's files are.", rich_help_panel=_P_DATA)] = None,
    download: Annotated[Optional[bool], typer.Option("--download/--no-download", help="Let torchvision download the data set.", rich_help_panel=_P_DATA)] = None,
    val_split: Annotated[Optional[float], typer.Option("--val-split", help="Fraction of the training set held out for validation (selects best).", rich_help_panel=_P_DATA)] = None,
    train_fraction: Annotated[Optional[float], typer.Option("--train-fraction", help="Keep this fraction of each class (KFLO's 40% transfer setting).", rich_help_panel=_P_DATA)] = None,
    label_noise: Annotated[Optional[float], typer.Option("--label-noise", help="Replace this fraction of training labels at random (ExpandNets' study).", rich_help_panel=_P_DATA)] = None,
    augment: Annotated[Optional[bool], typer.Option("--augment/--no-augment", help="The data set's standard augmentation.", rich_help_panel=_P_DATA)] = None,
    in_chans: Annotated[Optional[int], typer.Option("--in-chans", help="Convert the images to this many channels.", rich_help_panel=_P_DATA)] = None,
    img_size: Annotated[Optional[int], typer.Option("--img-size", help="Resize the images to this size.", rich_help_panel=_P_DATA)] = None,
    num_workers: Annotated[Optional[int], typer.Option("--num-workers", help="DataLoader worker processes.", rich_help_panel=_P_DATA)] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seeds initialisation, expansion, data split, order and augmentation.", rich_help_panel=_P_OPT)] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", rich_help_panel=_P_OPT)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Global batch (split across torchrun processes).", rich_help_panel=_P_OPT)] = None,
    optimizer: Annotated[Optional[str], typer.Option("--optimizer", help="sgd or adamw.", rich_help_panel=_P_OPT)] = None,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Base learning rate.", rich_help_panel=_P_OPT)] = None,
    momentum: Annotated[Optional[float], typer.Option("--momentum", help="SGD momentum.", rich_help_panel=_P_OPT)] = None,
    nesterov: Annotated[Optional[bool], typer.Option("--nesterov/--no-nesterov", help="Nesterov momentum (SGD).", rich_help_panel=_P_OPT)] = None,
    betas: Annotated[Optional[str], typer.Option("--betas", help="AdamW betas, e.g. 0.9,0.999.", rich_help_panel=_P_OPT)] = None,
    weight_decay: Annotated[Optional[float], typer.Option("--weight-decay", help="The vanilla weight decay; recipes place it per their paper.", rich_help_panel=_P_OPT)] = None,
    decay_on: Annotated[Optional[str], typer.Option("--decay-on", help="ExpandNet: 'factors' (each factor) or 'composed' (the product).", rich_help_panel=_P_OPT)] = None,
    decay_norm_bias: Annotated[Optional[bool], typer.Option("--decay-norm-bias/--no-decay-norm-bias", help="Also decay 1-D parameters (biases, norm layers).", rich_help_panel=_P_OPT)] = None,
    schedule: Annotated[Optional[str], typer.Option("--schedule", help="cosine, multistep or constant.", rich_help_panel=_P_OPT)] = None,
    milestones: Annotated[Optional[str], typer.Option("--milestones", help="Multistep epochs, e.g. 60,120,160.", rich_help_panel=_P_OPT)] = None,
    gamma: Annotated[Optional[float], typer.Option("--gamma", help="Multistep factor.", rich_help_panel=_P_OPT)] = None,
    warmup_epochs: Annotated[Optional[float], typer.Option("--warmup-epochs", help="Linear warmup length (may be fractional).", rich_help_panel=_P_OPT)] = None,
    min_lr: Annotated[Optional[float], typer.Option("--min-lr", help="Cosine floor.", rich_help_panel=_P_OPT)] = None,
    grad_clip: Annotated[Optional[float], typer.Option("--grad-clip", help="Clip the gradient's total L2 norm.", rich_help_panel=_P_OPT)] = None,
    amp: Annotated[Optional[bool], typer.Option("--amp/--no-amp", help="Mixed precision (float16 on CUDA, bfloat16 on CPU).", rich_help_panel=_P_OPT)] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="auto, cpu, cuda or cuda:N.", rich_help_panel=_P_OPT)] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads (torch.set_num_threads).", rich_help_panel=_P_OPT)] = None,
    ema: Annotated[Optional[float], typer.Option("--ema", help="Keep an exponential moving average with this decay.", rich_help_panel=_P_OPT)] = None,
    collapse_from: Annotated[Optional[str], typer.Option("--collapse-from", help="Which weights to collapse at the end: last, best or ema.", rich_help_panel=_P_RUN)] = None,
    teacher: Annotated[Optional[str], typer.Option("--teacher", help="Teacher architecture (for a plain weights file).", rich_help_panel=_P_KD)] = None,
    teacher_checkpoint: Annotated[Optional[str], typer.Option("--teacher-checkpoint", help="The trained teacher's checkpoint.", rich_help_panel=_P_KD)] = None,
    kd_alpha: Annotated[Optional[float], typer.Option("--kd-alpha", help="Weight of the distillation term.", rich_help_panel=_P_KD)] = None,
    kd_temperature: Annotated[Optional[float], typer.Option("--kd-temperature", help="Softmax temperature.", rich_help_panel=_P_KD)] = None,
    stop_after_steps: Annotated[Optional[int], typer.Option("--stop-after-steps", hidden=True)] = None,
) -> None:
    """Train a model (vanilla or expanded), then collapse it, verify it and measure the collapsed model."""
    from .train.commands import parse_number_list, run_train

    overrides = dict(
        recipe=recipe, recipe_file=recipe_file, include=include, exclude=exclude, init_from=init_from, pretrained=pretrained,
        data=data, data_dir=data_dir, download=download, val_split=val_split, train_fraction=train_fraction,
        label_noise=label_noise, augment=augment, in_chans=in_chans, img_size=img_size, num_workers=num_workers,
        seed=seed, epochs=epochs, batch_size=batch_size, optimizer=optimizer, lr=lr, momentum=momentum, nesterov=nesterov,
        betas=parse_number_list(betas, float, "--betas"), weight_decay=weight_decay, decay_on=decay_on,
        decay_norm_bias=decay_norm_bias, schedule=schedule, milestones=parse_number_list(milestones, int, "--milestones"),
        gamma=gamma, warmup_epochs=warmup_epochs, min_lr=min_lr, grad_clip=grad_clip, amp=amp, device=device,
        threads=threads, ema=ema, collapse_from=collapse_from, teacher=teacher, teacher_checkpoint=teacher_checkpoint,
        kd_alpha=kd_alpha, kd_temperature=kd_temperature,
    )
    code = run_train(source=source, output=output, resume_dir=resume, overwrite=overwrite, overrides=overrides, stop_after_steps=stop_after_steps)
    if code:
        raise typer.Exit(code)


@app.command()
@handle_errors
def quickstart(
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Keep the two run directories here (default: a temporary folder).")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1, help="Epochs of each run (default 8).")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Expand LeNet-5 with KFLO 2x4, train it and a vanilla baseline on the bundled digits, collapse, verify."""
    from .train import EXIT_INTERRUPTED, TrainingInterrupted
    from .train.quickstart import quickstart as run_quickstart

    try:
        run_quickstart(output, epochs=epochs, seed=seed)
    except TrainingInterrupted as exc:
        kept = (f"the interrupted run is kept (kflo train --resume {exc.run_dir} continues it); " if output is not None
                else "")
        print(f"interrupted: {exc.reason}; the quickstart stopped, {kept}run kflo quickstart again to start over",
              file=sys.stderr)
        raise typer.Exit(EXIT_INTERRUPTED) from None


def _one_line_warning(message: Any, category: type, filename: str, lineno: int, file: Any = None,
                      line: str | None = None) -> None:
    """Show library warnings as one ``warning: ...`` line (no source location) unless --debug."""
    if _STATE["debug"]:
        _SHOW_WARNING(message, category, filename, lineno, file, line)
    else:
        print(f"warning: {message}", file=file or sys.stderr)


_SHOW_WARNING = warnings.showwarning


def main() -> None:
    """Entry point of the ``kflo`` console script."""
    warnings.showwarning = _one_line_warning
    app()


__all__ = ["app", "fail", "handle_errors", "main"]
