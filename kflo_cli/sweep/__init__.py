"""``kflo sweep``: run a grid of models x methods x data settings x seeds under one shared training schedule,
resumably, and report mean +- std, intervals and paired tests against the baseline. See docs/sweep.md.

>>> from kflo_cli.sweep import load_grid, run_sweep
>>> outcome = run_sweep("sweeps/smoke.toml", "out/smoke", jobs=1)        # doctest: +SKIP
>>> outcome.report["paths"]["md"]                                        # doctest: +SKIP
PosixPath('out/smoke/results.md')
"""

from .grid import Cell, DataSetting, Grid, Method, TeacherRef, load_grid
from .report import collect, write_report
from .runner import EXIT_INTERRUPTED, SweepOutcome, plan_cells, plan_threads, run_sweep
from .stats import Comparison, Summary, paired_test, summarize, welch_test

__all__ = [
    "EXIT_INTERRUPTED",
    "Cell",
    "Comparison",
    "DataSetting",
    "Grid",
    "Method",
    "Summary",
    "SweepOutcome",
    "TeacherRef",
    "collect",
    "load_grid",
    "paired_test",
    "plan_cells",
    "plan_threads",
    "run_sweep",
    "summarize",
    "welch_test",
    "write_report",
]
