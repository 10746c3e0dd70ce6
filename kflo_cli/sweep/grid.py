"""The sweep grid: its cells, and ``load_grid``, which reads a grid file (TOML) and validates it strictly.

A grid is ONE shared training schedule (``[train]``), a list of models, named data settings (``[data.NAME]``),
named methods (``[method.NAME]``) and seeds. Every cell (model x data x method x seed) is one ``kflo train`` run
with exactly the ``[train]`` options, so the methods of a table can only differ by what defines them. Recipe files
contribute their ``[[recipe]]`` tables only: they are passed to ``kflo train`` as recipe spec strings, never as
``--recipe-file``, so their ``[train]`` tables cannot reach a run (the sweep prints which keys it ignored).
See docs/sweep.md for every key.

>>> grid = load_grid("sweeps/smoke.toml")           # doctest: +SKIP
>>> [c.label for c in grid.cells()][:2]             # doctest: +SKIP
['lenet5/digits/vanilla/seed0', 'lenet5/digits/vanilla/seed1']
"""

from __future__ import annotations

import fnmatch
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from ..errors import KfloError
from .grid_checks import (
    _check_references,
    _parse_data,
    _parse_method,
    _parse_models,
    _parse_seeds,
    _parse_tables,
    _parse_train,
)
from .schema import (  # the vocabulary and the table definitions, importable from here as before
    DATA_KEYS,
    DATA_OPTIONS,
    METHOD_KEYS,
    MODEL_FILTERS,
    SWEEP_PATHS,
    TEACHER_KEYS,
    TOP_KEYS,
    DataSetting,
    Method,
    TeacherRef,
    _close,
    _train_fields,
    _type_name,
    _unknown,
    comma_list,
    model_dir,
    train_cli_options,
    train_options,
)


# -- the parsed grid ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, order=True)
class Cell:
    """One run of the grid: ``model`` x ``data`` setting x ``method`` x ``seed``."""

    model: str
    data: str
    method: str
    seed: int
    #: not in the grid itself but needed by a cell that is (a teacher on another model, a +Init stage the method
    #: filters leave out); trained and reported like the others
    auxiliary: bool = field(default=False, compare=False)

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.model, self.data, self.method, self.seed)

    @property
    def label(self) -> str:
        return f"{self.model}/{self.data}/{self.method}/seed{self.seed}"

    @property
    def relpath(self) -> Path:
        """Where the run lives under the sweep's output folder."""
        return Path("runs") / model_dir(self.model) / self.data / self.method / f"seed{self.seed}"


@dataclass(frozen=True)
class Grid:
    """A validated grid file."""

    path: str
    name: str
    description: str
    baseline: str
    models: tuple[str, ...]
    seeds: tuple[int, ...]
    train: Mapping[str, Any]
    data: Mapping[str, DataSetting]
    methods: Mapping[str, Method]
    text: str = ""

    # -- cells -------------------------------------------------------------------------------------------------
    def dependencies(self, cell: Cell) -> list[tuple[str, Cell]]:
        """The runs ``cell`` needs first, as (what for, cell): its +Init stage and its distillation teacher."""
        method = self.methods[cell.method]
        deps = []
        if method.init_from_expanded is not None:
            deps.append(("init_from_expanded", Cell(cell.model, cell.data, method.init_from_expanded, cell.seed)))
        if method.teacher is not None:
            deps.append(("teacher", Cell(method.teacher.model or cell.model, cell.data, method.teacher.method, cell.seed)))
        return deps

    def cells(self) -> list[Cell]:
        """Every cell, dependencies before the cells that need them; within a level by seed, then grid order."""
        main = [Cell(m, d.name, meth.name, s) for m in self.models for d in self.data.values() if d.runs_on(m)
                for meth in self.methods.values() if meth.runs_on(m) for s in self.seeds]
        known = {c.key: c for c in main}
        queue = list(main)
        while queue:
            for _, dep in self.dependencies(queue.pop()):
                if dep.key not in known:
                    aux = Cell(*dep.key, auxiliary=True)
                    known[aux.key] = aux
                    queue.append(aux)
        depth: dict[tuple, int] = {}

        def level(cell: Cell, trail: tuple) -> int:
            if cell.key in depth:
                return depth[cell.key]
            if cell.key in trail:
                loop = " -> ".join(f"{k[2]} on {k[0]}" for k in (*trail[trail.index(cell.key):], cell.key))
                raise KfloError(f"{self.path}: methods depend on each other in a loop ({loop}) through teacher / "
                                "init_from_expanded; break the loop")
            deps = self.dependencies(cell)
            depth[cell.key] = 1 + max((level(known[d.key], (*trail, cell.key)) for _, d in deps), default=-1)
            return depth[cell.key]

        for c in known.values():
            level(c, ())
        models = {m: i for i, m in enumerate(self.models)}
        datas = {d: i for i, d in enumerate(self.data)}
        methods = {m: i for i, m in enumerate(self.methods)}
        return sorted(known.values(), key=lambda c: (depth[c.key], c.seed, models.get(c.model, len(models)), c.model,
                                                      datas[c.data], methods[c.method]))

    def options(self, cell: Cell) -> dict[str, Any]:
        """The ``kflo train`` options of ``cell`` (without threads and the paths of the runs it depends on)."""
        method = self.methods[cell.method]
        return {**self.train, **self.data[cell.data].options, **method.options(), "source": cell.model, "seed": cell.seed}

    def ignored_notes(self) -> list[str]:
        """One line per method whose recipe files' [train] tables the sweep ignores."""
        notes = []
        for m in self.methods.values():
            for path, keys in m.ignored_train:
                notes.append(f"method '{m.name}': the [train] table of {path} ({', '.join(keys)}) is ignored; "
                             f"every cell trains with the grid's [train] table")
        return notes



# -- parsing -----------------------------------------------------------------------------------------------------
def load_grid(path: str | Path, *, check_models: bool = True) -> Grid:
    """Read and validate a grid file; every problem is one :class:`KfloError` sentence naming the file and key.

    Args:
        path: the TOML file.
        check_models: resolve every model name against timm/torchvision (imports timm; a typo is caught before any
            run starts).
    """
    path = Path(path)
    where = str(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise KfloError(f"grid file {path} does not exist; pass the path of a sweep TOML file (see sweeps/)") from None
    except (IsADirectoryError, UnicodeDecodeError, PermissionError) as exc:
        raise KfloError(f"cannot read grid file {path} ({type(exc).__name__}); pass a readable TOML file") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise KfloError(f"grid file {path} is not valid TOML ({exc}); fix its syntax") from None
    for key in raw:
        if key not in TOP_KEYS:
            raise _unknown(where, key, TOP_KEYS)

    name = raw.get("name", path.stem)
    description = raw.get("description", "")
    for key, value in (("name", name), ("description", description)):
        if not isinstance(value, str):
            raise KfloError(f"{where}: {key} must be a string, not {_type_name(value)}")
    models = _parse_models(raw, where)
    seeds = _parse_seeds(raw, where)
    train = _parse_train(raw.get("train"), where)
    data = _parse_tables(raw, "data", where, _parse_data, path.parent)
    methods = _parse_tables(raw, "method", where, _parse_method, path.parent)
    baseline = raw.get("baseline", "vanilla")
    if not isinstance(baseline, str):
        raise KfloError(f"{where}: baseline must be a method name (a string), not {_type_name(baseline)}")
    if baseline not in methods:
        raise KfloError(f"{where}: baseline '{baseline}' is not a method{_close(baseline, methods)}; add [method.{baseline}] "
                        "(a table without recipe is the vanilla model) or set baseline = \"NAME\" to one of: "
                        f"{', '.join(methods)}")
    for m in methods.values():
        _check_references(m, methods, where)
    for table in (*data.values(), *methods.values()):
        kind = "data" if isinstance(table, DataSetting) else "method"
        for glob in table.only_models:
            if not any(fnmatch.fnmatchcase(model, glob) for model in models):
                raise KfloError(f"{where}: [{kind}.{table.name}] only_models '{glob}' matches none of the models "
                                f"({', '.join(models)}); fix the glob")
    if check_models:
        from ..models import resolve_model_id

        teachers = {m.teacher.model for m in methods.values() if m.teacher is not None and m.teacher.model}
        for model in (*models, *sorted(teachers)):
            try:
                resolve_model_id(model)
            except KfloError as exc:
                raise KfloError(f"{where}: {exc}") from None
    grid = Grid(where, name, description, baseline, models, seeds, train, data, methods, text)
    cells = grid.cells()  # loops between methods are refused here
    if not any(not c.auxiliary for c in cells):
        raise KfloError(f"{where}: the grid has no cells: every method or data setting is filtered out by "
                        "only_models / skip_models")
    _check_configs(grid, where)
    return grid


def _check_configs(grid: Grid, where: str) -> None:
    """Every (data setting, method) combination must make a valid kflo train configuration."""
    from ..train.config import resolve_config

    fields = _train_fields()
    for data in grid.data.values():
        for method in grid.methods.values():
            options = {**grid.options(Cell(grid.models[0], data.name, method.name, 0))}
            if method.teacher is not None:
                options["teacher_checkpoint"] = "teacher.safetensors"
            try:
                resolve_config({k: v for k, v in options.items() if k in fields})
            except KfloError as exc:
                raise KfloError(f"{where}: [data.{data.name}] with [method.{method.name}] is not a valid kflo train "
                                f"configuration: {exc}") from None


__all__ = ["Cell", "DataSetting", "Grid", "Method", "TeacherRef", "comma_list", "load_grid", "model_dir", "train_cli_options", "train_options"]
