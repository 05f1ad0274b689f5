"""eval.py and predict.py with ML-Decoder weights (issue 26): the mAP and per-class AP of a
multi-label ML-Decoder, its classes above --threshold, and a zero-shot ML-Decoder scoring
classes it was never trained on (--classes + --class-embeddings); bad input is one line before
anything is compiled or written.

Weights: tests/tiny_model.py's TResNet (what the commands do with a head does not depend on the
backbone's size), its BatchNorm statistics measured on images so that the logits depend on the
image (with random statistics they differ by 0.1 % between images), and a random ML-Decoder
head, stored as weights directories. The reference is the model applied directly to
``load_image``'s pixels (the one preprocessing eval.py, predict.py and the notebook share).
"""

import json

import jax
import numpy as np
import pytest
from PIL import Image

import tresnet_jax
from tests import tiny_model
from tests.images import generated
from tests.reference import random_images, random_timm_model
from tests.test_export import with_measured_statistics
from tresnet_jax import HeadSpec, Preprocessing, WeightsInfo
from tresnet_jax.cli import eval as eval_cli
from tresnet_jax.cli import predict as predict_cli
from tresnet_jax.data.preprocess import load_image
from tresnet_jax.metrics import average_precision_per_class
from tresnet_jax.model.initialization import replace_head
from tresnet_jax.model.ml_decoder import WORD_DIM
from tresnet_jax.model.registry import resolve
from tresnet_jax.weights.conversion import convert_state_dict
from tresnet_jax.weights.storage import save_weights

pytestmark = pytest.mark.usefixtures("tiny_model")
SIZE = 64
PREPROCESSING = Preprocessing(SIZE, crop_pct=1.0, squish=True)  # ML-Decoder's own: squish, no crop
SEEN = ("person", "bicycle", "car", "dog", "cat", "chair", "bottle")  # the fixed-query head's classes
UNSEEN = ("zebra", "kite", "oven", "tie")  # the zero-shot head's: none of them seen in training
HEAD = HeadSpec("ml_decoder", num_groups=3)  # 3 queries, 3 outputs each, the first 7 kept
ZERO_SHOT = HeadSpec("ml_decoder", zero_shot=True)
# The commands against the model applied directly, both in JAX float32 on the same pixels: what
# differs is XLA's compilation of two programs (batching, the CPU options of the library's steps).
LOGIT_BOUND = 1e-5

# Whatever JAX traces, lowers or compiles (or reads back from the persistent cache) says so here.
_jax_work: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, duration, **_: _jax_work.append(event) if event.startswith("/jax/core/compile") else None
)
jax.monitoring.register_event_listener(
    lambda event, **_: _jax_work.append(event) if event.startswith("/jax/compilation_cache") else None
)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The weights directories, images, labels and reference logits: a dict of everything."""
    root = tmp_path_factory.mktemp("ml_decoder")
    with tiny_model.registered():
        tiny_model.register_in_timm()
        backbone = with_measured_statistics(random_timm_model(tiny_model.NAME, 0, seed=3), random_images(8, SIZE, SIZE))
        spec = resolve(tiny_model.NAME)
        converted = convert_state_dict({k: v.numpy() for k, v in backbone.state_dict().items()}, spec)
        stored = {}
        for name, head, classes, names in (("ml", HEAD, len(SEEN), SEEN), ("zsl", ZERO_SHOT, len(SEEN), None)):
            variables = replace_head(converted.variables, spec.arch, classes, 0, head)
            info = WeightsInfo(tiny_model.NAME, classes, head, True, names, PREPROCESSING)
            stored[name] = save_weights(root / name, variables, info)
        images = []
        for i, (height, width) in enumerate([(90, 120), (64, 64), (150, 100), (70, 200), (128, 96), (80, 80)]):
            images.append(root / f"image{i}.png")
            Image.fromarray(generated(40 + i, height, width)).save(images[-1])
        pixels = np.stack([load_image(path, PREPROCESSING) for path in images])
        rng = np.random.default_rng(5)
        embeddings = rng.normal(size=(len(UNSEEN), WORD_DIM)).astype(np.float32)
        reference = {}
        for name, given in (("ml", None), ("zsl", embeddings)):
            model, variables = tresnet_jax.load(stored[name])  # predict.py's call: compiled once for both
            reference[name] = np.asarray(tresnet_jax.jit(model.apply)(variables, pixels, class_embeddings=given))
    np.save(root / "vectors.npy", embeddings)
    (root / "unseen.txt").write_text("".join(f"{name}\n" for name in UNSEEN))
    # Multi-hot labels, every class with a positive and a negative image; a CSV of them by name.
    seen_targets = rng.permutation(np.tile([[1, 0, 1, 0, 1, 1, 0], [0, 1, 0, 1, 0, 0, 1]], (3, 1)), axis=0)
    unseen_targets = np.tile([[1, 0, 1, 0], [0, 1, 1, 1], [1, 1, 0, 0]], (2, 1))
    for csv, names, targets in (("seen.csv", SEEN, seen_targets), ("unseen.csv", UNSEEN, unseen_targets)):
        rows = [
            f"{path},{' '.join(n for n, t in zip(names, row, strict=True) if t)}"
            for path, row in zip(images, targets, strict=True)
        ]
        (root / csv).write_text("image,labels\n" + "\n".join(rows) + "\n")
    for logits in reference.values():  # the images give different logits: a lost input could not pass
        assert np.abs(logits - logits[0]).max() > 100 * LOGIT_BOUND * max(1.0, np.abs(logits).max())
    return {"root": root, **stored, "images": images, "seen": seen_targets, "unseen": unseen_targets,
            "reference": reference}  # fmt: skip


def run(main, args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_close(logits, reference):
    assert np.abs(logits - reference).max() <= LOGIT_BOUND * max(1.0, np.abs(reference).max())


def test_eval_gives_the_map_and_per_class_ap_of_an_ml_decoder(weights, tmp_path, capsys):
    root = weights["root"]
    args = ["--weights", weights["ml"], "--val-labels", root / "seen.csv", "--no-progress", "--batch-size", 4,
            "--output", tmp_path / "results.json", "--save-logits", tmp_path / "logits.npz"]  # fmt: skip
    code, out, err = run(eval_cli.main, args, capsys)
    assert code == 0, err
    saved = np.load(tmp_path / "logits.npz")
    results = json.loads((tmp_path / "results.json").read_text())
    # The CSV's names map onto the weights' own classes (their order, not the CSV's sorted one).
    expected, targets = weights["reference"]["ml"], weights["seen"]
    assert_close(saved["logits"], expected)
    np.testing.assert_array_equal(saved["labels"], targets)
    ap = 100 * average_precision_per_class(expected, targets)
    assert list(results["per_class_AP"]) == list(SEEN)
    np.testing.assert_allclose(list(results["per_class_AP"].values()), ap, rtol=1e-6)
    assert results["mAP"] == pytest.approx(ap.mean())
    assert (results["head"], results["num_classes"], results["class_embeddings"]) == ("ML-Decoder (K 3)", 7, None)
    assert "ML-Decoder (K 3) head, 7 classes" in out
    assert f"mAP {results['mAP']:.3f}" in out


def test_a_zero_shot_decoder_scores_classes_never_seen_in_training(weights, tmp_path, capsys):
    """Classes given in another order than the CSV's (sorted) names: the logits follow --classes,
    the labels are matched by name."""
    root = weights["root"]
    order = [2, 0, 3, 1]
    (tmp_path / "classes.txt").write_text("".join(f"{UNSEEN[i]}\n" for i in order))
    np.save(tmp_path / "vectors.npy", np.load(root / "vectors.npy")[order])
    zero_shot = ["--classes", tmp_path / "classes.txt", "--class-embeddings", tmp_path / "vectors.npy"]
    args = ["--weights", weights["zsl"], "--val-labels", root / "unseen.csv", *zero_shot, "--no-progress",
            "--batch-size", 4, "--output", tmp_path / "results.json", "--save-logits",
            tmp_path / "logits.npz"]  # fmt: skip
    code, out, err = run(eval_cli.main, args, capsys)
    assert code == 0, err
    expected, targets = weights["reference"]["zsl"][:, order], weights["unseen"][:, order]
    saved = np.load(tmp_path / "logits.npz")
    assert_close(saved["logits"], expected)
    np.testing.assert_array_equal(saved["labels"], targets)
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results["per_class_AP"]) == [UNSEEN[i] for i in order]
    np.testing.assert_allclose(
        list(results["per_class_AP"].values()), 100 * average_precision_per_class(expected, targets), rtol=1e-6
    )
    assert (results["head"], results["num_classes"]) == ("zero-shot ML-Decoder", 4)
    assert results["class_embeddings"] == str(tmp_path / "vectors.npy")
    assert f"4 classes of {tmp_path / 'vectors.npy'} (zero-shot)" in out

    # predict.py: the same classes, those above the threshold, most probable first.
    code, out, err = run(predict_cli.main, [*weights["images"], "--weights", weights["zsl"], *zero_shot], capsys)
    assert code == 0, err
    assert predicted(out, weights["images"]) == above(expected, [UNSEEN[i] for i in order], 0.5)


def test_predict_prints_an_ml_decoder_s_classes_above_the_threshold(weights, capsys):
    images, expected = weights["images"], weights["reference"]["ml"]
    code, out, err = run(predict_cli.main, [*images, "--weights", weights["ml"], "--threshold", 0.6], capsys)
    assert code == 0, err
    assert predicted(out, images) == above(expected, SEEN, 0.6)
    probabilities = np.asarray(jax.nn.sigmoid(expected[0]))
    first = out.splitlines()[2].split()
    assert float(first[0].rstrip("%")) == pytest.approx(100 * probabilities.max(), abs=0.006)


def predicted(out: str, images: list) -> list[list[str]]:
    """The classes predict.py printed for each image, in its order (a line of its own when none is above)."""
    lines = out.splitlines()[1:]  # after "weights: ..."
    starts = [lines.index(f"{image}:") for image in images]
    return [[line.split()[1] for line in lines[a + 1 : b] if "no class above" not in line]
            for a, b in zip(starts, [*starts[1:], len(lines)], strict=True)]  # fmt: skip


def above(logits: np.ndarray, names: list[str], threshold: float) -> list[list[str]]:
    """The names of each row's classes whose sigmoid is above ``threshold``, most probable first."""
    probabilities = np.asarray(jax.nn.sigmoid(logits))
    return [[names[i] for i in np.argsort(-p, kind="stable") if p[i] > threshold] for p in probabilities]


def _write(root, case):
    """The --classes and --class-embeddings files of a bad-input case."""
    names, vectors = root / "names.txt", root / "vectors.npy"
    names.write_text("".join(f"{name}\n" for name in UNSEEN))
    rng = np.random.default_rng(0)
    if case == "pickled":  # an object array: loading it would unpickle, which would run this
        np.save(vectors, np.array([Unpickled(root / "unpickled"), 1.0], dtype=object), allow_pickle=True)
    elif case == "npz":
        with open(vectors, "wb") as f:  # an .npz archive under the .npy name
            np.savez(f, vectors=rng.normal(size=(4, WORD_DIM)))
    elif case == "text":
        vectors.write_text("0.1 0.2 0.3\n")
    else:
        shape, dtype = {"width": ((4, 299), np.float32), "count": ((3, WORD_DIM), np.float32),
                        "integers": ((4, WORD_DIM), np.int64), "1-D": ((WORD_DIM,), np.float32)}.get(
            case, ((4, WORD_DIM), np.float32))  # fmt: skip
        np.save(vectors, rng.normal(size=shape).astype(dtype))
    return ["--classes", names, "--class-embeddings", vectors]


class Unpickled:
    """Leaves a file behind when unpickled."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize("command", ["eval", "predict"])
@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no embeddings", "are a zero-shot ML-Decoder, which scores the classes it is given: pass their word vectors"),
        ("fixed queries", "--class-embeddings are the input of a zero-shot ML-Decoder; these weights (tresnet_tiny, "
                          "ML-Decoder (K 3) head, 7 classes) score their own"),
        ("width", f"vectors.npy: shape (4, 299); expected (classes, {WORD_DIM}): a {WORD_DIM}-wide word vector a"),
        ("1-D", f"vectors.npy: shape ({WORD_DIM},); expected (classes, {WORD_DIM})"),
        ("count", "vectors.npy: 3 word vectors for the 4 classes of "),
        ("integers", "vectors.npy: int64 values; expected floating-point word vectors"),
        ("pickled", "vectors.npy: not a NumPy .npy array of word vectors (Object arrays cannot be loaded when "
                    "allow_pickle=False)"),
        ("npz", "vectors.npy: an .npz archive; expected one .npy array of shape (classes, 300)"),
        ("text", "vectors.npy: not a NumPy .npy array of word vectors ("),
    ],
)  # fmt: skip
def test_bad_zero_shot_input_is_one_line_before_anything_is_compiled_or_written(
    command, case, message, weights, tmp_path, capsys
):
    bad = tmp_path / "bad"
    bad.mkdir()
    given = [] if case == "no embeddings" else _write(bad, case)
    which = weights["ml"] if case == "fixed queries" else weights["zsl"]
    outputs = [tmp_path / "results.json", tmp_path / "logits.npz"]
    if command == "eval":
        args = ["--weights", which, "--val-labels", weights["root"] / "unseen.csv", *given, "--no-progress",
                "--output", outputs[0], "--save-logits", outputs[1]]  # fmt: skip
    else:
        args = [weights["images"][0], "--weights", which, *given]
    _jax_work.clear()
    code, _, err = run(eval_cli.main if command == "eval" else predict_cli.main, args, capsys)
    assert code == 1
    assert err.strip().count("\n") == 0, err
    assert err.startswith("error: ")
    assert message in err
    assert _jax_work == []  # nothing traced, compiled or read from the compilation cache
    assert not any(path.exists() for path in outputs)
    assert not (bad / "unpickled").exists()


@pytest.mark.parametrize(
    ("command", "flags", "message"),
    [
        ("eval", ["--class-embeddings", "v.npy"], "--class-embeddings needs --classes: the names of its rows"),
        ("eval", ["--classes", "c.txt"], "--classes goes with --val-labels or --class-embeddings"),
        ("predict", ["--classes", "c.txt"], "--classes and --class-embeddings go together"),
    ],
)
def test_zero_shot_flags_without_their_partner_are_a_usage_error(command, flags, message, capsys):
    main = eval_cli.main if command == "eval" else predict_cli.main
    args = ["--synthetic-data", "4"] if command == "eval" else ["image.jpg"]
    with pytest.raises(SystemExit) as exit_:
        main([*args, *flags])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
