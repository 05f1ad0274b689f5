"""What a set of weights is: ``WeightsInfo``, the typed record every weights directory keeps as
``metadata.json``. It is made by whoever makes weights (the converter, the hub, train.py's
export), returned with them by ``tresnet_jax.load``, and read by every tool that uses them; each
default lives here. ``from_json`` reads every ``metadata.json`` written so far (format 1: before
this record; minimal ones that name only the model and its classes)."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

from tresnet_jax.errors import InputError
from tresnet_jax.model.architecture import FC_HEAD, ArchSpec, HeadSpec
from tresnet_jax.model.registry import ARCHITECTURES, PRETRAINED, PretrainedConfig
from tresnet_jax.preprocessing import Preprocessing

FORMAT_VERSION = 3  # 1: before WeightsInfo (the same keys, looser); 2: head a name ("fc")


@dataclasses.dataclass(frozen=True)
class Source:
    """Where the weights came from: a converted checkpoint (and the hub repository it was read
    from), or a training run (its workdir, step, whether they are the EMA, its validation)."""

    file: str | None = None
    sha256: str | None = None
    layout: str | None = None  # official | timm
    num_classes: int | None = None  # the checkpoint's classes, before any new head
    repo: str | None = None
    revision: str | None = None  # the hub commit read
    trained_in: str | None = None
    step: int | None = None
    ema: bool | None = None
    validation: dict[str, float | None] | None = None  # the run's last validation: top1 or mAP


@dataclasses.dataclass(frozen=True)
class Reported:
    """What the weights' authors report: top-1/top-5 (ImageNet's, timm's figures, when no
    ``dataset`` is named) or the mAP of a multi-label model on ``dataset`` (a TFDS name)."""

    top1: float | None = None
    top5: float | None = None
    imagenet_v2_top1: float | None = None
    mAP: float | None = None  # the name metadata.json has always used
    dataset: str | None = None

    @classmethod
    def of(cls, cfg: PretrainedConfig) -> Reported:
        """The reported figures of a published configuration."""
        if cfg.multi_label:
            return cls(mAP=cfg.mean_ap, dataset=cfg.dataset)
        return cls(cfg.top1, cfg.top5, cfg.imagenet_v2_top1, dataset=cfg.dataset)


@dataclasses.dataclass(frozen=True)
class WeightsInfo:
    """The architecture, head, classes (count, names, one or several an image), preprocessing,
    published tag, source and reported figures of a set of weights."""

    model: str  # the architecture: tresnet_m
    num_classes: int  # 0: no head, the model outputs pooled features
    head: HeadSpec = FC_HEAD  # the classifier: fc, or ML-Decoder with its groups
    multi_label: bool = False  # a sigmoid per class (ASL), not a softmax over the classes
    class_names: tuple[str, ...] | None = None
    preprocessing: Preprocessing = dataclasses.field(default_factory=Preprocessing)
    tag: str | None = None  # the published weights these are (None: converted untagged, trained, fresh)
    source: Source = dataclasses.field(default_factory=Source)
    reported: Reported | None = None
    notes: tuple[str, ...] = ()
    created: str | None = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.model not in ARCHITECTURES:
            raise InputError(f"unknown model {self.model!r}; known: {', '.join(ARCHITECTURES)}")
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 0:
            raise InputError(f"num_classes must be a whole number >= 0, got {self.num_classes!r}")
        if not isinstance(self.head, HeadSpec):
            raise InputError(f"head must be a HeadSpec, got {self.head!r}")
        self.head.check_classes(self.num_classes)
        if self.class_names is not None:
            object.__setattr__(self, "class_names", tuple(str(name) for name in self.class_names))
            if len(self.class_names) != self.num_classes:
                raise InputError(f"{len(self.class_names)} class names for {self.num_classes} classes")
        if self.tag is not None and self.tag not in PRETRAINED:
            raise InputError(f"unknown tag {self.tag!r}")
        object.__setattr__(self, "notes", tuple(self.notes))

    @property
    def arch(self) -> ArchSpec:
        return ARCHITECTURES[self.model]

    @property
    def published(self) -> PretrainedConfig | None:
        """The published configuration of the tag, None for untagged weights."""
        return PRETRAINED[self.tag] if self.tag is not None else None

    def replace(self, **changes: Any) -> WeightsInfo:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """``metadata.json``'s content (unset source and reported entries left out)."""
        source = _set_entries(self.source)
        return {
            "format_version": FORMAT_VERSION,  # the shape written here, whatever was read
            "model": self.model,
            "num_classes": self.num_classes,
            "head": dataclasses.asdict(self.head),
            "multi_label": self.multi_label,
            "class_names": list(self.class_names) if self.class_names is not None else None,
            "preprocessing": self.preprocessing.to_json(),
            "tag": self.tag,
            "source": source,
            "reported": _set_entries(self.reported) if self.reported is not None else None,
            "notes": list(self.notes),
            "created": self.created,
        }

    @classmethod
    def from_json(cls, document: Mapping[str, Any], where: str = "metadata.json") -> WeightsInfo:
        """The record of a ``metadata.json`` of any version; InputError naming ``where``."""
        try:
            for key in ("model", "num_classes"):
                if key not in document:
                    raise InputError(f"no {key!r} entry")
            tag = document.get("tag")
            reported = _entry(document, "reported", dict, None)
            return cls(
                model=_entry(document, "model", str, None),
                num_classes=document["num_classes"],
                head=_head(document.get("head")),
                multi_label=_entry(document, "multi_label", bool, False),
                class_names=_strings(document, "class_names"),
                preprocessing=Preprocessing.from_json(_entry(document, "preprocessing", dict, {})),
                # a tag no longer published (or renamed) leaves the weights untagged
                tag=tag if isinstance(tag, str) and tag in PRETRAINED else None,
                source=_source(_entry(document, "source", dict, {})),
                reported=Reported(**_typed(Reported, reported)) if reported else None,
                notes=_strings(document, "notes") or (),
                created=_entry(document, "created", str, None),
                format_version=_entry(document, "format_version", int, 1),
            )
        except (InputError, TypeError, ValueError, AttributeError) as err:
            raise InputError(f"{where}: {err}") from None


def _head(value: Any) -> HeadSpec:
    """The head entry: a record (format 3) or a name (format 2: always "fc"); none means fc."""
    if value is None:
        return HeadSpec()
    if isinstance(value, str):
        return HeadSpec(value)
    if not isinstance(value, dict):
        raise InputError(f"head {value!r}: expected a record or a name")
    return HeadSpec(**{k: v for k, v in _typed(HeadSpec, value).items() if v is not None})


def _set_entries(record: Any) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(record).items() if v is not None}


def _entry(document: Mapping[str, Any], key: str, kind: type, default: Any) -> Any:
    """``document[key]`` if it is a ``kind`` (a missing key or null: ``default``); a bool is not
    a number here (JSON's true is not 1)."""
    value = document.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise InputError(f"{key} {value!r}: expected {kind.__name__}")
    return value


def _strings(document: Mapping[str, Any], key: str) -> tuple[str, ...] | None:
    values = _entry(document, key, list, None)
    if values is not None and not all(isinstance(v, str) for v in values):
        raise InputError(f"{key}: not all strings")
    return tuple(values) if values is not None else None


def _typed(kind: type, record: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``record`` that are fields of the dataclass ``kind``, each checked against
    the field's type (numbers, strings, true/false, tables of numbers; None for any)."""
    hints = typing.get_type_hints(kind)
    values = {}
    for name in (f.name for f in dataclasses.fields(kind)):
        value = record.get(name)
        if value is not None and not _fits(value, hints[name]):
            options = [a for a in typing.get_args(hints[name]) if a is not type(None)]
            expected = " or ".join(getattr(typing.get_origin(a) or a, "__name__", str(a)) for a in options) + " or null"
            raise InputError(f"{kind.__name__.lower()} {name} {value!r}: expected {expected}")
        values[name] = value
    return values


def _fits(value: object, hint: Any) -> bool:
    options = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    for option in options:
        origin = typing.get_origin(option) or option
        if origin is float and isinstance(value, int | float) and not isinstance(value, bool):
            return True
        if origin is dict and isinstance(value, dict):
            return all(v is None or _fits(v, float) for v in value.values())
        if origin in (int, str) and isinstance(value, origin) and not isinstance(value, bool):
            return True
        if origin is bool and isinstance(value, bool):
            return True
    return False


def _source(record: Mapping[str, Any]) -> Source:
    """A source record; a training export of format 1 kept its validation's top1 or mAP beside
    the other entries."""
    if record.get("validation") is None and ({"top1", "mAP"} & set(record)):
        record = {**record, "validation": {k: record[k] for k in ("top1", "mAP") if k in record}}
    return Source(**_typed(Source, record))
