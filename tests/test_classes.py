"""Class names and kinds: ImageNet's shipped names, the one rule for the names a model's classes
are shown and recorded under, and the one check that a dataset and a model agree on one class
an image or several."""

import pytest

from tresnet_jax.data.classes import check_label_kind, class_names, imagenet_classes, imagenet_index, names_to_record
from tresnet_jax.errors import InputError


def test_imagenet_class_names_are_shipped():
    classes = imagenet_classes()
    assert len(classes) == 1000
    assert classes[0] == ("n01440764", "tench, Tinca tinca")
    assert [wnid for wnid, _ in classes] == sorted(wnid for wnid, _ in classes)
    assert imagenet_index()["n15075141"] == 999


def test_a_model_s_classes_are_named_by_its_own_names_then_the_data_s_then_imagenet_s():
    assert class_names(3, ("cat", "dog", "cow")) == ["cat", "dog", "cow"]
    assert class_names(3, ("cat", "dog")) == ["class 0", "class 1", "class 2"]  # names of another head
    assert class_names(3, None, {2: "cow", 0: "cat"}) == ["cat", "class 1", "cow"]
    imagenet = class_names(1000)
    assert (imagenet[1], imagenet[999]) == ("goldfish (n01443537)", "toilet tissue (n15075141)")


def test_a_trained_model_records_its_training_set_s_names_unless_imagenet_s_apply():
    assert names_to_record(["cat", "dog"], 2) == ["cat", "dog"]
    assert names_to_record(["cat", "dog"], 3) is None
    assert names_to_record([wnid for wnid, _ in imagenet_classes()], 1000) is None


@pytest.mark.parametrize(
    ("data_multi", "model_multi", "message"),
    [
        (False, True, "these weights are multi-label (several classes an image) but val is single-label "
                      "(one class an image): for multi-label data"),
        (True, False, "these weights are single-label (one class an image) but val is multi-label "
                      "(several classes an image): for multi-label weights"),
    ],
)  # fmt: skip
def test_a_dataset_and_a_model_of_other_kinds_are_one_line(data_multi, model_multi, message):
    remedy = {True: "for multi-label data", False: "for multi-label weights"}
    with pytest.raises(InputError) as raised:
        check_label_kind("val", data_multi, model_multi, "these weights are", remedy)
    assert str(raised.value) == message
    check_label_kind("val", model_multi, model_multi, "these weights are", remedy)  # the same kind: no error
