"""Fine-tuning recipes as data: one TOML file a recipe in ``train/recipes/`` (package data), the
authors' published settings for one dataset with the source of each value beside it.

A file has an ``[about]`` table (``description``, ``aims_at``: the published result it aims at,
``measured``: what this project measured with it) and a ``[train]`` table whose keys are
``TrainConfig`` settings, each checked against the setting's type. ``train.py --recipe NAME``
starts from a recipe's values; flags given beside it override them (``Recipe.defaults``).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tresnet_jax.errors import InputError
from tresnet_jax.model.registry import closest
from tresnet_jax.train.config import TrainConfig

SUFFIX = ".toml"
# Where and how a run goes, not what it computes: the command line's to say, never a recipe's.
NOT_IN_RECIPES = ("workdir", "recipe", "progress", "compilation_cache", "num_devices")
# The data a recipe names. A training set given on the command line (one of TRAINING_SOURCES)
# replaces all of it: a recipe's validation split or class file belongs to its own dataset.
DATA_SETTINGS = (
    "dataset",
    "val_dataset",
    "train_dir",
    "val_dir",
    "train_labels",
    "val_labels",
    "classes",
    "synthetic_data",
)
TRAINING_SOURCES = ("dataset", "train_dir", "train_labels", "synthetic_data")
ABOUT = ("description", "aims_at", "measured")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A recipe's settings (``values``: TrainConfig field -> value) and what it is for."""

    name: str
    values: dict[str, Any]  # TrainConfig setting -> value
    description: str
    aims_at: str  # the published result the recipe aims at
    measured: str  # what this project measured with it ("not run here" until it has)

    def defaults(self, given: Iterable[str] = ()) -> dict[str, Any]:
        """The values that fill the settings not ``given`` on the command line; when a training
        set is given, none of the recipe's data settings either."""
        given = set(given)
        skip = given | (set(DATA_SETTINGS) if given & set(TRAINING_SOURCES) else set())
        return {key: value for key, value in self.values.items() if key not in skip}

    def data(self) -> str:
        """The training set and where it is evaluated, as ``--recipe list`` shows them."""
        train = self.values.get("dataset") or self.values.get("train_dir") or "?"
        val = self.values.get("val_dataset") or self.values.get("val_dir")
        return f"{train} -> {val}" if val else train


def recipe_names() -> list[str]:
    """The packaged recipes, by name (their files' names), sorted."""
    return sorted(entry.name[: -len(SUFFIX)] for entry in _folder().iterdir() if entry.name.endswith(SUFFIX))


def load_recipe(name: str) -> Recipe:
    """The packaged recipe ``name``; InputError naming the closest ones when there is none."""
    names = recipe_names()
    if name not in names:
        raise InputError(f"unknown recipe {name!r}; closest: {closest(name, names)}")
    entry = _folder().joinpath(name + SUFFIX)
    return parse_recipe(entry.read_text(encoding="utf-8"), name, f"recipe file {name}{SUFFIX}")


def read_recipe(path: str | Path) -> Recipe:
    """A recipe file anywhere on disk, named after the file (``cars196.toml``: ``cars196``)."""
    path = Path(path)
    return parse_recipe(path.read_text(encoding="utf-8"), path.stem, str(path))


def parse_recipe(text: str, name: str, source: str) -> Recipe:
    """A recipe from its TOML ``text``; every error names ``source`` (the file) and the key."""
    tomllib = _toml_reader()
    try:
        tables = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise InputError(f"{source}: not valid TOML ({err})") from None
    extra = sorted(set(tables) - {"about", "train"})
    if extra:
        raise InputError(f"{source}: unknown table {extra[0]!r} (a recipe has [about] and [train])")
    about, values = tables.get("about", {}), tables.get("train", {})
    if not isinstance(about, dict) or not isinstance(values, dict):
        raise InputError(f"{source}: [about] and [train] must be tables")
    unknown = sorted(set(about) - set(ABOUT))
    if unknown:
        raise InputError(f"{source}: unknown key {unknown[0]!r} in [about] (it has {', '.join(ABOUT)})")
    for key in ABOUT:
        if not isinstance(about.get(key), str) or not about[key].strip():
            raise InputError(f"{source}: [about] needs {key} (text)")
    return Recipe(name, check_values(values, source), *(about[key] for key in ABOUT))


def check_values(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``values`` checked as TrainConfig settings: known names a recipe may set, each of its
    setting's type (an integer is a float where a float is asked for). Returns them converted."""
    hints = typing.get_type_hints(TrainConfig)
    checked = {}
    for key, value in values.items():
        if key in NOT_IN_RECIPES:
            raise InputError(f"{source}: {key!r} cannot be set by a recipe (the command line says it)")
        if key not in hints:
            known = [name for name in hints if name not in NOT_IN_RECIPES]
            raise InputError(f"{source}: unknown key {key!r}; closest settings: {closest(key, known, 3)}")
        checked[key] = _typed(value, _types(hints[key]), f"{source}: {key}")
    return checked


def recipe_table(names: Iterable[str] | None = None) -> list[str]:
    """One line a recipe for ``train.py --recipe list``: name, model and weights, data, size and
    resize rule, the result it aims at."""
    rows = [("recipe", "model and weights", "data (train -> evaluated on)", "size", "aims at")]
    for name in recipe_names() if names is None else names:
        recipe = load_recipe(name)
        model, init = recipe.values.get("model", TrainConfig.model), recipe.values.get("init")
        weights = init if init and init.split(".")[0] == model else f"{model} ({init or 'from scratch'})"
        size = f"{recipe.values.get('image_size', TrainConfig.image_size)} {recipe.values.get('resize', 'crop')}"
        rows.append((name, weights, recipe.data(), size, recipe.aims_at))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row[:-1], widths, strict=True)) + "  " + row[-1]
        for row in rows
    ]


def _folder() -> Any:
    """The packaged recipes' folder (an importlib.resources Traversable)."""
    return importlib.resources.files("tresnet_jax.train").joinpath("recipes")


def _toml_reader() -> Any:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the same parser as the package tomli
        try:
            import tomli as tomllib
        except ModuleNotFoundError:
            raise InputError("reading recipes on Python 3.10 needs the package tomli (pip install tomli)") from None
    return tomllib


def _types(hint: Any) -> tuple[type, ...]:
    """The types a setting takes, None left out (a recipe cannot write None)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(t for t in typing.get_args(hint) if t is not type(None))
    return (hint,)


def _typed(value: Any, allowed: tuple[type, ...], what: str) -> Any:
    for kind in allowed:
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is str and isinstance(value, str):
            return value
    names = " or ".join("a number" if kind is float else kind.__name__ for kind in allowed)
    raise InputError(f"{what} must be {names}, got {value!r}")
