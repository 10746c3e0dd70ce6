"""Declarative recipe files (TOML): one or more ``[[recipe]]`` tables and an optional ``[train]`` table.

Example (``recipes/kflo-2x4.toml``)::

    description = "KFLO 2x4, the paper's main setting"
    [[recipe]]
    name = "kflo"
    depth = 2
    width = 4.0
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from .errors import KfloError

PACKAGE = "kflo_cli.recipe_files"


@dataclass
class RecipeFile:
    """A parsed recipe file."""

    path: str
    description: str = ""
    recipes: list[dict[str, Any]] = field(default_factory=list)
    train: dict[str, Any] = field(default_factory=dict)


def _bundled_dirs() -> list[Any]:
    """Where bundled recipe files live: the installed ``kflo_cli.recipe_files`` package (a wheel maps the
    repository's ``recipes/`` there), else the ``recipes/`` folder beside the package in a source checkout
    (editable installs do not expose the mapped sub-package)."""
    dirs: list[Any] = []
    try:
        dirs.append(resources.files(PACKAGE))
    except ModuleNotFoundError:
        pass
    dirs.append(Path(__file__).resolve().parent.parent / "recipes")
    return dirs


def bundled_recipe_files() -> dict[str, str]:
    """Name -> path of the recipe files shipped with kflo."""
    found: dict[str, str] = {}
    for root in _bundled_dirs():
        try:
            entries = list(root.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            if entry.name.endswith(".toml"):
                found.setdefault(entry.name[: -len(".toml")], str(entry))
    return dict(sorted(found.items()))


def resolve_recipe_file(ref: str) -> Path:
    """A path as given, or the name of a bundled file (``kflo-2x4`` or ``kflo-2x4.toml``)."""
    path = Path(ref)
    if path.is_file():
        return path
    bundled = bundled_recipe_files()
    key = ref[: -len(".toml")] if ref.endswith(".toml") else ref
    if key in bundled:
        return Path(bundled[key])
    names = ", ".join(bundled) or "none"
    raise KfloError(f"recipe file '{ref}' is neither a file nor a bundled recipe name; bundled: {names}")


def load_recipe_file(ref: str) -> RecipeFile:
    """Read and check a recipe file given by path or bundled name."""
    path = resolve_recipe_file(ref)
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise KfloError(f"recipe file {path} is not valid TOML ({exc}); fix its syntax") from None
    unknown = sorted(set(data) - {"description", "recipe", "train"})
    if unknown:
        raise KfloError(f"recipe file {path}: unknown top-level key(s) {', '.join(unknown)}; allowed: description, "
                        "[[recipe]] tables and a [train] table")
    recipes = data.get("recipe", [])
    if isinstance(recipes, dict):
        recipes = [recipes]
    if not isinstance(recipes, list) or not all(isinstance(r, dict) and "name" in r for r in recipes):
        raise KfloError(f"recipe file {path}: each [[recipe]] table needs a name = \"...\" entry")
    train = data.get("train", {})
    if not isinstance(train, dict):
        raise KfloError(f"recipe file {path}: [train] must be a table of option = value entries")
    return RecipeFile(str(path), str(data.get("description", "")), recipes, train)


__all__ = ["RecipeFile", "bundled_recipe_files", "load_recipe_file", "resolve_recipe_file"]
