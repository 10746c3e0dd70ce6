"""A sweep's results: one row per run (``results.csv``, ``results.json``), per model x data setting a table of
methods with mean +- std, 95 % interval, the paired difference to the baseline and its verdict (``results.md``),
and the accuracy per method with every seed (``results.png``). Reads only the run directories, so it can be
re-run alone (``kflo sweep GRID -o DIR --report-only``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .._atomic import write_text_atomic
from .grid import Grid
from .plot import plot
from .render import TEST_NAME, markdown, schedule_text, write_csv
from .rows import (  # reading the run directories; importable from here as before
    CELL_RECORD,
    COLUMNS,
    DONE,
    STDERR_LOG,
    STDOUT_LOG,
    collect,
    config_differences,
    deployed_accuracy,
    expected_config,
    read_json,
    run_row,
)
from .stats import ALPHA, paired_test, summarize


# -- the statistics ------------------------------------------------------------------------------------------------
def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def tables(grid: Grid, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per model x data setting: each method's summary, its paired comparison with the baseline and its cost."""
    models = list(grid.models) + sorted({r["model"] for r in rows} - set(grid.models))
    out = []
    for model in models:
        for data in grid.data:
            here = [r for r in rows if r["model"] == model and r["data"] == data]
            if not here:
                continue
            acc = {m: {r["seed"]: r["deployed_test_acc"] for r in here if r["method"] == m and r["status"] == DONE
                       and r["deployed_test_acc"] is not None} for m in grid.methods}
            cost = {m: [r["total_seconds"] for r in here if r["method"] == m and r["status"] == DONE
                        and r["total_seconds"] is not None] for m in grid.methods}
            base_acc = acc.get(grid.baseline, {})
            base_cost = _mean(cost.get(grid.baseline, []))
            methods = []
            for name in grid.methods:
                mine = [r for r in here if r["method"] == name]
                if not mine:
                    continue
                done = [r for r in mine if r["status"] == DONE]
                entry: dict[str, Any] = {
                    "method": name,
                    "baseline": name == grid.baseline,
                    "seeds": len(mine),
                    "summary": summarize([acc[name][s] for s in sorted(acc[name])]).to_dict(),
                    "values": {str(s): acc[name][s] for s in sorted(acc[name])},
                    "comparison": None if name == grid.baseline or grid.baseline not in {r["method"] for r in here}
                    else paired_test(acc[name], base_acc).to_dict(),
                    "cost_ratio": (_mean(cost[name]) / base_cost) if cost[name] and base_cost else None,
                    "mean_train_seconds": _mean(cost[name]),
                    "params_trained": next((r["params_trained"] for r in done if r["params_trained"] is not None), None),
                    "params_deployed": next((r["params_deployed"] for r in done if r["params_deployed"] is not None), None),
                    "trained_only": {str(r["seed"]): r["trained_test_acc"] for r in done if r["deployed_test_acc"] is None},
                }
                methods.append(entry)
            missing = [r for r in here if r["status"] != DONE]
            out.append({"model": model, "data": data, "auxiliary": all(r["auxiliary"] for r in here),
                        "methods": methods, "missing": missing})
    return out


def write_report(grid: Grid, root: str | Path, rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Write results.csv, results.json, results.md and results.png into ``root``; return the paths and tables."""
    root = Path(root)
    rows = collect(grid, root) if rows is None else rows
    result_tables = tables(grid, rows)
    paths = {"csv": root / "results.csv", "json": root / "results.json", "md": root / "results.md", "png": root / "results.png"}
    write_csv(paths["csv"], rows)
    payload = {
        "name": grid.name, "description": grid.description, "grid": grid.path, "baseline": grid.baseline,
        "test": TEST_NAME, "alpha": ALPHA, "confidence": 0.95, "train": dict(grid.train),
        "schedule": schedule_text(grid), "ignored_recipe_file_train": grid.ignored_notes(),
        "rows": rows,
        "tables": [{**t, "missing": [{k: r[k] for k in ("method", "seed", "status", "exit_code", "error", "run_dir")}
                                     for r in t["missing"]]} for t in result_tables],
    }
    write_text_atomic(paths["json"], json.dumps(payload, indent=2, default=str) + "\n")
    write_text_atomic(paths["md"], markdown(grid, rows, result_tables, str(root)))
    if not plot(grid, result_tables, paths["png"]):
        paths.pop("png").unlink(missing_ok=True)  # no finished run: no plot, not a stale one
    confusion = root / "gradient_confusion.png"
    if confusion_plot(grid, rows, root, confusion):
        paths["confusion"] = confusion
    return {"paths": paths, "rows": rows, "tables": result_tables}


def confusion_plot(grid: Grid, rows: list[dict[str, Any]], root: Path, path: Path) -> bool:
    """gradient_confusion.png: for runs that tracked gradient confusion (``track = ["gradient-confusion"]``), the
    density of the last epoch's gradient cosine similarities per method, seeds pooled, one panel per model x data
    (ExpandNets Figure 3). False (and no file) when no finished run tracked it."""
    from ..analysis.confusion import last_similarities, write_methods_density

    panels: dict[str, dict[str, list[float]]] = {}
    for row in rows:
        if row.get("status") != "done" or not row.get("run_dir"):
            continue
        run_dir = Path(row["run_dir"])
        found = last_similarities(run_dir if run_dir.is_absolute() else root / run_dir)
        if found is not None:
            panel = panels.setdefault(f"{row['model']} · {row['data']}", {})
            panel.setdefault(str(row["method"]), []).extend(found[1])
    if not panels:
        path.unlink(missing_ok=True)
        return False
    write_methods_density(panels, path, f"{grid.name}, seeds pooled")
    return True


__all__ = ["CELL_RECORD", "confusion_plot", "COLUMNS", "STDERR_LOG", "STDOUT_LOG", "TEST_NAME", "collect", "config_differences",
           "deployed_accuracy", "expected_config", "markdown", "plot", "read_json", "run_row", "tables", "write_report"]
