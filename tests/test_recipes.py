"""Fine-tuning recipes (``train.py --recipe``): every packaged file loads into a valid
TrainConfig, flags beside a recipe win, ``--print-config`` and ``--recipe list`` print without
touching the disk, and a bad recipe file is named with its bad setting. No training runs here."""

from __future__ import annotations

import importlib.resources
import json
import re
from pathlib import Path

import pytest

from tresnet_jax.cli import train as train_cli
from tresnet_jax.errors import InputError
from tresnet_jax.model.architecture import ML_DECODER, HeadSpec
from tresnet_jax.model.registry import ARCHITECTURES, PRETRAINED
from tresnet_jax.train.config import MULTI_LABEL_LOSSES, SECTIONS, TrainConfig, fields, flag_names, flat, write_config
from tresnet_jax.train.recipes import (
    DATA_SETTINGS,
    NOT_IN_RECIPES,
    load_recipe,
    read_recipe,
    recipe_names,
    recipe_table,
)

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["cars196", "cifar10", "cifar100", "coco2014", "coco2014-ml-decoder", "flowers102", "voc2007"]
MULTI_LABEL = {"coco2014", "coco2014-ml-decoder", "voc2007"}
# Issue 19's TFDS names of each recipe's data.
TFDS_NAMES = {
    "cifar10": "cifar10",
    "cifar100": "cifar100",
    "flowers102": "oxford_flowers102",
    "cars196": "cars196",
    "voc2007": "voc/2007",
    "coco2014": "coco/2014",
    "coco2014-ml-decoder": "coco/2014",
}


def resolved(argv: list[str]) -> TrainConfig:
    return train_cli.parse_args(argv)[1]


def printed_config(argv: list[str], capsys) -> dict:
    assert train_cli.main([*argv, "--print-config"]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_recipes_are_packaged():
    assert recipe_names() == RECIPES
    folder = importlib.resources.files("tresnet_jax.train").joinpath("recipes")
    assert sorted(p.name for p in folder.iterdir() if p.name.endswith(".toml")) == sorted(f"{n}.toml" for n in RECIPES)
    # An installed (not editable) package has them only if pyproject ships them.
    tomllib = pytest.importorskip("tomllib")
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "recipes/*.toml" in package_data["tresnet_jax.train"]


@pytest.mark.parametrize("name", RECIPES)
def test_a_recipe_builds_a_valid_config(name, tmp_path):
    recipe = load_recipe(name)
    assert recipe.name == name
    assert recipe.description
    assert recipe.aims_at
    assert recipe.measured
    assert not set(recipe.values) & set(NOT_IN_RECIPES)
    cfg = resolved(["--recipe", name, "--workdir", str(tmp_path)])
    assert cfg == recipe.config().replace(**{"run.workdir": str(tmp_path)})
    assert cfg.run.recipe == name
    assert {k: v for k, v in flat(cfg).items() if k in recipe.values} == recipe.values
    assert cfg.model.name in ARCHITECTURES
    assert cfg.model.init in PRETRAINED
    assert PRETRAINED[cfg.model.init].architecture == cfg.model.name
    assert cfg.data.dataset.partition(":")[0] == TFDS_NAMES[name]
    assert cfg.data.val_dataset.partition(":")[0] == TFDS_NAMES[name]
    assert cfg.optim.lr is not None
    assert 0 < cfg.optim.ema_decay < 1
    assert 0 <= cfg.optim.warmup_fraction < 1
    assert cfg.model.num_classes is None  # the dataset's own; a recipe's data can be replaced


@pytest.mark.parametrize("name", RECIPES)
def test_every_value_has_its_source_beside_it(name):
    """The issue asks for the source of each value written beside it: a comment on each line."""
    text = importlib.resources.files("tresnet_jax.train").joinpath(f"recipes/{name}.toml").read_text()
    settings = text[text.index("\n[", text.index("[about]")) :]  # from the first table of settings on
    lines = [
        line for line in settings.splitlines() if line.strip() and not line.lstrip().startswith(("#", "["))
    ]  # fmt: skip
    assert len(lines) == len(load_recipe(name).values)
    bare = [line for line in lines if "#" not in line or not line.split("#", 1)[1].strip()]
    assert not bare, f"{name}: values without a source: {bare}"


def test_multi_label_recipes_train_as_asl_does():
    for name in RECIPES:
        cfg = resolved(["--recipe", name, "--workdir", "w"])
        optim = cfg.optim
        assert cfg.multi_label == (name in MULTI_LABEL), name
        if name in MULTI_LABEL:
            assert (optim.loss, cfg.data.resize, optim.optimizer, optim.lr, optim.ema_decay) == (
                "asl",
                "squish",
                "adam",
                1e-4,
                0.9997,
            )
            assert (optim.asl_gamma_neg, optim.asl_gamma_pos, optim.asl_clip) == (4.0, 0.0, 0.05)
            assert (optim.schedule, optim.warmup_fraction, optim.epochs, optim.label_smoothing) == (
                "onecycle",
                0.2,
                40,
                0.0,
            )
            assert cfg.augment.cutout == 0.5
            assert cfg.augment.randaugment_ops > 0
        else:
            assert optim.loss == "cross_entropy"
            assert optim.loss not in MULTI_LABEL_LOSSES
    assert resolved(["--recipe", "voc2007", "--workdir", "w"]).data.dataset == "voc/2007:train+validation"
    assert resolved(["--recipe", "voc2007", "--workdir", "w"]).data.val_dataset == "voc/2007:test"


def test_the_ml_decoder_recipe_is_ml_decoders_coco_script():
    """ML-Decoder's train.py on COCO: its TResNet-L (timm's tresnet_v2_l) with a new ML-Decoder
    head of 100 queries capped at the 80 classes, batch 56 at 448; the rest as ASL's script
    (the test above), weight decay off biases and 1-D parameters (``step.decay_mask``)."""
    cfg = resolved(["--recipe", "coco2014-ml-decoder", "--workdir", "w"])
    assert (cfg.model.name, cfg.model.init, cfg.model.head, cfg.model.num_groups) == (
        "tresnet_v2_l",
        "tresnet_v2_l.miil_in21k",
        "ml-decoder",
        None,
    )
    assert cfg.model.head_spec(80) == HeadSpec(ML_DECODER, 80)
    assert (cfg.optim.batch_size, cfg.data.image_size, cfg.optim.weight_decay) == (56, 448, 1e-4)
    assert (cfg.augment.flip, cfg.augment.mixup, cfg.augment.cutmix) == (False, 0.0, 0.0)
    # --head fc beside it trains the same recipe with TResNet's head: no K is left behind.
    assert resolved(["--recipe", "coco2014-ml-decoder", "--workdir", "w", "--head", "fc"]).model.head_spec(80) == (
        HeadSpec()
    )


def test_flags_beside_a_recipe_override_it(capsys):
    printed = printed_config(["--recipe", "cifar10", "--lr", "0.5"], capsys)
    recipe = load_recipe("cifar10")
    assert printed["optim"]["lr"] == 0.5
    assert printed["run"]["recipe"] == "cifar10"
    printed_flat = flat(TrainConfig.from_json(printed))
    assert {k: printed_flat[k] for k in recipe.values if k != "optim.lr"} == {
        k: v for k, v in recipe.values.items() if k != "optim.lr"
    }
    # The rest is TrainConfig's defaults; flags spelled with "=" or the flip switch win too.
    assert printed["run"]["seed"] == TrainConfig().run.seed
    cfg = resolved(["--recipe", "voc2007", "--workdir", "w", "--epochs=3", "--loss", "bce"])
    assert (cfg.optim.epochs, cfg.optim.loss, cfg.augment.flip) == (3, "bce", False)  # ASL trains without flips
    assert resolved(["--recipe", "cifar10", "--workdir", "w", "--no-flip"]).augment.flip is False


def test_a_training_set_on_the_command_line_replaces_the_recipes_data():
    """Hand-prepared Stanford Cars as folders: the recipe's TFDS splits are dropped, not mixed in."""
    cfg = resolved(["--recipe", "cars196", "--workdir", "w", "--train_dir", "cars/train", "--val_dir", "cars/test"])
    data = cfg.data
    assert (data.train_dir, data.val_dir, data.dataset, data.val_dataset) == ("cars/train", "cars/test", None, None)
    assert data.image_size == 368  # the paper's size
    assert cfg.model.init == "tresnet_l.miil_in1k"
    cfg = resolved(["--recipe", "coco2014", "--workdir", "w", "--train-labels", "a.csv", "--val-labels", "b.csv"])
    data = cfg.data
    assert (data.train_labels, data.val_labels, data.dataset, data.val_dataset) == ("a.csv", "b.csv", None, None)
    assert cfg.optim.loss == "asl"
    # A validation set alone keeps the recipe's training set.
    cfg = resolved(["--recipe", "cifar10", "--workdir", "w", "--val-dataset", "cifar10:train[:1000]"])
    assert (cfg.data.dataset, cfg.data.val_dataset) == ("cifar10:train", "cifar10:train[:1000]")
    assert load_recipe("cifar10").defaults({"data.synthetic_data"}).keys().isdisjoint(DATA_SETTINGS)


def test_print_config_has_train_configs_shape_and_touches_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    printed = printed_config(["--recipe", "coco2014"], capsys)
    assert list(printed) == list(SECTIONS)
    assert {section: list(table) for section, table in printed.items()} == {
        section: list(table) for section, table in TrainConfig().to_json().items()
    }
    assert printed["run"]["workdir"] is None
    assert printed_config(["--recipe", "coco2014", "--workdir", "runs/x"], capsys)["run"]["workdir"] == "runs/x"
    without_recipe = printed_config([], capsys)
    assert without_recipe["run"]["recipe"] is None
    assert without_recipe["optim"]["lr"] is None
    assert list(tmp_path.iterdir()) == []


def test_recipe_list_names_them_all(capsys):
    assert train_cli.main(["--recipe", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[0] == "recipe"
    assert [line.split()[0] for line in lines[1:]] == RECIPES
    assert lines == recipe_table()
    by_name = {line.split()[0]: line for line in lines[1:]}
    assert "tresnet_xl.miil_in1k" in by_name["voc2007"]
    assert "448 squish" in by_name["voc2007"]
    assert "96.0 mAP" in by_name["voc2007"]
    assert "voc/2007:train+validation -> voc/2007:test" in by_name["voc2007"]
    assert "99.0 % top-1" in by_name["cifar10"]
    assert "224 crop" in by_name["cifar10"]
    assert "tresnet_v2_l.miil_in21k + ml-decoder" in by_name["coco2014-ml-decoder"]
    assert "tresnet_l.miil_in1k " in by_name["coco2014"]  # fc: no head named


def test_an_unknown_recipe_names_the_closest(capsys):
    with pytest.raises(InputError, match=r"^unknown recipe 'cifar'; closest: cifar10, cifar100"):
        load_recipe("cifar")
    assert train_cli.main(["--recipe", "coco", "--workdir", "w"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unknown recipe 'coco'; closest: coco2014")
    assert err.count("\n") == 1


RECIPE = """
[about]
description = "d"
aims_at = "a"
measured = "not run here"

[optim]
lr = 0.01  # ours
"""


def test_a_recipe_file_with_an_unknown_setting_names_the_file_and_setting(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(RECIPE + "learning_rate = 0.1\n")
    with pytest.raises(InputError, match=r"mine\.toml: unknown setting 'optim.learning_rate'; closest: .*optim\.lr"):
        read_recipe(path)
    path.write_text(RECIPE)
    recipe = read_recipe(path)
    assert (recipe.name, recipe.values, recipe.measured) == ("mine", {"optim.lr": 0.01}, "not run here")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('[run]\nworkdir = "runs/x"\n', "'run.workdir' cannot be set by a recipe"),
        ("[run]\nnum_devices = 2\n", "'run.num_devices' cannot be set by a recipe"),
        ('epochs = "many"\n', "--epochs must be int, got 'many'"),
        ("epochs = 2.5\n", "--epochs must be int, got 2.5"),
        ("[augment]\nflip = 1\n", "--no-flip must be bool, got 1"),
        ("[model]\ninit = 3\n", "--init must be str (or None), got 3"),
        ("[other]\n", "unknown table 'other'"),
        ("lr = \n", "not valid TOML"),
        ('loss = "focal"\n', "--loss must be one of cross_entropy, asl, bce, got 'focal'"),
    ],
)
def test_bad_recipe_files_are_named(tmp_path, extra, message):
    path = tmp_path / "bad.toml"
    path.write_text(RECIPE + extra)
    with pytest.raises(InputError, match="bad.toml: " + re.escape(message)):
        read_recipe(path)


def test_an_integer_is_a_float_where_one_is_asked(tmp_path):
    path = tmp_path / "ints.toml"
    path.write_text(RECIPE.replace("lr = 0.01", "lr = 1") + "weight_decay = 0\n")
    values = read_recipe(path).values
    assert values == {"optim.lr": 1.0, "optim.weight_decay": 0.0}
    assert all(isinstance(v, float) for v in values.values())


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--asl-gamma-neg", "-1"], "--asl-gamma-neg must be at least 0, got -1.0"),
        (["--asl-gamma-pos", "-0.5"], "--asl-gamma-pos must be at least 0"),
        (["--asl-clip", "1"], r"--asl-clip must be in \[0, 1\), got 1.0"),
        (["--asl-clip", "-0.1"], r"--asl-clip must be in \[0, 1\)"),
        (["--image-size", "102"], "--image-size must be a positive multiple of 4, got 102"),
        (["--loss", "focal"], "invalid choice: 'focal'"),
        (["--resize", "pad"], "invalid choice: 'pad'"),
        ([], "the following arguments are required: --workdir"),
    ],
)
def test_flags_are_checked(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_cli.parse_args(["--workdir", "w", *flags] if flags else [])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_the_flags_reach_the_config():
    cfg = resolved(
        ["--workdir", "w", "--loss", "asl", "--asl-gamma-neg", "2", "--asl-gamma-pos", "1", "--asl-clip", "0",
         "--resize", "squish", "--optimizer", "adam", "--train-labels", "t.csv", "--val-labels", "v.csv",
         "--classes", "c.txt", "--precision", "bfloat16"]
    )  # fmt: skip
    optim = cfg.optim
    assert (optim.loss, optim.asl_gamma_neg, optim.asl_gamma_pos, optim.asl_clip) == ("asl", 2.0, 1.0, 0.0)
    assert (cfg.data.resize, optim.optimizer, cfg.run.recipe) == ("squish", "adam", None)
    assert (cfg.data.train_labels, cfg.data.val_labels, cfg.data.classes) == ("t.csv", "v.csv", "c.txt")
    assert cfg.model.precision == "bf16"  # the other spelling, in the one vocabulary


def test_config_json_records_the_recipe_and_its_values(tmp_path):
    cfg = resolved(["--recipe", "voc2007", "--workdir", str(tmp_path), "--batch-size", "64"])
    write_config(tmp_path, cfg)
    stored = json.loads((tmp_path / "config.json").read_text())
    assert stored == cfg.to_json()
    assert TrainConfig.from_json(stored) == cfg
    assert (stored["run"]["recipe"], stored["optim"]["batch_size"], stored["optim"]["loss"]) == ("voc2007", 64, "asl")
    assert stored["data"]["resize"] == "squish"
    assert stored["model"]["init"] == "tresnet_xl.miil_in1k"
    assert stored["data"]["image_size"] == 448


def test_every_setting_has_a_flag():
    """The command line is made from the settings: each has its flag in train.py's help."""
    shown = train_cli.build_parser().format_help()
    for dotted, field in fields():
        assert f"{flag_names(field)[0]} " in shown or f"{flag_names(field)[0]}\n" in shown, dotted
