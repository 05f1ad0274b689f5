"""WeightsInfo, the record of what a set of weights is: it reads every ``metadata.json`` the
project has written (the converter's, the hub's, train.py's, ASL's, the earliest ones and
minimal hand-written ones), writes one shape that reads back equal, and refuses a value of the
wrong kind in one InputError naming the file."""

import json

import pytest

import tresnet_jax
from tresnet_jax.errors import InputError
from tresnet_jax.preprocessing import Preprocessing
from tresnet_jax.weights.info import FORMAT_VERSION, Reported, Source, WeightsInfo
from tresnet_jax.weights.storage import METADATA_FILE, read_info

# fmt: off
PREPROCESSING_V1 = {"input_size": 448, "crop_pct": 0.875, "interpolation": "bilinear", "resize_size": 512,
                    "mean": [0.0] * 3, "std": [1.0] * 3}
# metadata.json as each writer wrote it before the record (format 1), and what it says.
WRITTEN_BEFORE = {
    "converter": (
        {
            "model": "tresnet_m",
            "num_classes": 1000,
            "tag": "tresnet_m.miil_in1k_448",
            "multi_label": False,
            "class_names": None,
            "preprocessing": PREPROCESSING_V1,
            "reported": {"top1": 81.71, "top5": 95.57, "imagenet_v2_top1": None},
            "source": {
                "file": "model.safetensors",
                "sha256": "ab12",
                "layout": "timm",
                "num_classes": 1000,
                "repo": "timm/tresnet_m.miil_in1k_448",
                "revision": "0123abcd",
            },
            "notes": [],
            "created": "2026-03-01T10:00:00+00:00",
        },
        WeightsInfo(
            "tresnet_m",
            1000,
            preprocessing=Preprocessing(448),
            tag="tresnet_m.miil_in1k_448",
            source=Source("model.safetensors", "ab12", "timm", 1000, "timm/tresnet_m.miil_in1k_448", "0123abcd"),
            reported=Reported(81.71, 95.57),
            created="2026-03-01T10:00:00+00:00",
            format_version=1,
        ),
    ),
    "train.py": (
        {
            "model": "tresnet_l",
            "num_classes": 3,
            "tag": None,
            "reported": None,
            "multi_label": True,
            "preprocessing": {
                "input_size": 224,
                "crop_pct": 0.875,
                "interpolation": "bilinear",
                "squish": True,
                "mean": [0.0] * 3,
                "std": [1.0] * 3,
            },
            "source": {"trained_in": "/runs/voc", "step": 600, "ema": True, "mAP": 71.5},
            "class_names": ["cat", "dog", "bird"],
        },
        WeightsInfo(
            "tresnet_l",
            3,
            multi_label=True,
            class_names=("cat", "dog", "bird"),
            preprocessing=Preprocessing(224, squish=True),
            source=Source(trained_in="/runs/voc", step=600, ema=True, validation={"mAP": 71.5}),
            format_version=1,
        ),
    ),
    "earliest": (
        {
            "model": "tresnet_xl",
            "num_classes": 1000,
            "tag": "tresnet_xl.miil_in1k",
            "tag_guessed": True,
            "preprocessing": {"input_size": 224, "crop_pct": 0.875, "interpolation": "bilinear"},
            "reported": {"top1": 82.07, "top5": 95.93, "imagenet_v2_top1": 70.6},
        },
        WeightsInfo(
            "tresnet_xl", 1000, tag="tresnet_xl.miil_in1k", reported=Reported(82.07, 95.93, 70.6), format_version=1
        ),
    ),
    "minimal": ({"model": "tresnet_m", "num_classes": 0}, WeightsInfo("tresnet_m", 0, format_version=1)),
    "a tag no longer published": (
        {"model": "tresnet_m", "num_classes": 1000, "tag": "tresnet_m.untrained"},
        WeightsInfo("tresnet_m", 1000, format_version=1),
    ),
}
# fmt: on


@pytest.mark.parametrize("writer", WRITTEN_BEFORE)
def test_every_metadata_written_so_far_reads_and_writes_back_equal(writer, tmp_path):
    document, expected = WRITTEN_BEFORE[writer]
    (tmp_path / METADATA_FILE).write_text(json.dumps(document))
    info = read_info(tmp_path)
    assert info == expected
    written = info.to_json()
    assert written["format_version"] == FORMAT_VERSION
    assert WeightsInfo.from_json(written) == info.replace(format_version=FORMAT_VERSION)
    assert written["preprocessing"]["resize_size"] == info.preprocessing.resize_size  # for tools that ask


def test_the_record_knows_its_architecture_and_published_configuration():
    info = WRITTEN_BEFORE["converter"][1]
    assert info.arch == tresnet_jax.ARCHITECTURES["tresnet_m"]
    assert info.published == tresnet_jax.PRETRAINED["tresnet_m.miil_in1k_448"]
    assert WeightsInfo("tresnet_m", 10).published is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": "resnet50"}, "unknown model 'resnet50'"),
        ({"model": 3}, "model 3: expected str"),
        ({"num_classes": -1}, "num_classes must be a whole number >= 0, got -1"),
        ({"num_classes": True}, "num_classes must be a whole number >= 0, got True"),
        ({"head": "ml_decoder_v9"}, "unknown head 'ml_decoder_v9'"),
        ({"multi_label": "yes"}, "multi_label 'yes': expected bool"),
        ({"class_names": ["a", "b"]}, "2 class names for 3 classes"),
        ({"class_names": ["a", "b", 3]}, "class_names: not all strings"),
        ({"preprocessing": {"input_size": 102}}, "image size must be a positive multiple of 4, got 102"),
        ({"preprocessing": {"squish": "false"}}, "preprocessing squish 'false' is not a true/false"),
        ({"preprocessing": {"crop_pct": 1.5}}, r"crop fraction must be in \(0, 1\], got 1.5"),
        ({"source": {"step": "600"}}, "source step '600': expected int or null"),
        ({"source": {"validation": {"top1": "high"}}}, "source validation .*: expected dict or null"),
        ({"reported": {"top1": "81"}}, "reported top1 '81': expected float or null"),
        ({"source": []}, r"source \[\]: expected dict"),
    ],
)
def test_a_value_of_the_wrong_kind_is_one_input_error_naming_the_file(change, message, tmp_path):
    (tmp_path / METADATA_FILE).write_text(json.dumps({"model": "tresnet_m", "num_classes": 3, **change}))
    with pytest.raises(InputError, match=f"^{tmp_path / METADATA_FILE}: {message}"):
        read_info(tmp_path)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"num_classes": 3}'])
def test_unreadable_metadata_is_one_input_error(text, tmp_path):
    (tmp_path / METADATA_FILE).write_text(text)
    with pytest.raises(InputError, match=f"^{tmp_path / METADATA_FILE}: "):
        read_info(tmp_path)
