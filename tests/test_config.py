"""TrainConfig, the run's typed settings: every invalid value of every setting is refused where
the config is made, in one InputError naming its flag; "auto" is decided in one place; config.json
holds the tree, and a flat config.json written before the sections still reads and resumes."""

from __future__ import annotations

import dataclasses
import json
import os
import typing

import pytest

import tresnet_jax
from tests.settings import config
from tresnet_jax.cli import train as train_cli
from tresnet_jax.errors import InputError
from tresnet_jax.model.architecture import ML_DECODER, HeadSpec
from tresnet_jax.runtime.xla_options import DETERMINISTIC_GPU_FLAG, request_deterministic_gpu_ops
from tresnet_jax.train.config import (
    AT_LEAST_0,
    CLOSED_FRACTION,
    FRACTION,
    IMAGE_SIZE,
    POSITIVE,
    SCALE,
    SECTIONS,
    TrainConfig,
    check_resumable,
    fields,
    flag_names,
    from_flat,
    resolved,
    stored_config,
    write_config,
)
from tresnet_jax.train.run import Run

# A value each check refuses.
OUTSIDE = {POSITIVE: 0, AT_LEAST_0: -1, FRACTION: 1.0, CLOSED_FRACTION: 1.5, SCALE: 0.0, IMAGE_SIZE: 102}


def invalid_values(dotted: str, field: dataclasses.Field) -> list[object]:
    """Values of ``field`` that must be refused: one of no type it takes, one outside its check,
    a choice it does not offer."""
    hint = typing.get_type_hints(SECTIONS[dotted.split(".")[0]])[field.name]
    values: list[object] = [[1, 2]]  # a list: no setting is one
    if field.metadata.get("check") is not None:
        values.append(OUTSIDE[field.metadata["check"]])
    if typing.get_origin(hint) is typing.Literal:
        values.append("no such choice")
    if dotted == "model.name":
        values.append("resnet50")
    return values


@pytest.mark.parametrize(("dotted", "field"), list(fields()), ids=[dotted for dotted, _ in fields()])
def test_every_invalid_value_of_every_setting_is_one_input_error_naming_its_flag(dotted, field, tmp_path):
    for value in invalid_values(dotted, field):
        with pytest.raises(InputError) as raised:
            from_flat({"run.workdir": str(tmp_path / "run"), dotted: value})
        message = str(raised.value)
        assert "\n" not in message
        assert message.startswith(f"{flag_names(field)[0]} must be "), message
        assert repr(value) in message
    assert not (tmp_path / "run").exists()


def test_choices_are_named_and_the_other_precision_spelling_is_taken():
    with pytest.raises(InputError, match=r"^--schedule must be one of onecycle, cosine, constant, got 'typo'$"):
        from_flat({"optim.schedule": "typo"})
    with pytest.raises(InputError, match=r"^--optimizer must be one of sgd, adam, adamw, got 'lamb'$"):
        from_flat({"optim.optimizer": "lamb"})
    assert from_flat({"model.precision": "bfloat16"}).model.precision == "bf16"
    assert from_flat({"optim.lr": 1}).optim.lr == 1.0  # an integer is a float where one is asked for


def test_a_section_of_another_type_is_refused():
    with pytest.raises(InputError, match=r"TrainConfig.optim must be a OptimSettings"):
        TrainConfig(optim={"lr": 0.1})


def test_a_run_with_settings_that_do_not_go_together_writes_nothing(tmp_path):
    cfg = from_flat({"run.workdir": str(tmp_path / "run"), "data.classes": "c.txt", "data.train_dir": "x"})
    with pytest.raises(InputError, match="--classes names the classes of --train-labels"):
        Run(cfg)
    with pytest.raises(InputError, match="a run needs a workdir"):
        Run(TrainConfig())
    assert not (tmp_path / "run").exists()


def test_auto_is_decided_once_by_backend_and_by_the_run_already_there():
    cfg = TrainConfig()
    assert (cfg.model.precision, cfg.augment.place) == ("auto", "auto")
    on_cpu, on_gpu = resolved(cfg, None, "cpu"), resolved(cfg, None, "gpu")
    assert (on_cpu.model.precision, on_cpu.augment.place) == ("fp32", "host")
    assert (on_gpu.model.precision, on_gpu.augment.place) == ("bf16", "device")
    stored = from_flat({"augment.place": "host"})
    assert resolved(cfg, stored, "gpu").augment.place == "host"  # a run continues as it started
    explicit = from_flat({"model.precision": "fp16", "augment.place": "device"})
    assert resolved(explicit, stored, "cpu") == explicit


def test_config_json_holds_the_tree_and_reads_it_back(tmp_path):
    cfg = from_flat({"run.workdir": str(tmp_path), "optim.lr": 0.05, "augment.flip": False, "model.num_classes": 10})
    write_config(tmp_path, cfg)
    document = json.loads((tmp_path / "config.json").read_text())
    assert list(document) == list(SECTIONS)
    assert document["optim"]["lr"] == 0.05
    assert stored_config(tmp_path) == cfg
    with pytest.raises(InputError, match=r"unknown setting optim\.learning_rate"):
        TrainConfig.from_json({**document, "optim": {"learning_rate": 0.1}})
    with pytest.raises(InputError, match=r"unknown section 'training'"):
        TrainConfig.from_json({**document, "training": {}})


# config.json as train.py wrote it before the sections (issue 19's settings; no augment or decode
# yet: runs before the GPU input path).
OLD_CONFIG = {
    "workdir": "WORKDIR", "recipe": None, "model": "tresnet_m", "num_classes": None, "init": None, "dataset": None,
    "val_dataset": None, "train_dir": "data/train", "val_dir": None, "data_dir": None, "train_labels": None,
    "val_labels": None, "classes": None, "synthetic_data": None, "image_size": 224, "resize": "crop", "epochs": 300,
    "max_steps": 4, "batch_size": 8, "lr": 0.05, "schedule": "onecycle", "warmup_fraction": 0.2, "optimizer": "sgd",
    "momentum": 0.9, "weight_decay": 1e-4, "label_smoothing": 0.1, "loss": "cross_entropy", "asl_gamma_neg": 4.0,
    "asl_gamma_pos": 0.0, "asl_clip": 0.05, "crop_min_scale": 0.08, "flip": True, "randaugment_ops": 2,
    "randaugment_magnitude": 9.0, "cutout": 0.5, "mixup": 0.0, "cutmix": 0.0, "ema_decay": 0.9997, "precision": "fp32",
    "seed": 0, "eval_every": 1, "checkpoint_every": None, "keep_checkpoints": 3, "log_every": 20, "num_devices": None,
    "sync_bn": True, "eval_batch_size": None, "progress": True, "compilation_cache": True,
}  # fmt: skip


def test_a_flat_config_json_of_an_older_run_still_resumes(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**OLD_CONFIG, "workdir": str(tmp_path)}))
    stored = stored_config(tmp_path)
    assert (stored.model.name, stored.optim.lr, stored.optim.max_steps) == ("tresnet_m", 0.05, 4)
    # Runs written before the input path's settings augmented and decoded on the host.
    assert (stored.augment.place, stored.data.decode) == ("host", "host")
    same = from_flat({
        "run.workdir": str(tmp_path), "data.train_dir": "data/train", "optim.max_steps": 4, "optim.batch_size": 8,
        "optim.lr": 0.05, "model.precision": "fp32", "augment.place": "host", "data.decode": "host",
        "run.log_every": 1,  # may change on resume
    })  # fmt: skip
    check_resumable(tmp_path, same)
    with pytest.raises(InputError, match=r"holds a run with other settings \(lr 0\.05 -> 0\.1\); use a new --workdir"):
        check_resumable(tmp_path, same.replace(**{"optim.lr": 0.1}))
    with pytest.raises(InputError, match=r"other settings \(augment 'host' -> 'device'\)"):
        check_resumable(tmp_path, same.replace(**{"augment.place": "device"}))


def test_a_config_json_written_before_the_head_settings_trains_the_fc_head(tmp_path):
    """Runs before --head had TResNet's fc head: their config.json, flat or in sections, reads
    as fc and resumes with today's defaults."""
    (tmp_path / "config.json").write_text(json.dumps({**OLD_CONFIG, "workdir": str(tmp_path)}))
    assert (stored_config(tmp_path).model.head, stored_config(tmp_path).model.num_groups) == ("fc", None)
    cfg = from_flat({"run.workdir": str(tmp_path), "optim.lr": 0.05})
    document = cfg.to_json()
    del document["model"]["head"], document["model"]["num_groups"]
    (tmp_path / "config.json").write_text(json.dumps(document))
    assert stored_config(tmp_path) == cfg
    check_resumable(tmp_path, cfg)
    with pytest.raises(InputError, match=r"other settings \(head 'fc' -> 'ml-decoder'\)"):
        check_resumable(tmp_path, cfg.replace(**{"model.head": "ml-decoder"}))


def test_the_head_settings_and_the_head_they_make():
    """--head takes HeadSpec's spelling too; --num-groups belongs to ML-Decoder; the head of a
    run has its K written out (100 capped at the classes), and more groups than classes is one
    line naming the flag (the original caps them silently)."""
    assert from_flat({"model.head": "ml_decoder"}).model.head == "ml-decoder"
    assert train_cli.parse_args(["--workdir", "w", "--head", "ml_decoder"])[1].model.head == "ml-decoder"
    with pytest.raises(InputError, match=r"^--num-groups is a setting of --head ml-decoder, not of --head fc$"):
        from_flat({"model.num_groups": 10})
    assert TrainConfig().model.head_spec(10) == HeadSpec()
    ml = from_flat({"model.head": "ml-decoder"}).model
    assert [ml.head_spec(n) for n in (10, 80, 1000)] == [HeadSpec(ML_DECODER, k) for k in (10, 80, 100)]
    assert from_flat({"model.head": "ml-decoder", "model.num_groups": 20}).model.head_spec(80) == HeadSpec(
        ML_DECODER, 20
    )
    with pytest.raises(InputError, match=r"^--num-groups 11 is more than the 10 classes: ML-Decoder has at most"):
        from_flat({"model.head": "ml-decoder", "model.num_groups": 11}).model.head_spec(10)


def test_without_synced_batchnorm_the_device_count_is_a_setting_of_the_run(tmp_path):
    write_config(tmp_path, config(workdir=str(tmp_path), num_devices=2))
    check_resumable(tmp_path, config(workdir=str(tmp_path), num_devices=4))  # synchronised: the same result
    write_config(tmp_path, config(workdir=str(tmp_path), num_devices=2, sync_bn=False))
    with pytest.raises(tresnet_jax.InputError, match=r"other settings \(num_devices 2 -> 4\)"):
        check_resumable(tmp_path, config(workdir=str(tmp_path), num_devices=4, sync_bn=False))
    _, cfg = train_cli.parse_args(["--workdir", str(tmp_path), "--no-sync-bn"])
    assert (cfg.run.sync_bn, TrainConfig().run.sync_bn) == (False, True)


def test_deterministic_gpu_kernels_are_requested_through_xla_flags(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    request_deterministic_gpu_ops()
    request_deterministic_gpu_ops()
    assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {DETERMINISTIC_GPU_FLAG}"
    assert train_cli.parse_args(["--workdir", "w", "--deterministic"])[0].deterministic
