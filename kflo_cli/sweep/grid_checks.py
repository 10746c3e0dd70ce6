"""Parsing and strict validation of a grid file's values: models, seeds, [train], and each [data.*] / [method.*] table."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from ..errors import KfloError
from .schema import (
    _METHOD_OPTIONS,
    _NAME,
    _PER_CELL,
    DATA_KEYS,
    DATA_OPTIONS,
    METHOD_KEYS,
    MODEL_FILTERS,
    TEACHER_KEYS,
    DataSetting,
    Method,
    TeacherRef,
    _close,
    _coerce,
    _moved,
    _norm,
    _str_list,
    _train_fields,
    _unknown,
    model_dir,
    train_cli_options,
)



def _parse_models(raw: dict[str, Any], where: str) -> tuple[str, ...]:
    if "models" not in raw:
        raise KfloError(f"{where}: no models; add e.g. models = [\"lenet5\"]")
    models = _str_list(raw["models"], where, "models", allow_single=False)
    if not models:
        raise KfloError(f"{where}: models is empty; list at least one model name")
    dirs: dict[str, str] = {}
    for m in models:
        other = dirs.setdefault(model_dir(m), m)
        if other != m or models.count(m) > 1:
            raise KfloError(f"{where}: model '{m}' is listed twice (or as '{other}'); list each model once")
    return models


def _parse_seeds(raw: dict[str, Any], where: str) -> tuple[int, ...]:
    value = raw.get("seeds")
    if value is None:
        raise KfloError(f"{where}: no seeds; add e.g. seeds = [0, 1, 2] (or seeds = 3 for 0, 1, 2)")
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise KfloError(f"{where}: seeds = {value} must be at least 1 (the number of seeds 0..N-1)")
        return tuple(range(value))
    if (not isinstance(value, list) or not value
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in value)):
        raise KfloError(f"{where}: seeds = {value!r} must be a non-empty list of integers >= 0 or a count; write e.g. "
                        "seeds = [0, 1, 2]")
    if len(set(value)) != len(value):
        raise KfloError(f"{where}: seeds = {value!r} lists a seed twice; list each seed once")
    return tuple(value)


def _parse_train(table: Any, where: str) -> dict[str, Any]:
    if table is None:
        raise KfloError(f"{where}: no [train] table; add one with the schedule every cell shares (at least epochs = N)")
    if not isinstance(table, dict):
        raise KfloError(f"{where}: train must be a [train] table of kflo train options")
    fields = _train_fields()
    cli = train_cli_options()
    out: dict[str, Any] = {}
    for raw_key, value in table.items():
        key = _norm(raw_key)
        if key in _PER_CELL:
            raise KfloError(f"{where}: [train] cannot set {raw_key}: {_PER_CELL[key]}")
        if key in DATA_OPTIONS:
            raise KfloError(f"{where}: [train] cannot set {raw_key}: data options belong in a [data.NAME] table "
                            "(one per data setting)")
        if key in _METHOD_OPTIONS:
            raise KfloError(f"{where}: [train] cannot set {raw_key}: it defines a method, so it belongs in a "
                            "[method.NAME] table")
        if _moved(key):
            raise KfloError(f"{where}: [train] {raw_key} is no longer a training option: {_moved(key)}")
        if key not in fields:
            allowed = [k for k in cli if k in fields and k not in _PER_CELL and k not in DATA_OPTIONS
                       and k not in _METHOD_OPTIONS]
            raise _unknown(f"{where} [train]", raw_key, sorted(allowed))
        if key not in cli:
            raise KfloError(f"{where}: [train] cannot set {raw_key}: kflo train has no --{key.replace('_', '-')} "
                            "option for the sweep to pass; drop it")
        value = _coerce(key, value, f"{where} [train]")
        if key == "collapse_from" and value == "ema":
            raise KfloError(f"{where}: [train] collapse_from = \"ema\" needs an EMA, which is a method: give that "
                            "method ema = DECAY (it then deploys its average)")
        out[key] = value
    if "epochs" not in out:
        raise KfloError(f"{where}: [train] has no epochs; set epochs = N explicitly (the schedule every cell shares)")
    return out


def _parse_tables(raw: dict[str, Any], kind: str, where: str, parse: Any, base: Path) -> dict[str, Any]:
    tables = raw.get(kind)
    example = "[data.digits]\ndata = \"digits\"" if kind == "data" else "[method.vanilla]"
    if tables is None or tables == {}:
        raise KfloError(f"{where}: no [{kind}.NAME] tables; add at least one, e.g. {example!r}")
    if not isinstance(tables, dict) or not all(isinstance(v, dict) for v in tables.values()):
        raise KfloError(f"{where}: {kind} must be named tables [{kind}.NAME]; write e.g. {example!r}")
    out = {}
    for name, table in tables.items():
        nested = next((k for k, v in table.items() if isinstance(v, dict) and not (kind == "method" and k == "teacher")), None)
        if nested is not None:
            raise KfloError(f"{where}: [{kind}.{name}] holds a table '{nested}': a dot in a table name nests tables in "
                            f"TOML; quote the name, e.g. [{kind}.\"{name}.{nested}\"]")
        if not _NAME.match(name):
            raise KfloError(f"{where}: [{kind}.{name}] is not a usable name (it names a folder): use letters, digits "
                            "and . _ + = - (not starting with . or -)")
        out[name] = parse(name, table, f"{where} [{kind}.{name}]", base)
    return out


def _filters(table: dict[str, Any], where: str) -> dict[str, tuple[str, ...]]:
    return {k: _str_list(table[k], where, k) for k in MODEL_FILTERS if k in table}


def _parse_data(name: str, table: dict[str, Any], where: str, base: Path) -> DataSetting:
    options: dict[str, Any] = {}
    for raw_key, value in table.items():
        key = _norm(raw_key)
        if key not in DATA_KEYS:
            if key in _train_fields():
                raise KfloError(f"{where}: {raw_key} is not a data option; training options belong in the one [train] "
                                "table and method options in [method.NAME]")
            raise _unknown(where, raw_key, DATA_KEYS)
        if key in DATA_OPTIONS:
            options[key] = _coerce(key, value, where)
    if "data" not in options:
        raise KfloError(f"{where}: no data = \"...\"; name the data set (digits, fashion-mnist, mnist, cifar10, "
                        "cifar100, imagefolder, synthetic)")
    if options.get("data_dir"):
        data_dir = Path(options["data_dir"]).expanduser()
        options["data_dir"] = str(data_dir if data_dir.is_absolute() else (base / data_dir).resolve())
    desc = table.get("description", "")
    if not isinstance(desc, str):
        raise KfloError(f"{where}: description must be a string")
    return DataSetting(name, options, desc, **_filters(table, where))


def _resolve_recipe_file(ref: str, base: Path) -> str:
    """A grid's recipe_file: a path relative to the grid file, else as given (cwd or a bundled name)."""
    candidate = base / ref
    return str(candidate) if not Path(ref).is_absolute() and candidate.is_file() else ref


def _canonical(spec: Any, where: str) -> str:
    from ..reparam import create_recipe

    recipe = create_recipe(spec)
    text = recipe.spec()
    again = create_recipe(text)
    if again.values != recipe.values:
        raise KfloError(f"{where}: recipe {spec!r} cannot be written as a NAME:key=value spec (a value contains ',' "
                        "or '='); simplify the value")
    return text


def _parse_method(name: str, table: dict[str, Any], where: str, base: Path) -> Method:
    from ..recipefile import load_recipe_file

    fields = _train_fields()
    values: dict[str, Any] = {}
    for raw_key, value in table.items():
        key = _norm(raw_key)
        if key in METHOD_KEYS:
            values[key] = value
            continue
        if key in DATA_OPTIONS:
            raise KfloError(f"{where}: {raw_key} is a data option; data settings are [data.NAME] tables and every "
                            "method runs on each of them")
        if key in fields or key in _PER_CELL:
            raise KfloError(f"{where}: method '{name}' sets {raw_key}, which belongs to the shared schedule: one [train] "
                            "table applies to every cell so that methods are compared under the same training; "
                            "move it to [train] or drop it")
        raise _unknown(where, raw_key, METHOD_KEYS)
    specs: list[str] = []
    ignored: list[tuple[str, tuple[str, ...]]] = []
    try:
        for ref in _str_list(values.get("recipe_file", []), where, "recipe_file"):
            rf = load_recipe_file(_resolve_recipe_file(ref, base))
            if not rf.recipes:
                raise KfloError(f"recipe file {rf.path} has no [[recipe]] table")
            for entry in rf.recipes:
                if entry.get("include") or entry.get("exclude"):
                    raise KfloError(f"recipe file {rf.path}: [[recipe]] '{entry.get('name')}' has its own include/"
                                    "exclude, which a sweep cannot pass on; set include/exclude on the method instead")
                specs.append(_canonical(entry, where))
            if rf.train:
                ignored.append((ref, tuple(rf.train)))
        for spec in _str_list(values.get("recipe", []), where, "recipe"):
            specs.append(_canonical(spec, where))
    except KfloError as exc:
        if str(exc).startswith(where):
            raise
        raise KfloError(f"{where}: {exc}") from None
    include = _str_list(values.get("include", []), where, "include")
    exclude = _str_list(values.get("exclude", []), where, "exclude")
    if (include or exclude) and not specs:
        raise KfloError(f"{where}: include/exclude select layers for a recipe, but the method has none; add recipe = "
                        "[\"...\"] or drop them")
    ema = _coerce("ema", values["ema"], where) if "ema" in values else None
    teacher = _parse_teacher(values.get("teacher"), where)
    kd = {k: _coerce(k, values[k], where) for k in ("kd_alpha", "kd_temperature") if k in values}
    if kd and teacher is None:
        raise KfloError(f"{where}: {' and '.join(kd)} only apply to distillation; add teacher = \"METHOD\" or drop them")
    init = values.get("init_from_expanded")
    if init is not None:
        if not isinstance(init, str) or not init:
            raise KfloError(f"{where}: init_from_expanded must name another method (the trained nonlinear counterpart), "
                            f"not {init!r}")
        if "init_from_expanded" not in train_cli_options():
            raise KfloError(f"{where}: init_from_expanded needs kflo train's --init-from-expanded option, which this "
                            "kflo does not have; upgrade kflo")
    desc = values.get("description", "")
    if not isinstance(desc, str):
        raise KfloError(f"{where}: description must be a string")
    return Method(name, tuple(specs), desc, include, exclude, ema, teacher, kd.get("kd_alpha"), kd.get("kd_temperature"),
                  init, **_filters(values, where), ignored_train=tuple(ignored))


def _parse_teacher(value: Any, where: str) -> TeacherRef | None:
    if value is None:
        return None
    if isinstance(value, str) and value:
        return TeacherRef(value)
    if isinstance(value, dict):
        for key in value:
            if key not in TEACHER_KEYS:
                raise _unknown(f"{where} teacher", key, TEACHER_KEYS)
        method, model = value.get("method"), value.get("model")
        if not isinstance(method, str) or not method:
            raise KfloError(f"{where}: teacher needs method = \"METHOD\" (the teacher's method in this grid)")
        if model is not None and (not isinstance(model, str) or not model):
            raise KfloError(f"{where}: teacher model must be a model name, not {model!r}")
        return TeacherRef(method, model)
    raise KfloError(f"{where}: teacher = {value!r} must be a method name or a table {{ method = \"...\", model = \"...\" }}")


def _check_references(method: Method, methods: Mapping[str, Method], where: str) -> None:
    here = f"{where} [method.{method.name}]"
    if method.init_from_expanded is not None:
        ref = method.init_from_expanded
        if ref not in methods:
            raise KfloError(f"{here}: init_from_expanded = '{ref}' is not a method{_close(ref, methods)}")
        if ref == method.name:
            raise KfloError(f"{here}: init_from_expanded names the method itself; name its first stage")
        if methods[ref].vanilla:
            raise KfloError(f"{here}: init_from_expanded = '{ref}' is a vanilla method; +Init starts from an expanded run "
                            "(the nonlinear counterpart, e.g. expandnet-ck:nonlinear=relu,mode=feature)")
    if method.teacher is not None:
        ref = method.teacher.method
        if ref not in methods:
            raise KfloError(f"{here}: teacher '{ref}' is not a method{_close(ref, methods)}")
        if ref == method.name and method.teacher.model is None:
            raise KfloError(f"{here}: the teacher is the method itself on the same model; name another method or a "
                            "teacher model")
