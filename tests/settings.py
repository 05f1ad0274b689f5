"""A TrainConfig from settings named as the flat config.json named them (``lr``, ``mixup``,
``model``), for tests that set a few: ``config(lr=0.1, mixup=0.4)``."""

from __future__ import annotations

from typing import Any

from tresnet_jax.train.config import TrainConfig, fields, from_flat, short_name

DOTTED = {short_name(dotted): dotted for dotted, _ in fields()}


def config(**values: Any) -> TrainConfig:
    return from_flat({DOTTED[name]: value for name, value in values.items()})
