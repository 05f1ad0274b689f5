"""ASL's multi-label TResNet checkpoints (Alibaba-MIIL/ASL): converted by the command-line tool
from files in their published layout and under their published names, recorded as multi-label
with ASL's preprocessing and reported mAP, equal to timm, and predicted with a threshold.

The checkpoints are built from timm's random weights as ASL's validate.py and infer.py read
them: ``torch.save({"model": <official-layout state_dict>, "num_classes": N, "idx_to_class":
{0: name, ...}})``. Parity bound: test_parity's (1e-4 relative, float32), for the same reason:
the conversion is exact up to InPlaceABN's |w| + 1e-5 (one float32 rounding per scale) and the
two forward passes differ only in the order float32 sums are taken (measured 1.2e-6 here).
"""

import json

import jax
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

import tresnet_jax
from tests.reference import official_state_dict, parity_error, random_images, random_timm_model, torch_logits
from tresnet_jax.cli import convert as torch_to_flax
from tresnet_jax.cli import predict as predict_cli
from tresnet_jax.errors import InputError
from tresnet_jax.model.initialization import random_variables
from tresnet_jax.model.registry import PRETRAINED, resolve
from tresnet_jax.preprocessing import Preprocessing
from tresnet_jax.weights.conversion import choose_config, convert_checkpoint, variables_to_state_dict
from tresnet_jax.weights.info import Reported, WeightsInfo
from tresnet_jax.weights.storage import save_weights
from tresnet_jax.weights.torch_layout import LayoutError, checkpoint_class_names

PARITY_BOUND = 1e-4  # test_parity's, float32
IMAGES = random_images(2, 64, 64, seed=7)
COCO_TAG, VOC_TAG = "tresnet_l.asl_coco_448", "tresnet_xl.asl_voc_448"
# ASL's idx_to_class for COCO (the 80 category names in category-id order) and VOC's 20 classes.
COCO_CLASSES = [
    name.replace("_", " ")
    for name in (  # noqa: SIM905 - a table of names reads better as one string
        "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant stop_sign "
        "parking_meter bench bird cat dog horse sheep cow elephant bear zebra giraffe backpack umbrella handbag tie "
        "suitcase frisbee skis snowboard sports_ball kite baseball_bat baseball_glove skateboard surfboard "
        "tennis_racket bottle wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot "
        "hot_dog pizza donut cake chair couch potted_plant bed dining_table toilet tv laptop mouse remote keyboard "
        "cell_phone microwave oven toaster sink refrigerator book clock vase scissors teddy_bear hair_drier "
        "toothbrush"
    ).split()
]
VOC_CLASSES = (  # noqa: SIM905
    "aeroplane bicycle bird boat bottle bus car cat chair cow diningtable dog horse motorbike person pottedplant "
    "sheep sofa train tvmonitor"
).split()


def asl_checkpoint(reference: torch.nn.Module, classes: list[str]) -> dict:
    """What ASL's model zoo files hold."""
    return {
        "model": official_state_dict(reference),
        "num_classes": len(classes),
        "idx_to_class": dict(enumerate(classes)),
    }


def convert(args, capsys) -> tuple[int, str, str]:
    code = torch_to_flax.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """ASL's TResNet-L COCO file (random weights) under its published name, converted without
    --tag into a weights root of its own: (timm reference, weights root, converter output)."""
    work = tmp_path_factory.mktemp("asl_coco")
    reference = random_timm_model("tresnet_l", len(COCO_CLASSES), seed=0, positive_gammas=True)
    path = work / PRETRAINED[COCO_TAG].file
    assert path.name == "MS_COCO_TRresNet_L_448_86.6.pth"
    torch.save(asl_checkpoint(reference, COCO_CLASSES), path)
    root = work / "weights"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRESNET_JAX_WEIGHTS", str(root))
        assert torch_to_flax.main([str(path)]) == 0
    return reference, root


def test_coco_checkpoint_is_recorded_as_multi_label_with_asl_preprocessing_and_map(coco, monkeypatch):
    _, root = coco
    monkeypatch.setenv("TRESNET_JAX_WEIGHTS", str(root))
    assert [p.name for p in root.iterdir()] == [COCO_TAG]  # stored under the tag the file name says
    info = tresnet_jax.load_metadata(COCO_TAG)
    assert (info.model, info.num_classes, info.tag) == ("tresnet_l", 80, COCO_TAG)
    assert info.multi_label is True
    assert info.class_names == tuple(COCO_CLASSES)
    assert info.reported == Reported(mAP=86.6, dataset="coco/2014")
    # eval.py's preprocessing: a squish to 448 x 448, recorded with mean 0 and std 1.
    assert info.preprocessing == Preprocessing(448, 1.0, "bilinear", squish=True)
    document = json.loads((root / COCO_TAG / "metadata.json").read_text())
    assert (document["preprocessing"]["mean"], document["preprocessing"]["std"]) == ([0.0] * 3, [1.0] * 3)
    assert (info.source.layout, info.source.file) == ("official", PRETRAINED[COCO_TAG].file)


def test_coco_logits_equal_timm(coco, monkeypatch):
    reference, root = coco
    monkeypatch.setenv("TRESNET_JAX_WEIGHTS", str(root))
    model, variables = tresnet_jax.load(COCO_TAG)
    logits = jax.jit(model.apply)(variables, IMAGES)
    assert logits.shape == (2, 80)
    assert parity_error(logits, torch_logits(reference, IMAGES)) <= PARITY_BOUND


@pytest.mark.slow
def test_voc_checkpoint_metadata(tmp_path, capsys):
    """ASL's TResNet-XL VOC file: 20 classes at 448, the VOC 2007 mAP."""
    reference = random_timm_model("tresnet_xl", len(VOC_CLASSES), seed=1, positive_gammas=True)
    path = tmp_path / PRETRAINED[VOC_TAG].file
    torch.save(asl_checkpoint(reference, VOC_CLASSES), path)
    code, out, _ = convert([path, "--output", tmp_path / "voc"], capsys)
    assert code == 0
    assert "preprocessing: 448px, crop 1.0, bilinear, squish (tag tresnet_xl.asl_voc_448)" in out
    assert "multi-label: a sigmoid per class, 20 class names (aeroplane, bicycle, bird, ...); reported mAP 96.0" in out
    metadata = json.loads((tmp_path / "voc" / "metadata.json").read_text())
    assert (metadata["model"], metadata["tag"], metadata["multi_label"]) == ("tresnet_xl", VOC_TAG, True)
    assert metadata["class_names"] == VOC_CLASSES
    assert metadata["reported"] == {"mAP": 96.0, "dataset": "voc/2007"}
    assert (metadata["preprocessing"]["input_size"], metadata["preprocessing"]["squish"]) == (448, True)


def test_asl_file_names_name_their_tag_only_for_matching_tensors():
    large = resolve("tresnet_l")
    for name in (
        "MS_COCO_TRresNet_L_448_86.6.pth",
        "models_local/TRresNet_L_448_86.6.pth",
        "ms_coco_trresnet_l_448_86.6.PTH",
    ):
        assert choose_config(large, 80, name).tag == COCO_TAG, name
    assert choose_config(resolve("tresnet_xl"), 80, "MS_COCO_TResNet_xl_640_88.4.pth").tag == "tresnet_xl.asl_coco_640"
    assert choose_config(resolve("tresnet_m"), 80, "MS_COCO_TRresNet_M_224_81.8.pth").tag == "tresnet_m.asl_coco_224"
    # The name of another model's file, or a 1000-class head: no tag.
    assert choose_config(large, 80, "MS_COCO_TResNet_xl_640_88.4.pth").tag is None
    assert choose_config(large, 1000, "MS_COCO_TRresNet_L_448_86.6.pth").tag is None
    # Only a tag makes weights multi-label: an untagged 80-class TResNet-L may be a single-label
    # fine-tune (the generic configuration, at 448 as the name says); a timm architecture's is unchanged.
    untagged = choose_config(large, 80, "coco_448.pth")
    assert (untagged.tag, untagged.config.multi_label, untagged.config.preprocessing.squish) == (None, False, False)
    assert untagged.config.preprocessing.input_size == 448
    imagenet = choose_config(large, 1000, "model.pth").config
    assert (imagenet.multi_label, imagenet.preprocessing) == (False, Preprocessing(224, 0.875))
    # A --tag whose class count is not the head's is refused.
    with pytest.raises(InputError, match=r"tag tresnet_l.asl_coco_448 is a 80-class tresnet_l, the weights are a 20"):
        choose_config(large, 20, "x.pth", COCO_TAG)


def test_idx_to_class_is_checked():
    assert checkpoint_class_names({"model": {}}) is None
    assert checkpoint_class_names({"idx_to_class": {1: "b", 0: "a"}}) == ["a", "b"]
    with pytest.raises(LayoutError, match=r"idx_to_class is not indexed 0 to 1: its keys are 0, 2"):
        checkpoint_class_names({"idx_to_class": {0: "a", 2: "b"}})
    with pytest.raises(LayoutError, match=r"idx_to_class names must be strings; not 1: int"):
        checkpoint_class_names({"idx_to_class": {0: "a", 1: 7}})
    with pytest.raises(LayoutError, match=r"idx_to_class is a list, not a dict"):
        checkpoint_class_names({"idx_to_class": ["a"]})


def test_single_label_weights_are_recorded_so(tiny_model, tmp_path):
    """Converted weights of a single-label configuration: ``multi_label`` false, and class names
    only when the checkpoint has them; metadata written before ``multi_label`` reads as false."""
    state_dict = variables_to_state_dict(random_variables(tresnet_jax.ARCHITECTURES[tiny_model], 10, 0))
    source = tmp_path / "tiny.pth"
    source.write_bytes(b"stands for the file read")
    _, info = convert_checkpoint(state_dict, source)
    assert (info.multi_label, info.class_names, info.reported) == (False, None, None)
    assert info.preprocessing.squish is False
    names = [f"kind {i}" for i in range(10)]
    assert convert_checkpoint(state_dict, source, class_names=names)[1].class_names == tuple(names)
    document = info.to_json()
    del document["multi_label"]
    assert WeightsInfo.from_json(document).multi_label is False


def test_idx_to_class_of_the_wrong_length_is_refused(tmp_path, weights_root, capsys):
    reference = random_timm_model("tresnet_m", 80, seed=2, positive_gammas=True)
    path = tmp_path / "MS_COCO_TRresNet_M_224_81.8.pth"
    torch.save(asl_checkpoint(reference, COCO_CLASSES) | {"idx_to_class": dict(enumerate(COCO_CLASSES[:79]))}, path)
    code, _, err = convert([path], capsys)
    assert code == 1
    assert (
        one_error_line(err)
        == f"error: {path}: 79 class names (its idx_to_class, or --classes) for a head of 80 classes"
    )
    assert not weights_root.exists()


def test_asl_tag_not_converted_says_where_to_download_it(weights_root, tmp_path, capsys):
    expected = (
        f"tresnet_l.asl_coco_448 is not converted here ({weights_root / COCO_TAG}) and is not on the Hugging Face "
        "hub: download MS_COCO_TRresNet_L_448_86.6.pth from ASL's model zoo "
        "(https://github.com/Alibaba-MIIL/ASL/blob/main/MODEL_ZOO.md), then run "
        "`python convert/torch_to_flax.py MS_COCO_TRresNet_L_448_86.6.pth --tag tresnet_l.asl_coco_448`"
    )
    with pytest.raises(InputError) as raised:
        tresnet_jax.load(COCO_TAG)
    assert str(raised.value) == expected
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    assert predict_cli.main([str(image), "--model", COCO_TAG]) == 1
    assert one_error_line(capsys.readouterr().err) == f"error: {expected}"


@pytest.fixture
def photo(tmp_path):
    """A non-square image and ASL's own transform of it at 64 px: Resize((64, 64)), ToTensor."""
    path = tmp_path / "photo.png"
    pixels = np.random.default_rng(3).integers(0, 256, (50, 80, 3), np.uint8)
    Image.fromarray(pixels).save(path)
    asl = transforms.Compose([transforms.Resize((64, 64)), transforms.ToTensor()])
    return path, asl(Image.open(path).convert("RGB")).permute(1, 2, 0).numpy()[None]


def printed(lines: list[str]) -> list[tuple[float, str]]:
    """``  93.12%  person`` lines as (93.12, "person")."""
    out = []
    for line in lines:
        percent, name = line.strip().split("%  ", 1)
        out.append((float(percent), name))
    return out


@pytest.mark.slow
def test_predict_prints_the_classes_above_the_threshold(coco, photo, monkeypatch, capsys):
    reference, root = coco
    monkeypatch.setenv("TRESNET_JAX_WEIGHTS", str(root))
    path, asl_input = photo
    probabilities = torch.sigmoid(torch.from_numpy(torch_logits(reference, asl_input)[0])).numpy()
    order = np.argsort(-probabilities)
    threshold = float(probabilities[order[2]] + probabilities[order[3]]) / 2  # three classes above
    args = [str(path), "--model", COCO_TAG, "--image-size", "64"]
    assert predict_cli.main([*args, "--threshold", str(threshold)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [f"weights: weights {COCO_TAG!r} from {root / COCO_TAG}", f"{path}:"]
    found = printed(lines[2:])
    assert [name for _, name in found] == [COCO_CLASSES[i] for i in order[:3]]
    assert [p for p, _ in found] == pytest.approx([100 * probabilities[i] for i in order[:3]], abs=0.011)
    # Above every probability: one line saying so, with the most probable class.
    assert predict_cli.main([*args, "--threshold", str((1 + probabilities.max()) / 2)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith(f"  no class above {100 * (1 + probabilities.max()) / 2:g}% (highest: ")
    assert lines[2].endswith(f"%  {COCO_CLASSES[order[0]]})")
    assert len(lines) == 3


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.1"])
def test_threshold_outside_0_1_is_a_usage_error(value, capsys):
    with pytest.raises(SystemExit) as exited:
        predict_cli.parse_args(["x.png", "--threshold", value])
    assert exited.value.code == 2
    assert "--threshold must be between 0 and 1 (exclusive)" in capsys.readouterr().err


def test_threshold_with_single_label_weights_is_an_error(tiny_model, tmp_path, capsys):
    """Weights whose metadata predates "multi_label" are single-label: --threshold is refused."""
    weights = tmp_path / "single"
    save_weights(weights, random_variables(tresnet_jax.ARCHITECTURES[tiny_model], 10, 0), WeightsInfo(tiny_model, 10))
    old = {"model": tiny_model, "num_classes": 10, "tag": None,
           "preprocessing": {"input_size": 64, "crop_pct": 0.875, "interpolation": "bilinear"}}  # fmt: skip
    (weights / "metadata.json").write_text(json.dumps(old))  # as written before "multi_label" existed
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    assert predict_cli.main([str(image), "--weights", str(weights), "--threshold", "0.5"]) == 1
    assert one_error_line(capsys.readouterr().err) == (
        "error: --threshold is for multi-label weights; these (tresnet_tiny, 10 classes) are single-label: "
        "predict.py prints their top 5 classes"
    )


@pytest.mark.slow
def test_eval_map_on_a_label_csv_equals_timm_logits_through_scikit_learn(tmp_path, monkeypatch, capsys):
    """eval.py --weights FILE --val-labels CSV on ASL's TResNet-M COCO file (read directly, the
    tag from its name): the mAP and per-class AP that scikit-learn gives for timm's logits of the
    same squished images. The head is fitted (ridge regression on the random backbone's features,
    as tests/classifier.py does) to scores spread over [-5, 5], so they differ from image to image
    (a random backbone alone gives nearly the same scores to every image). AP depends on their
    order alone, and the order is the same in both when every gap between two images' scores
    exceeds twice the largest difference between the two sets of logits (checked; measured on
    the 13 photographs: gaps from 1.5e-3, logits within 2.1e-5)."""
    from sklearn.metrics import average_precision_score

    from tests.classifier import pil_preprocess
    from tests.images import photo_files
    from tresnet_jax.cli import eval as eval_cli

    monkeypatch.setenv("TRESNET_JAX_WEIGHTS", str(tmp_path / "weights"))
    files = [path for path in photo_files(tmp_path / "photos") if path.suffix == ".png"]
    used = ["person", "dog", "cat", "car", "cup"]  # a few of the model's 80 classes, matched by name
    columns = [COCO_CLASSES.index(name) for name in used]
    rng = np.random.default_rng(3)
    targets = (rng.random((len(files), len(used))) < 0.4).astype(np.int64)
    targets[0], targets[1] = [1, 1, 1, 0, 0], [0, 0, 0, 1, 1]  # every class used has a positive
    images = np.stack([pil_preprocess(path, 64, squish=True) for path in files])
    reference = random_timm_model("tresnet_m", len(COCO_CLASSES), seed=2, positive_gammas=True)
    fit_head(reference, images, columns, rng.uniform(-5.0, 5.0, targets.shape))  # spread scores, any order
    path = tmp_path / PRETRAINED["tresnet_m.asl_coco_224"].file
    torch.save(asl_checkpoint(reference, COCO_CLASSES), path)
    csv = tmp_path / "labels.csv"
    rows = [
        f"{file.relative_to(tmp_path)},{' '.join(n for n, t in zip(used, row, strict=True) if t)}"
        for file, row in zip(files, targets, strict=True)
    ]
    csv.write_text("image,labels\n" + "\n".join(rows) + "\n")
    output, saved = tmp_path / "eval.json", tmp_path / "logits.npz"
    args = ["--weights", path, "--val-labels", csv, "--image-size", 64, "--batch-size", 8]
    assert eval_cli.main([str(a) for a in [*args, "--output", output, "--save-logits", saved, "--no-progress"]]) == 0
    capsys.readouterr()
    report = json.loads(output.read_text())
    assert report["preprocessing"]["squish"] is True  # ASL's, from the tag the file name says
    assert report["images"] == len(files)

    scores = torch_logits(reference, images)[:, columns]
    ours = np.load(saved)["logits"][:, columns]
    assert np.diff(np.sort(scores, axis=0), axis=0).min() > 2 * np.abs(ours - scores).max()
    per_class = average_precision_score(targets, scores, average=None) * 100
    assert report["mAP"] == pytest.approx(per_class.mean(), abs=1e-9)
    assert [report["per_class_AP"][name] for name in used] == pytest.approx(per_class.tolist(), abs=1e-9)
    assert sum(ap is not None for ap in report["per_class_AP"].values()) == len(used)  # no positive: null


def fit_head(model: torch.nn.Module, images: np.ndarray, columns: list[int], targets: np.ndarray) -> None:
    """Set the head's ``columns`` to a ridge regression of ``targets`` on the pooled features."""
    with torch.no_grad():
        features = model.forward_head(model.forward_features(torch.from_numpy(images).permute(0, 3, 1, 2)), True)
    features = features.numpy().astype(np.float64)
    mean = features.mean(0)
    centred = features - mean
    weight = np.linalg.solve(centred.T @ centred + np.eye(centred.shape[1]), centred.T @ targets)
    with torch.no_grad():
        model.head.fc.weight[columns] = torch.from_numpy(weight.T.astype(np.float32))
        model.head.fc.bias[columns] = torch.from_numpy((targets.mean(0) - mean @ weight).astype(np.float32))
