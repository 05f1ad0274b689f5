"""Variants by name and the pretrained configurations published for them, as data."""

from __future__ import annotations

import dataclasses
import difflib

from tresnet_jax.errors import InputError
from tresnet_jax.model.architecture import FC_HEAD, ML_DECODER, ArchSpec, HeadSpec
from tresnet_jax.preprocessing import Preprocessing

ARCHITECTURES: dict[str, ArchSpec] = {
    "tresnet_m": ArchSpec(layers=(3, 4, 11, 3), width_factor=1.0),
    "tresnet_l": ArchSpec(layers=(4, 5, 18, 3), width_factor=1.2),
    "tresnet_xl": ArchSpec(layers=(4, 5, 24, 3), width_factor=1.3),
    # The ImageNet-21K repository's TResNet-L (timm's name): v2 topology, v1 slopes.
    "tresnet_v2_l": ArchSpec(layers=(3, 4, 23, 3), width_factor=1.0, v2=True),
    # The official repository's TResNet-L-V2: the same tensors, LeakyReLU slope 1e-6 everywhere.
    "tresnet_l_v2": ArchSpec(layers=(3, 4, 23, 3), width_factor=1.0, v2=True, stem_slope=1e-6, block_slope=1e-6),
    # ML-Decoder's TResNet-XL (Alibaba-MIIL/ML_Decoder, src_files/models/tresnet/tresnet.py): the
    # v2 topology at width 1.0 with [3, 8, 34, 5] blocks, 2048 features; in no other library.
    "tresnet_v2_xl": ArchSpec(layers=(3, 8, 34, 5), width_factor=1.0, v2=True),
}


@dataclasses.dataclass(frozen=True)
class PretrainedConfig:
    """How a set of published weights was trained and evaluated, and what it scored."""

    tag: str
    preprocessing: Preprocessing = dataclasses.field(default_factory=Preprocessing)
    num_classes: int = 1000
    top1: float | None = None  # ImageNet-1k validation as timm reports it (else on ``dataset``)
    top5: float | None = None
    imagenet_v2_top1: float | None = None
    source: str = "timm"  # timm: on the Hugging Face hub; official, asl: a file from the authors
    multi_label: bool = False  # one sigmoid per class (ASL), not a softmax over classes
    mean_ap: float | None = None  # mAP (percent) the authors report, on ``dataset``
    dataset: str | None = None  # the TFDS name of the set mean_ap was measured on (coco/2014)
    file: str | None = None  # the published file, for weights that are not on the hub
    head: HeadSpec = FC_HEAD  # the classifier the weights carry

    @property
    def architecture(self) -> str:
        return self.tag.split(".")[0]

    @property
    def on_hub(self) -> bool:
        """Whether the weights are on the Hugging Face hub (``timm/<tag>``)."""
        return self.source == "timm"


def _multi_label(
    tag: str, size: int, classes: int, mean_ap: float, dataset: str, file: str, head: HeadSpec = FC_HEAD
) -> PretrainedConfig:
    """A published multi-label model, squished to ``size`` (its validate.py's
    ``Resize((size, size))``): ASL's with the fc head, ML-Decoder's with its own."""
    return PretrainedConfig(
        tag,
        Preprocessing(size, crop_pct=1.0, squish=True),
        num_classes=classes,
        source="asl" if head == FC_HEAD else "ml_decoder",
        multi_label=True,
        mean_ap=mean_ap,
        dataset=dataset,
        file=file,
        head=head,
    )


AT_448 = Preprocessing(448)
COCO = "coco/2014"
K80 = HeadSpec(ML_DECODER, num_groups=80)  # ML-Decoder's COCO models: a query per class
# Tags in timm's order (the first tag of an architecture is its default weights), then the
# weights published as files only.
PRETRAINED: dict[str, PretrainedConfig] = {
    cfg.tag: cfg
    for cfg in (
        PretrainedConfig("tresnet_m.miil_in21k_ft_in1k", top1=83.090, top5=96.112, imagenet_v2_top1=72.15),
        PretrainedConfig("tresnet_m.miil_in21k", num_classes=11221),
        PretrainedConfig("tresnet_m.miil_in1k", top1=80.816, top5=94.862, imagenet_v2_top1=69.68),
        PretrainedConfig("tresnet_l.miil_in1k", top1=81.498, top5=95.652, imagenet_v2_top1=70.67),
        PretrainedConfig("tresnet_xl.miil_in1k", top1=82.060, top5=95.932, imagenet_v2_top1=71.46),
        PretrainedConfig("tresnet_m.miil_in1k_448", AT_448, top1=81.710, top5=95.562, imagenet_v2_top1=70.78),
        PretrainedConfig("tresnet_l.miil_in1k_448", AT_448, top1=82.278, top5=95.988, imagenet_v2_top1=71.48),
        PretrainedConfig("tresnet_xl.miil_in1k_448", AT_448, top1=83.066, top5=96.180, imagenet_v2_top1=72.20),
        PretrainedConfig("tresnet_v2_l.miil_in21k_ft_in1k", top1=83.910, top5=96.492, imagenet_v2_top1=73.45),
        PretrainedConfig("tresnet_v2_l.miil_in21k", num_classes=11221),
        # The official repository's only published TResNet-L-V2 weights: Stanford Cars.
        PretrainedConfig("tresnet_l_v2.stanford_cars", Preprocessing(368), num_classes=196, source="official"),
        # ASL's multi-label models (Alibaba-MIIL/ASL, MODEL_ZOO.md; not on the hub): official
        # layout, 80 MS-COCO or 20 Pascal VOC classes, evaluated squished to the input size; the
        # mAP the authors report on COCO 2014 validation and VOC 2007 test.
        _multi_label("tresnet_m.asl_coco_224", 224, 80, 81.8, "coco/2014", "MS_COCO_TRresNet_M_224_81.8.pth"),
        _multi_label("tresnet_l.asl_coco_448", 448, 80, 86.6, "coco/2014", "MS_COCO_TRresNet_L_448_86.6.pth"),
        _multi_label("tresnet_xl.asl_coco_640", 640, 80, 88.4, "coco/2014", "MS_COCO_TResNet_xl_640_88.4.pth"),
        _multi_label("tresnet_xl.asl_voc_448", 448, 20, 96.0, "voc/2007", "PASCAL_VOC_TResNet_xl_448_96.0.pth"),
        # ML-Decoder's models (Alibaba-MIIL/ML_Decoder, MODEL_ZOO.md; not on the hub): official
        # layout, evaluated squished to the input size without normalisation (its validate.py);
        # K from the tensors (COCO: 80 queries; OpenImages: 200 groups of g = 49). The L and XL
        # are the all-Bottleneck v2 topology: tresnet_v2_l and tresnet_v2_xl here.
        _multi_label("tresnet_m.ml_decoder_coco_224", 224, 80, 84.2, COCO, "tresnet_m_COCO_224_84_2.pth", K80),
        _multi_label("tresnet_v2_l.ml_decoder_coco_448", 448, 80, 90.1, COCO, "tresnet_l_COCO__448_90_0.pth", K80),
        _multi_label("tresnet_v2_xl.ml_decoder_coco_640", 640, 80, 91.4, COCO, "tresnet_xl_COCO_640_91_4.pth", K80),
        _multi_label(
            "tresnet_m.ml_decoder_openimages_224",
            224,
            9605,
            86.8,
            "open_images_v6",
            "tresnet_m_open_images_200_groups_86_8.pth",
            HeadSpec(ML_DECODER, num_groups=200),
        ),
        # Single-label: 196 Stanford Cars classes, top-1 on its test split.
        PretrainedConfig(
            "tresnet_v2_l.ml_decoder_stanford_cars_384",
            Preprocessing(384, crop_pct=1.0, squish=True),
            num_classes=196,
            top1=96.41,
            source="ml_decoder",
            dataset="cars196",
            file="tresnet_l_stanford_card_96.41.pth",
            head=HeadSpec(ML_DECODER),
        ),
    )
}

UNTAGGED = "untagged"  # the tag of a configuration no published weights have: tresnet_m.untagged
# Where the weights that are not on the hub are published, by source: (words, address).
DOWNLOAD_PAGES = {
    "official": ("the official TResNet model zoo", "https://github.com/Alibaba-MIIL/TResNet/blob/master/MODEL_ZOO.md"),
    "asl": ("ASL's model zoo", "https://github.com/Alibaba-MIIL/ASL/blob/main/MODEL_ZOO.md"),
    "ml_decoder": ("ML-Decoder's model zoo", "https://github.com/Alibaba-MIIL/ML_Decoder/blob/main/MODEL_ZOO.md"),
}


def list_models() -> list[str]:
    """Names of the architectures."""
    return list(ARCHITECTURES)


def closest(name: str, known: list[str], count: int = 5) -> str:
    """The known names most like ``name``, most alike first, for "unknown ..." messages."""
    return ", ".join(difflib.get_close_matches(name, known, n=count, cutoff=0.0))


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A model name looked up in the tables once, where it enters (a command line's ``--model``,
    a weights directory's metadata, a checkpoint's tensors), and handed down from there: the
    architecture's name and numbers and the configuration (tag, preprocessing, classes)."""

    name: str  # the architecture, as weights metadata records it: tresnet_m
    arch: ArchSpec
    config: PretrainedConfig  # a published tag's, or an untagged one (source "none")

    @property
    def tag(self) -> str | None:
        """The published tag, None for weights that are not (or no longer) a published set."""
        return None if self.config.source == "none" else self.config.tag


def resolve(name: str, num_classes: int | None = None) -> ModelSpec:
    """An architecture (``tresnet_m``) or pretrained tag (``tresnet_m.miil_in1k``) with its
    configuration: a tag's own; for an architecture its first single-label tag with ``num_classes``
    classes, else a generic untagged 224/0.875/bilinear one. InputError naming the closest known names."""
    architecture = name.split(".")[0]
    if architecture not in ARCHITECTURES or ("." in name and name not in PRETRAINED):
        raise InputError(f"unknown model {name!r}; closest known: {closest(name, [*ARCHITECTURES, *PRETRAINED])}")
    arch = ARCHITECTURES[architecture]
    if name in PRETRAINED:
        return ModelSpec(architecture, arch, PRETRAINED[name])
    for cfg in PRETRAINED.values():
        plain = not cfg.multi_label and cfg.head == FC_HEAD
        if cfg.architecture == name and num_classes in (None, cfg.num_classes) and plain:
            return ModelSpec(architecture, arch, cfg)
    classes = 1000 if num_classes is None else num_classes
    return ModelSpec(architecture, arch, PretrainedConfig(f"{name}.{UNTAGGED}", num_classes=classes, source="none"))


def default_tag(architecture: str) -> str | None:
    """timm's default weights of an architecture: its first tag on the hub (None: none there)."""
    return next((c.tag for c in PRETRAINED.values() if c.architecture == architecture and c.source == "timm"), None)


def default_config(name: str, num_classes: int | None = None) -> PretrainedConfig:
    """The pretrained configuration of a tag, or of an architecture's first tag with
    ``num_classes`` classes; a generic 224/0.875/bilinear one when none is published."""
    return resolve(name, num_classes).config
