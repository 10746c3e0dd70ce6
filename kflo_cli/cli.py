"""The ``kflo`` command line: thin commands that parse options and call the library."""

from __future__ import annotations

import functools
import sys
import warnings
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import KfloError, is_out_of_memory
from .train.commands import train_options
from .train.quickstart import QUICKSTART

app = typer.Typer(
    name="kflo",
    help="Expand any timm/torchvision model with a reparameterization recipe, train it, collapse it back.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
_STATE = {"debug": False}
#: What an interrupted command prints (exit status 130); kflo_cli.__main__ prints the same for Ctrl-C at start-up.
INTERRUPTED = "interrupted (Ctrl-C)"


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
    """Turn KfloError into one stderr line and exit 2; other failures into one line and exit 1; Ctrl-C into one line
    and exit 130 (--debug: raise)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except typer.Exit as exc:
            if exc.exit_code == 130:  # the command said why it stopped (a saved run, an interrupted sweep)
                _STATE["told_interrupt"] = True
            raise
        except typer.Abort:
            raise
        except KeyboardInterrupt:  # Ctrl-C outside a training loop (which saves and says so itself)
            if _STATE["debug"]:
                raise
            print(INTERRUPTED, file=sys.stderr)
            _STATE["told_interrupt"] = True
            raise typer.Exit(130) from None
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
    from .checkpoint import save
    from .pipeline import expand_model
    from .recipefile import load_recipe_file
    from .record import record

    specs: list[Any] = []
    for ref in recipe_file or []:
        specs.extend(load_recipe_file(ref).recipes)
    specs.extend(recipe or [])
    if output is None and not dry_run:
        raise KfloError("no output file; pass -o OUT.safetensors (or --dry-run to only print the plan)")
    try:
        net = expand_model(model, specs, include=include or [], exclude=exclude or [],
                           model_kwargs={"num_classes": num_classes, "in_chans": in_chans}, pretrained=pretrained,
                           init_from=init_from or [], init_from_expanded=init_from_expanded, seed=seed, note=console.print)
    except KfloError as exc:
        # a recipe that matches no layer: the plan so far says why each layer was skipped
        if dry_run and getattr(exc, "plan", None):
            print_plan(exc.plan, f"{model}: the plan so far")  # type: ignore[attr-defined]
        raise
    rec = record(net)
    after = sum(p.numel() for p in net.parameters())
    # rewritten layers' parameters counted once each (the compander's coarse pair is shared by every layer)
    expanded = {id(p): p.numel() for x in rec.layers for p in net.get_submodule(x.name).parameters()}
    before = after - sum(expanded.values()) + sum(r.params_before for r in rec.plan if r.applied)
    applied = len(rec.layers)
    if dry_run:
        print_plan(list(rec.plan), f"{rec.model_id} with {' + '.join(s.recipe.spec() for s in rec.selections)}")
        print_totals(before, after, applied)
        if any(s.recipe.values.get("mode") == "auto" for s in rec.selections):
            console.print("mode=auto: each layer runs on its composed kernel or through its factors, whichever is "
                          "cheaper for the input it sees (docs/performance.md); `kflo bench` with your batch and "
                          "input size shows each layer's choice")
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
    from .checkpoint import load, parse_dtype, read_metadata
    from .pipeline import collapse_to_file

    meta = read_metadata(expanded)
    if meta is None:
        raise KfloError(f"{expanded} has no kflo metadata, so it is not an expanded checkpoint; pass a file written by "
                        "kflo expand or kflo train")
    if meta["kind"] == "plain":
        raise KfloError(f"{expanded} is already a plain checkpoint, so there is nothing to collapse; pass an expanded one")
    if output.resolve() == expanded.resolve():
        raise KfloError(f"-o {output} would overwrite the expanded checkpoint it collapses; choose another output path")
    target_dtype = parse_dtype(dtype) if dtype is not None else None
    plain = collapse_to_file(load(expanded), output, dtype=target_dtype)
    tensors = len(plain.state_dict())
    console.print(f"wrote {output} ({meta['model_id']}, {tensors} tensors, {str(next(iter(plain.parameters())).dtype).replace('torch.', '')})")


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
    if report.compared != "outputs":  # a detection model: compared before its thresholds and NMS
        console.print(f"compared: {report.compared}")
    worst = report.worst
    if worst is not None and len(report.leaves) > 1:
        console.print(f"{len(report.leaves)} output tensors compared; largest relative error in '{worst.path}'")
    if report.passed:
        console.print("[green]PASS[/]: the collapsed model computes the same function")
        return
    if len(report.leaves) > 1:
        leaf_table = Table(title="per-output error (largest first)")
        for col in ("output", "max |error|", "scale", "relative"):
            leaf_table.add_column(col)
        for leaf in sorted(report.leaves, key=lambda row: row.rel, reverse=True)[:20]:
            rel = "differs (exact)" if leaf.exact and leaf.rel > 0 else f"{leaf.rel:.3e}"
            leaf_table.add_row(leaf.path, f"{leaf.max_abs:.3e}", f"{leaf.scale:.3e}", rel)
        console.print(leaf_table)
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
    from .reparam import list_recipes
    from .reparam.registry import PLUGIN_ERRORS

    table = Table(title="recipes")
    for col in ("name", "parameters (default)", "description", "source"):
        table.add_column(col)
    for cls in list_recipes():
        params = "\n".join(f"{k}={p.default!r} ({p.type.__name__}): {p.help}" for k, p in cls.params.items()) or "-"
        if getattr(cls, "shorthand", None) is not None:
            params += "\n" + cls.shorthand.describe(cls.name)
        table.add_row(cls.name, params, cls.description, cls.source)
    console.print(table)
    files = bundled_recipe_files()
    if files:
        console.print("recipe files: " + ", ".join(files))
    for name, problem in PLUGIN_ERRORS:
        print(f"warning: plugin '{name}' was skipped: {problem}", file=sys.stderr)


@app.command()
@handle_errors
def bench(
    model: ModelArg,
    recipe: Annotated[Optional[list[str]], typer.Option("--recipe", "-r", help="NAME or NAME:key=value,...; repeat to combine recipes.", rich_help_panel="Recipe")] = None,
    recipe_file: Annotated[Optional[list[str]], typer.Option("--recipe-file", help="TOML recipe file, by path or bundled name (its [[recipe]] tables only).", rich_help_panel="Recipe")] = None,
    include: Annotated[Optional[list[str]], typer.Option("--include", help="Only rewrite layers whose names match this glob (repeatable).", rich_help_panel="Recipe")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="Never rewrite layers whose names match this glob (repeatable).", rich_help_panel="Recipe")] = None,
    mode: Annotated[Optional[str], typer.Option("--mode", help="Execution of recipes that have one: auto, kernel (compose the kernel) or feature (run through the factors).", rich_help_panel="Recipe")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per training step.")] = 64,
    input_size: Annotated[Optional[str], typer.Option("--input-size", help="C,H,W of the random inputs (default: the model's).")] = None,
    num_classes: Annotated[Optional[int], typer.Option("--num-classes", help="Passed to the model constructor.", rich_help_panel="Model")] = None,
    in_chans: Annotated[Optional[int], typer.Option("--in-chans", help="Input channels (timm models).", rich_help_panel="Model")] = None,
    steps: Annotated[int, typer.Option("--steps", help="Timed steps per model (after the warm-up).")] = 20,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed steps per model first.")] = 3,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N (default: cuda if available).")] = "auto",
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads (default: PyTorch's).")] = None,
    compile_model: Annotated[bool, typer.Option("--compile", help="torch.compile both models.")] = False,
    amp: Annotated[bool, typer.Option("--amp", help="Mixed precision (bfloat16 on CPU, float16 on CUDA) for both models.")] = False,
    accumulate: Annotated[int, typer.Option("--accumulate", help="Micro-batches per step, as kflo train --accumulate (both models).")] = 1,
    compare_modes: Annotated[bool, typer.Option("--compare-modes", help="Time vanilla and the expansion in each execution mode (kernel, feature, auto) in the same interleaved rounds, and how auto fares against the faster fixed form.", rich_help_panel="Recipe")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed for both models and the random batch.")] = 0,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the measurements as JSON to this file.")] = None,
) -> None:
    """Measure training cost, memory, MACs and parameters of an expansion against the vanilla model, side by side."""
    import json

    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ._atomic import write_text_atomic
    from .bench import bench as run_bench
    from .bench import compare_modes as run_compare
    from .recipefile import load_recipe_file

    specs: list[Any] = []
    for ref in recipe_file or []:
        specs.extend(load_recipe_file(ref).recipes)
    specs.extend(recipe or [])
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if threads is not None:
        if not 1 <= threads <= 1024:
            raise KfloError(f"--threads {threads} is out of range; use an integer from 1 to 1024")
        torch.set_num_threads(threads)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), transient=True, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("bench", total=1)

        def progress(phase: str, done: int, total: int) -> None:
            bar.update(task, description=f"bench: {phase}", completed=done, total=total)

        common = dict(batch_size=batch_size, input_size=_parse_size(input_size), steps=steps, warmup=warmup,
                      device=device, compile_model=compile_model, amp=amp, accumulate=accumulate,
                      include=include or [], exclude=exclude or [],
                      model_kwargs={"num_classes": num_classes, "in_chans": in_chans}, seed=seed, progress=progress)
        if compare_modes:
            if mode is not None:
                raise KfloError("--mode and --compare-modes contradict each other; drop --mode to time every mode")
            result = run_compare(model, specs, **common)
        else:
            result = run_bench(model, specs, mode=mode, **common)
    if compare_modes:
        print_mode_comparison(result)
    else:
        print_bench(result)
    if json_out is not None:
        write_text_atomic(json_out, json.dumps(result.to_dict(), indent=2) + "\n")
        console.print(f"wrote {json_out}")


def print_mode_comparison(r: Any) -> None:
    """The rich table of a :class:`kflo_cli.bench.ModeComparison`."""
    from .bench import AUTO_TOLERANCE

    def ms(t: Any) -> str:
        return f"{t.median * 1e3:.1f} ms ({t.min * 1e3:.1f}-{t.max * 1e3:.1f})"

    title = (f"{r.model} + {' + '.join(r.recipes)}: batch {r.batch_size} x {'x'.join(map(str, r.input_size))}, "
             f"{r.device}, {r.threads} threads{', compiled' if r.compiled else ''}{', AMP' if r.amp else ''}"
             f"{f', {r.accumulate} micro-batches per step' if r.accumulate > 1 else ''}")
    table = Table(title=title)
    for col in ("mode", "training step, median (min-max)", "ratio to vanilla (min)", "layers through the factors"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    table.add_row("vanilla", ms(r.vanilla), "1.00", "")
    for row in r.rows:
        table.add_row(row.mode, ms(row.step), f"{row.ratio:.2f}x ({row.ratio_min:.2f}x)",
                      f"{len(row.feature_layers)} of {row.layers}")
    console.print(table)
    console.print(f"{r.vanilla.samples} timed steps each, all models interleaved in the same rounds")
    for mode, reason in r.skipped.items():
        console.print(f"[yellow]note[/]: {mode} not timed: {reason}")
    if r.auto_vs_best is not None:
        verdict = "within" if r.auto_within else "[red]outside[/]"
        console.print(f"auto: {r.auto_vs_best:.3f}x the faster fixed form ({r.best_fixed}) by the medians, "
                      f"{r.auto_vs_best_min:.3f}x by the minima; {verdict} the {AUTO_TOLERANCE:.2f}x bound")


def print_bench(r: Any) -> None:
    """The rich table of a :class:`kflo_cli.bench.BenchResult`."""
    def ms(t: Any) -> str:
        return f"{t.median * 1e3:.1f} ms ({t.min * 1e3:.1f}-{t.max * 1e3:.1f})"

    def mb(n: float) -> str:
        return f"{n / 2**20:.1f} MiB"

    def macs(n: float | None) -> str:
        return "-" if n is None else f"{n / 1e6:.2f} M"

    title = (f"{r.model} + {' + '.join(r.recipes)}: batch {r.batch_size} x {'x'.join(map(str, r.input_size))}, "
             f"{r.device}, {r.threads} threads{', compiled' if r.compiled else ''}{', AMP' if r.amp else ''}"
             f"{f', {r.accumulate} micro-batches per step' if r.accumulate > 1 else ''}")
    table = Table(title=title)
    for col in ("", "vanilla", "expanded", "ratio"):
        table.add_column(col, justify="left" if not col else "right")
    table.add_row("parameters (training)", _fmt(r.params_vanilla), _fmt(r.params_training),
                  f"{r.params_training / r.params_vanilla:.2f}x")
    table.add_row("parameters (after collapse)", _fmt(r.params_vanilla), _fmt(r.params_collapsed),
                  f"{r.params_collapsed / r.params_vanilla:.2f}x")
    table.add_row("MACs per image (as executed)", macs(r.macs_vanilla), macs(r.macs_executed),
                  f"{r.macs_executed / r.macs_vanilla:.2f}x")
    if r.macs_feature_form is not None:
        table.add_row("MACs per image (feature form)", macs(r.macs_vanilla), macs(r.macs_feature_form),
                      f"{r.macs_feature_form / r.macs_vanilla:.2f}x")
    table.add_row("training step, median (min-max)", ms(r.step_vanilla), ms(r.step_expanded),
                  f"{r.step_ratio:.2f}x (min {r.step_ratio_min:.2f}x)")
    table.add_row("peak training memory", mb(r.memory_vanilla), mb(r.memory_expanded), f"{r.memory_ratio:.2f}x")
    table.add_row("memory target (1.3x vanilla + extra state)", "", mb(r.memory_allowance),
                  "within" if r.memory_within_target else "over")
    table.add_row("inference (collapsed)", ms(r.infer_vanilla), ms(r.infer_collapsed), f"{r.infer_ratio:.2f}x")
    table.add_row("expand / collapse", "", f"{r.expand_seconds:.2f} s / {r.collapse_seconds:.2f} s", "")
    console.print(table)
    console.print(f"{r.step_vanilla.samples} timed steps each, interleaved; memory: {r.memory_method}")
    formed = [row for row in r.layers if row.get("form")]
    if formed:
        feature = [row["layer"] for row in formed if "feature" in row["form"]]
        console.print(f"execution in training: {len(formed) - len(feature)} of {len(formed)} layers on the composed "
                      f"kernel, {len(feature)} through the factors" + (f" ({', '.join(feature)})" if feature else ""))


@app.command()
@handle_errors
def landscape(
    checkpoint: Annotated[Path, typer.Argument(help="A kflo checkpoint: plain, collapsed or expanded (directions over its factors).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The plot to write (OUT.png); the grid goes to OUT.json beside it.")],
    data: Annotated[str, typer.Option("--data", help="Training data the loss is measured on (digits, mnist, cifar10, ...; docs/data.md).")],
    data_dir: Annotated[Optional[str], typer.Option("--data-dir", help="Folder holding the data set's files.")] = None,
    dim: Annotated[int, typer.Option("--dim", help="1: a loss curve along one direction; 2: a contour map over two.")] = 1,
    steps: Annotated[int, typer.Option("--steps", help="Grid points per axis (2 to 201).")] = 21,
    span: Annotated[float, typer.Option("--span", help="The grid covers [-span, span] along each direction (0 < span <= 10).")] = 1.0,
    batches: Annotated[int, typer.Option("--batches", help="Training batches the loss is averaged over (1 to 10000).")] = 4,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Images per batch (1 to 4096).")] = 128,
    seed: Annotated[int, typer.Option("--seed", help="Seeds the directions and the choice of training images.")] = 0,
    metric: Annotated[str, typer.Option("--metric", help="What the plot shows: loss (cross-entropy) or error (top-1 %, as ExpandNets' Figure 4); the JSON holds both.")] = "loss",
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads (default: PyTorch's).")] = None,
) -> None:
    """Draw the filter-normalised loss landscape (Li et al. 2018; ExpandNets 5.2) around a checkpoint's weights."""
    import torch
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .analysis.landscape import METRICS, check_options, check_output, checkpoint_landscape, write_landscape

    check_options(dim=dim, steps=steps, span=span, batches=batches, batch_size=batch_size)
    if metric not in METRICS:
        raise KfloError(f"--metric {metric} is not one of {', '.join(METRICS)}")
    json_path = check_output(output)
    if threads is not None:
        if not 1 <= threads <= 1024:
            raise KfloError(f"--threads {threads} is out of range; use an integer from 1 to 1024")
        torch.set_num_threads(threads)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), transient=True, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("landscape: grid points", total=steps ** dim)
        result = checkpoint_landscape(checkpoint, data, data_dir=data_dir, dim=dim, steps=steps, span=span,
                                      batches=batches, batch_size=batch_size, seed=seed,
                                      progress=lambda done, total: bar.update(task, completed=done, total=total))
    write_landscape(result, output, metric=metric)
    console.print(f"{result.title}: loss {result.origin_loss:.4f} at the weights, {min(map(min, result.loss) if dim == 2 else result.loss):.4f} "
                  f"lowest on the grid ({result.samples} images, {result.moved_values:,} weights moved, "
                  f"{len(result.fixed)} tensors fixed)")
    console.print(f"wrote {output} and {json_path}")


@app.command("quant-check")
@handle_errors
def quant_check_command(
    checkpoint: Annotated[Path, typer.Argument(help="A kflo checkpoint (an expanded one is collapsed first, in memory).")],
    data: Annotated[Optional[str], typer.Option("--data", help="Calibrate INT8 activations on its training split and measure test accuracy for float, W8, A8 and W8A8 (see kflo train --data).")] = None,
    data_dir: Annotated[Optional[str], typer.Option("--data-dir", help="Where the data set's files are.")] = None,
    calib_batches: Annotated[int, typer.Option("--calib-batches", help="Training batches of 128 images the activation ranges are observed on (with --data).")] = 8,
    observer: Annotated[str, typer.Option("--observer", help="Activation range observer: minmax (the whole calibrated range) or histogram (PyTorch's L2-optimal clipping).")] = "minmax",
    input_size: Annotated[Optional[str], typer.Option("--input-size", help="C,H,W of the random inputs (default: the checkpoint's).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the report as JSON to this file.")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="CPU threads (default: PyTorch's).")] = None,
) -> None:
    """INT8 readiness: per-channel symmetric INT8 weights of every Conv/Linear layer and, with --data, calibrated
    per-tensor INT8 activations at their inputs; errors per layer and end to end, and the accuracy drop."""
    import json

    import torch

    from ._atomic import write_text_atomic
    from .checkpoint import load, read_metadata
    from .quant import CALIB_BATCH_SIZE, OBSERVERS, calibration_batches, quant_check
    from .surgery import collapse, is_expanded
    from .verify import check_options

    if calib_batches < 1:
        raise KfloError(f"--calib-batches {calib_batches} must be at least 1 (each batch is {CALIB_BATCH_SIZE} training images)")
    if observer not in OBSERVERS:
        raise KfloError(f"--observer {observer} is not one of {', '.join(OBSERVERS)}")
    if threads is not None:
        if not 1 <= threads <= 1024:
            raise KfloError(f"--threads {threads} is out of range; use an integer from 1 to 1024")
        torch.set_num_threads(threads)
    meta = read_metadata(checkpoint)
    if meta is None:
        raise KfloError(f"{checkpoint} has no kflo metadata; convert or collapse it with kflo first")
    size = _parse_size(input_size) or tuple(meta["input_size"])
    check_options(input_size=size)
    model = load(checkpoint)
    if is_expanded(model):
        model = collapse(model)
    batches = calib = None
    if data is not None:
        from .train.config import TrainConfig
        from .train.loader import eval_loader, iterate
        from .train.source import load_data

        # augment=False: calibration images are training images as the model sees them at test time.
        bundle = load_data(TrainConfig(source=str(checkpoint), data=data, data_dir=data_dir, augment=False),
                           in_chans=size[0], img_size=size[-1])
        calib = calibration_batches(bundle.train, calib_batches)
        batches = list(iterate(eval_loader(bundle.test, 256)))
    report = quant_check(model, size, data=batches, calibration=calib, observer=observer)
    title = "INT8 weights (per channel, symmetric)"
    if report.calibration is not None:
        title += f" and layer inputs (per tensor, {observer})"
    table = Table(title=f"{checkpoint}: {title}")
    columns = ["layer", "shape", "min", "max", "max|w| / std", "weight error"]
    if report.calibration is not None:
        columns += ["input range", "input scale", "input error"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("layer", "shape", "input range") else "right")
    for r in report.layers:
        row = [r.name, "x".join(map(str, r.shape)), f"{r.min:.3g}", f"{r.max:.3g}", f"{r.outlier:.1f}", f"{r.rel_error:.2e}"]
        if report.calibration is not None:
            a = r.activation
            row += ["-", "-", "-"] if a is None else [
                f"{a.min:.3g} .. {a.max:.3g} {'u8' if a.dtype == 'quint8' else 's8'}", f"{a.scale:.3g}",
                f"{a.rel_error:.2e}"]
        table.add_row(*row)
    console.print(table)
    console.print(f"output relative error with INT8 weights: {report.output_rel_error:.2e} (random inputs, eval mode)")
    if report.end_to_end:
        names = {"float32": "float32", "w8": "INT8 weights (W8)", "a8": "INT8 activations (A8)", "w8a8": "both (W8A8)"}
        images = sum(int(labels.shape[0]) for _, labels in batches or [])
        e2e = Table(title=f"end to end on the {images:,} {data} test images")
        for col in ("quantized", "output error", "test accuracy", "change"):
            e2e.add_column(col, justify="left" if col == "quantized" else "right")
        base = report.end_to_end["float32"].accuracy
        for key, row in report.end_to_end.items():
            quantized = key != "float32"
            e2e.add_row(names[key], f"{row.output_rel_error:.2e}" if quantized else "-", f"{row.accuracy:.2f} %",
                        f"{row.accuracy - base:+.2f}" if quantized else "")
        console.print(e2e)
        cal = report.calibration
        console.print(f"calibration: {cal['images']:,} {data} training images ({cal['batches']} batches of "
                      f"{CALIB_BATCH_SIZE}, unaugmented, drawn with seed 0), none of them a test image; input "
                      "error: on the test images, clipping included")
    else:
        console.print("note: activations are not quantized: there is no calibration data; pass --data NAME to "
                      "calibrate them on its training split and measure the accuracy")
    if json_out is not None:
        write_text_atomic(json_out, json.dumps(report.to_dict(), indent=2) + "\n")
        console.print(f"wrote {json_out}")


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


@app.command()
@handle_errors
def convert(
    source: Annotated[Path, typer.Argument(help="A PyTorch checkpoint (.pt/.pth, zip or legacy) holding a state dict.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Safetensors file to write, usable with --init-from.")],
    model: Annotated[Optional[str], typer.Option("--model", help="Check that the tensors load strictly into this model and write kflo metadata.")] = None,
    num_classes: Annotated[Optional[int], typer.Option("--num-classes", help="With --model: passed to the model constructor.")] = None,
    in_chans: Annotated[Optional[int], typer.Option("--in-chans", help="With --model: input channels (timm models).")] = None,
) -> None:
    """Convert a PyTorch pickle checkpoint to safetensors, reading tensors only (torch.load weights_only=True)."""
    from .checkpoint import convert as do_convert

    count = do_convert(source, output, model=model, num_classes=num_classes, in_chans=in_chans)
    checked = f", loads strictly into {model}" if model else ""
    console.print(f"wrote {output} ({count} tensors{checked})")


@app.command()
@handle_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(help="An expanded (collapsed first, in memory) or plain kflo checkpoint, or a plain safetensors state dict with --model.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="File to write: .onnx or .pt2 (written only if it passes verification).")],
    fmt: Annotated[Optional[str], typer.Option("--format", help="onnx (torch.onnx dynamo exporter, checked with ONNX Runtime) or pt2 (torch.export); default: from -o's suffix, else onnx.")] = None,
    input_size: Annotated[Optional[str], typer.Option("--input-size", help="C,H,W of the input (default: the checkpoint's / the model's).")] = None,
    batch: Annotated[int, typer.Option("--batch", help="Fixed batch size of the exported graph.")] = 1,
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch", help="Leave the batch dimension free (verified at batch sizes 1 and 3).")] = False,
    opset: Annotated[Optional[int], typer.Option("--opset", help="ONNX opset (default: the exporter's).")] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="float32 or float16: the exported graph's weights and inputs.")] = "float32",
    rtol: Annotated[Optional[float], typer.Option("--rtol", help="Pass threshold on each output's max |error| / scale against the PyTorch model (default: 1e-4 for float32, 1e-2 for float16).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random verification inputs.")] = 0,
    model: Annotated[Optional[str], typer.Option("--model", help="Architecture of a plain safetensors state dict (loaded strictly).", rich_help_panel="Model")] = None,
    num_classes: Annotated[Optional[int], typer.Option("--num-classes", help="With --model: passed to the model constructor.", rich_help_panel="Model")] = None,
    in_chans: Annotated[Optional[int], typer.Option("--in-chans", help="With --model: input channels (timm models).", rich_help_panel="Model")] = None,
) -> None:
    """Export a checkpoint for deployment (ONNX or torch.export .pt2) and verify the written file against PyTorch."""
    from .export import EXPORT_DTYPES, FORMATS, export_model, load_for_export
    from rich.text import Text

    if fmt is None:
        fmt = next((name for name, suffix in FORMATS.items() if output.suffix.lower() == suffix), "onnx")
    if fmt not in FORMATS:
        raise KfloError(f"unknown --format '{fmt}'; use {' or '.join(FORMATS)}")
    if dtype not in EXPORT_DTYPES:
        raise KfloError(f"--dtype {dtype} cannot be exported; use {' or '.join(EXPORT_DTYPES)}")
    if output.exists() and checkpoint.exists() and output.resolve() == checkpoint.resolve():
        raise KfloError(f"-o {output} would overwrite the checkpoint it exports; choose another output path")
    net, meta = load_for_export(checkpoint, model=model, num_classes=num_classes, in_chans=in_chans)
    size = _parse_size(input_size) or (tuple(meta["input_size"]) if meta and meta.get("input_size") else None)
    report = export_model(net, output, fmt, size, batch=batch, dynamic_batch=dynamic_batch, opset=opset,
                          dtype=EXPORT_DTYPES[dtype], rtol=rtol, seed=seed, quiet=not _STATE["debug"])
    shape = ("N" if report.dynamic_batch else str(report.batch_sizes[0])) + "x" + "x".join(map(str, report.input_size))
    opset_text = f", opset {report.opset}" if report.opset is not None else ""
    console.print(f"{'collapsed, then ' if report.collapsed else ''}exported with {report.exporter}{opset_text}: input "
                  f"{shape} {report.dtype}", markup=False, highlight=False)
    console.print(f"verified with {report.runtime} at batch {', '.join(map(str, report.batch_sizes))} against the "
                  f"PyTorch model (float32, eval): largest relative error {report.rel_error:.3e} (tolerance "
                  f"{report.rtol:.0e})", markup=False, highlight=False)
    if len(report.outputs) > 1 or not report.passed:
        table = Table(title="per-output error")
        for col in ("output", "max |error|", "scale", "relative"):
            table.add_column(col)
        for row in report.outputs:
            table.add_row(Text(row.name), f"{row.max_abs:.3e}", f"{row.scale:.3e}", f"{row.rel:.3e}")
        console.print(table)
    if not report.passed:
        from rich.markup import escape

        console.print(f"[red]FAIL[/]: {escape(report.reason)}; nothing was written")
        raise typer.Exit(1)
    console.print(f"[green]PASS[/]: wrote {output} ({report.size_bytes / 2**20:.2f} MiB)")


@app.command()
@handle_errors
@train_options  # SOURCE and one option per TrainConfig field (kflo_cli/train/config.py), passed in `overrides`
def train(
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Run directory to create.", rich_help_panel="Run")] = None,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue the run in this directory, exactly.", rich_help_panel="Run")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a previous run's files in RUN_DIR.", rich_help_panel="Run")] = False,
    stop_after_steps: Annotated[Optional[int], typer.Option("--stop-after-steps", hidden=True)] = None,
    overrides: dict[str, Any] | None = None,
) -> None:
    """Train a model (vanilla or expanded), then collapse it, verify it and measure the collapsed model."""
    from .train.commands import run_train

    code = run_train(overrides=overrides or {}, output=output, resume_dir=resume, overwrite=overwrite, stop_after_steps=stop_after_steps)
    if code:
        raise typer.Exit(code)


@app.command()
@handle_errors
def quickstart(
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Keep the two run directories here (default: a temporary folder, deleted at the end: nothing is kept).")] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1, help=f"Epochs of each run (default {QUICKSTART['epochs']}).")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an earlier quickstart's runs in -o DIR (a folder that holds anything is refused otherwise).")] = False,
) -> None:
    """Expand LeNet-5 with KFLO 2x4, train it and a vanilla baseline on the bundled digits, collapse, verify."""
    from .train import EXIT_INTERRUPTED, TrainingInterrupted
    from .train.quickstart import quickstart as run_quickstart

    try:
        run_quickstart(output, epochs=epochs, seed=seed, overwrite=overwrite)
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
    """Run the CLI (the ``kflo`` console script and ``python -m kflo_cli`` call it through :mod:`kflo_cli.__main__`,
    which also turns Ctrl-C during this module's imports into one line)."""
    try:  # typer >= 0.16 carries its own copy of click
        from typer._click import exceptions as cx
    except ImportError:  # pragma: no cover - older typer uses click itself
        from click import exceptions as cx

    warnings.showwarning = _one_line_warning
    _STATE["told_interrupt"] = False
    try:
        code = app(standalone_mode=False)
    except cx.NoArgsIsHelpError as exc:  # `kflo` or `kflo CMD` alone: the help, as click would show it
        print(exc.format_message())
        sys.exit(0 if exc.ctx is None or exc.ctx.parent is None else 2)
    except cx.UsageError as exc:  # a bad command line: one line and exit 2, as every other user error
        command = exc.ctx.command_path if exc.ctx is not None else "kflo"
        message = " ".join(exc.format_message().split()).rstrip(".")
        print(f"error: {message}; see {command} --help", file=sys.stderr)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):  # Ctrl-C outside a command (while parsing)
        if not _STATE.get("told_interrupt"):
            print(INTERRUPTED, file=sys.stderr)
        sys.exit(130)
    except cx.ClickException as exc:  # anything else click refuses before a command runs
        print(f"error: {' '.join(exc.format_message().split())}", file=sys.stderr)
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


__all__ = ["app", "fail", "handle_errors", "main"]


@app.command()
@handle_errors
def sweep(
    grid: Annotated[Path, typer.Argument(help="The grid file (TOML): models, data settings, methods, seeds and ONE \\[train] schedule; docs/sweep.md, examples in sweeps/.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The sweep's folder: runs/<model>/<data>/<method>/seed<k> and results.{md,csv,json,png}.")],
    jobs: Annotated[int, typer.Option("--jobs", "-j", help="Runs trained at once (each a kflo train process).")] = 1,
    threads: Annotated[Optional[int], typer.Option("--threads", help="--threads of each run (default: CPU cores // --jobs).")] = None,
    report_only: Annotated[bool, typer.Option("--report-only", help="Only rewrite the results files from the run directories.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List the cells and what would run; write nothing.")] = False,
) -> None:
    """Train a grid of models x methods x data settings x seeds under one schedule (resumable) and report mean +- std,
    95 % intervals and paired t-tests against the baseline."""
    from .sweep import run_sweep

    outcome = run_sweep(grid, output, jobs=jobs, threads=threads, report_only=report_only, dry_run=dry_run)
    for line in outcome.lines():
        console.print(line, markup=False, highlight=False)
    if outcome.interrupted:
        print(f"interrupted: the running cells saved their state; `kflo sweep {grid} -o {output}` continues (finished "
              "cells are skipped, interrupted ones resume)", file=sys.stderr)
    elif outcome.exit_code:
        print(f"{len(outcome.unfinished)} cell(s) did not finish (listed above and in results.md); running the same "
              "command again retries them", file=sys.stderr)
    if outcome.exit_code:
        raise typer.Exit(outcome.exit_code)
