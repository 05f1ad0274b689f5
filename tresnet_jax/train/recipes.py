"""Fine-tuning recipes as data: one TOML file a recipe in ``train/recipes/`` (package data), the
authors' published settings for one dataset with the source of each value beside it.

A file has an ``[about]`` table (``description``, ``aims_at``: the published result it aims at,
``measured``: what this project measured with it) and tables of settings named as TrainConfig's
sections (``[model]``, ``[data]``, ``[optim]``, ``[augment]``, ``[run]``), each value checked as
its setting checks it. ``train.py --recipe NAME`` starts from a recipe's values; flags given
beside it override them (``Recipe.defaults``).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from tresnet_jax.errors import InputError
from tresnet_jax.model.registry import closest
from tresnet_jax.train.config import SECTIONS, TrainConfig, from_flat

SUFFIX = ".toml"
# Where and how a run goes, not what it computes: the command line's to say, never a recipe's.
NOT_IN_RECIPES = ("run.workdir", "run.recipe", "run.progress", "run.compilation_cache", "run.num_devices")
# The data a recipe names. A training set given on the command line (one of TRAINING_SOURCES)
# replaces all of it: a recipe's validation split or class file belongs to its own dataset.
DATA_SETTINGS = tuple(
    f"data.{name}"
    for name in ("dataset", "val_dataset", "train_dir", "val_dir", "train_labels", "val_labels", "classes",
                 "synthetic_data")
)  # fmt: skip
TRAINING_SOURCES = ("data.dataset", "data.train_dir", "data.train_labels", "data.synthetic_data")
ABOUT = ("description", "aims_at", "measured")


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A recipe's settings (``values``: dotted setting name -> value) and what it is for."""

    name: str
    values: dict[str, Any]  # "optim.lr" -> 1e-4
    description: str
    aims_at: str  # the published result the recipe aims at
    measured: str  # what this project measured with it ("not run here" until it has)

    def defaults(self, given: Iterable[str] = ()) -> dict[str, Any]:
        """The values that fill the settings not ``given`` on the command line; when a training
        set is given, none of the recipe's data settings either."""
        given = set(given)
        skip = given | (set(DATA_SETTINGS) if given & set(TRAINING_SOURCES) else set())
        return {key: value for key, value in self.values.items() if key not in skip}

    def config(self) -> TrainConfig:
        """The recipe's values over TrainConfig's defaults, the recipe named in it."""
        return from_flat({**self.values, "run.recipe": self.name})

    def data(self) -> str:
        """The training set and where it is evaluated, as ``--recipe list`` shows them."""
        train = self.values.get("data.dataset") or self.values.get("data.train_dir") or "?"
        val = self.values.get("data.val_dataset") or self.values.get("data.val_dir")
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
    """A recipe from its TOML ``text``; every error names ``source`` (the file) and the setting."""
    tomllib = _toml_reader()
    try:
        tables = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise InputError(f"{source}: not valid TOML ({err})") from None
    extra = sorted(set(tables) - {"about", *SECTIONS})
    if extra:
        raise InputError(f"{source}: unknown table {extra[0]!r} (a recipe has [about] and {_tables()})")
    if not all(isinstance(table, dict) for table in tables.values()):
        raise InputError(f"{source}: [about] and {_tables()} must be tables")
    about = tables.get("about", {})
    unknown = sorted(set(about) - set(ABOUT))
    if unknown:
        raise InputError(f"{source}: unknown key {unknown[0]!r} in [about] (it has {', '.join(ABOUT)})")
    for key in ABOUT:
        if not isinstance(about.get(key), str) or not about[key].strip():
            raise InputError(f"{source}: [about] needs {key} (text)")
    values = {f"{section}.{key}": value for section in SECTIONS for key, value in tables.get(section, {}).items()}
    return Recipe(name, check_values(values, source), *(about[key] for key in ABOUT))


def check_values(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """``values`` checked as the settings check them (an integer is a float where a float is
    asked for), with only the settings a recipe may give. Returns them converted."""
    settings = {f"{s}.{f.name}" for s, kind in SECTIONS.items() for f in dataclasses.fields(kind)}
    for key in values:
        if key in NOT_IN_RECIPES:
            raise InputError(f"{source}: {key!r} cannot be set by a recipe (the command line says it)")
        if key not in settings:
            known = sorted(settings - set(NOT_IN_RECIPES))
            raise InputError(f"{source}: unknown setting {key!r}; closest: {closest(key, known, 3)}")
    try:
        checked = from_flat(values)
    except InputError as err:
        raise InputError(f"{source}: {err}") from None
    return {key: getattr(getattr(checked, key.split(".")[0]), key.split(".")[1]) for key in values}


def recipe_table(names: Iterable[str] | None = None) -> list[str]:
    """One line a recipe for ``train.py --recipe list``: name, model and weights (and a head
    other than fc), data, size and resize rule, the result it aims at."""
    rows = [("recipe", "model and weights", "data (train -> evaluated on)", "size", "aims at")]
    for name in recipe_names() if names is None else names:
        recipe = load_recipe(name)
        cfg = recipe.config()
        model, init = cfg.model.name, cfg.model.init
        weights = init if init and init.split(".")[0] == model else f"{model} ({init or 'from scratch'})"
        weights += "" if cfg.model.head == "fc" else f" + {cfg.model.head}"
        rows.append((name, weights, recipe.data(), f"{cfg.data.image_size} {cfg.data.resize}", recipe.aims_at))
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


def _tables() -> str:
    return ", ".join(f"[{section}]" for section in SECTIONS)
