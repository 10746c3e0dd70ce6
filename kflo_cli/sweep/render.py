"""A sweep's report as text: results.md (the tables, methods, schedule and what is missing) and results.csv."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from .._atomic import write_text_atomic
from .grid import Grid
from .rows import COLUMNS, DONE
from .stats import ALPHA, MIN_PAIRS


TEST_NAME = "paired t-test over seeds"


def _f(value: float | None, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _p(value: float | None) -> str:
    if value is None:
        return "–"
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _signed(value: float | None) -> str:
    return "–" if value is None else f"{value:+.2f}"


def schedule_text(grid: Grid) -> str:
    """The resolved schedule every cell shares (kflo train's defaults for what [train] leaves out)."""
    from ..train.config import resolve_config

    config = resolve_config({k: v for k, v in grid.train.items()}).to_dict()
    keys = ["epochs", "batch_size", "optimizer", "lr", "momentum", "nesterov", "weight_decay", "schedule", "milestones",
            "gamma", "warmup_epochs", "min_lr", "grad_clip", "decay_on", "decay_norm_bias", "amp", "collapse_from"]
    keys += [k for k in grid.train if k not in keys]
    shown = []
    for k in keys:
        if k not in config:
            continue
        v = config[k]
        if k in ("milestones", "gamma") and config.get("schedule") != "multistep":
            continue
        if k in ("momentum", "nesterov") and config.get("optimizer") != "sgd" or k == "min_lr" and config.get("schedule") != "cosine":
            continue
        shown.append(f"{k} = {json.dumps(v)}")
    return ", ".join(shown)


def markdown(grid: Grid, rows: list[dict[str, Any]], result_tables: list[dict[str, Any]], out_dir: str) -> str:
    """results.md."""
    base = grid.baseline
    lines = [f"# Sweep `{grid.name}`", ""]
    if grid.description:
        lines += [grid.description, ""]
    done = sum(r["status"] == DONE for r in rows)
    lines += [
        f"Grid `{grid.path}`, output `{out_dir}`: {len(rows)} runs, {done} finished, "
        f"{len(rows) - done} not (listed under their table).",
        "",
        f"**One schedule for every cell** (the grid's `[train]` table, kflo train's defaults for the rest): {schedule_text(grid)}.",
        "",
    ]
    lines += ["**Methods**:", ""]
    for m in grid.methods.values():
        parts = [" + ".join(f"`{r}`" for r in m.recipes) or "no recipe (the plain model)"]
        if m.include or m.exclude:
            parts.append("layers " + ", ".join([*(f"+{g}" for g in m.include), *(f"-{g}" for g in m.exclude)]))
        if m.ema is not None:
            parts.append(f"EMA {m.ema:g}, deployed")
        if m.teacher is not None:
            parts.append(f"distilled from `{m.teacher.method}`" + (f" on {m.teacher.model}" if m.teacher.model else "")
                         + f" (alpha {m.kd_alpha if m.kd_alpha is not None else 0.5:g}, "
                         f"T {m.kd_temperature if m.kd_temperature is not None else 4.0:g})")
        if m.init_from_expanded is not None:
            parts.append(f"+Init: starts from `{m.init_from_expanded}`'s trained run")
        desc = f" — {m.description}" if m.description else ""
        lines.append(f"- `{m.name}`{' (baseline)' if m.name == base else ''}: {'; '.join(parts)}{desc}")
    lines.append("")
    notes = grid.ignored_notes()
    if notes:
        lines += ["Recipe files' `[train]` tables are not used (their `[[recipe]]` tables are):", ""]
        lines += [f"- {n}" for n in notes]
        lines += [""]
    lines += [
        "**Accuracy** is the test accuracy (%) of the deployed model: the collapsed checkpoint of an expanded run, the "
        "trained model of a vanilla run, the averaged weights of a method with `ema`. "
        f"**Δ** is the method minus `{base}`, paired by seed, with its 95 % t interval; **p** is the two-sided "
        f"{TEST_NAME} (a seed fixes the data split, subset, label noise, batch order and augmentation for every "
        f"method, so pairing removes that shared variation; df = pairs − 1; when every pair differs by the same amount, "
        f"the exact sign test); **verdict** at α = {ALPHA} from at least {MIN_PAIRS} paired seeds, not "
        "corrected for the number of methods compared. **Cost** is the mean training-loop time relative to "
        f"`{base}` on the same model and data (a +Init method includes its first stage; runs sharing the machine "
        "slow each other down).",
        "",
    ]
    for table in result_tables:
        title = f"## {table['model']} · {table['data']}"
        if table["auxiliary"]:
            title += " (runs other cells depend on)"
        lines += [title, ""]
        desc = grid.data[table["data"]].description
        if desc:
            lines += [desc, ""]
        lines += [
            f"| method | n | accuracy % (mean ± std) | 95 % CI | Δ vs {base} (95 % CI) | p ({TEST_NAME}) | verdict | "
            "params trained / deployed | cost |",
            "|---|---:|---:|---:|---:|---:|---|---:|---:|",
        ]
        for m in table["methods"]:
            s = m["summary"]
            acc = "–" if s["mean"] is None else (_f(s["mean"]) + ("" if s["std"] is None else f" ± {_f(s['std'])}"))
            ci = "–" if s["ci_low"] is None else f"[{_f(s['ci_low'])}, {_f(s['ci_high'])}]"
            c = m["comparison"]
            if m["baseline"]:
                diff, p, verdict = "–", "–", "baseline"
            elif s["n"] == 0:
                diff, p, verdict = "–", "–", "not deployable" if m["trained_only"] else "no finished run"
            elif c is None:
                diff, p, verdict = "–", "–", f"no {base} runs"
            else:
                diff = _signed(c["mean"]) + ("" if c["ci_low"] is None else f" [{_signed(c['ci_low'])}, {_signed(c['ci_high'])}]")
                p = _p(c["p"])
                verdict = c["verdict"] if c["p"] is not None else f"n/a ({c['n']} paired seed{'s' if c['n'] != 1 else ''})"
            params = "–" if m["params_trained"] is None else f"{m['params_trained']:,} / " + (
                "–" if m["params_deployed"] is None else f"{m['params_deployed']:,}")
            cost = "–" if m["cost_ratio"] is None else f"{m['cost_ratio']:.2f}×"
            lines.append(f"| {m['method']} | {s['n']}/{m['seeds']} | {acc} | {ci} | {diff} | {p} | {verdict} | {params} | {cost} |")
        lines.append("")
        extra = []
        for m in table["methods"]:
            if m["trained_only"]:
                accs = ", ".join(f"seed {k}: {_f(v)}" for k, v in m["trained_only"].items())
                extra.append(f"- `{m['method']}` is not collapsible (e.g. a nonlinear +Init first stage), so it has no "
                             f"deployed accuracy; its trained model's test accuracy: {accs}")
        for r in table["missing"]:
            what = r["status"]
            if r["exit_code"] is not None:
                what += f" (exit {r['exit_code']})"
            if r["error"]:
                what += f": {r['error']}"
            extra.append(f"- `{r['method']}` seed {r['seed']}: {what} — `{r['run_dir']}`")
        if extra:
            lines += ["Not in the statistics:", "", *extra, ""]
    return "\n".join(lines).rstrip() + "\n"


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in COLUMNS})
    write_text_atomic(path, buf.getvalue())


__all__ = ["TEST_NAME", "markdown", "schedule_text", "write_csv"]
