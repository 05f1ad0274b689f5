"""Pretrained weights from the Hugging Face hub: the one live source of the published TResNet
weights (``timm/<tag>``: ``model.safetensors`` + ``config.json``).

A repository's checkpoint is downloaded with ``huggingface_hub`` (which honours
``HF_HUB_OFFLINE``, ``HF_HUB_CACHE``, ``HF_HOME``, ``HF_ENDPOINT`` and tokens), converted in
memory without PyTorch and stored as a weights directory under ``weights_root()/<tag>``, so
the next call is a local read even when the hub cache is gone.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from tresnet_jax.errors import InputError
from tresnet_jax.model.registry import ARCHITECTURES, PRETRAINED, ModelSpec, resolve
from tresnet_jax.weights.info import WeightsInfo

log = logging.getLogger(__name__)

HUB_PREFIX = "hf-hub:"
TIMM_ORG = "timm"
CHECKPOINT_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
_TRUE = ("1", "on", "true", "yes")


@dataclasses.dataclass(frozen=True)
class HubRepo:
    """A hub model repository, optionally at a revision (branch, tag or commit)."""

    repo_id: str
    revision: str | None = None

    @classmethod
    def parse(cls, text: str) -> HubRepo:
        """From ``hf-hub:owner/name[@revision]`` (the prefix is optional)."""
        spec = text.removeprefix(HUB_PREFIX)
        repo_id, _, revision = spec.partition("@")
        owner, _, name = repo_id.partition("/")
        if not owner or not name or "/" in name:
            raise InputError(f"{text!r}: not a hub repository; expected {HUB_PREFIX}OWNER/NAME[@REVISION]")
        return cls(repo_id, revision or None)

    @classmethod
    def of_tag(cls, tag: str) -> HubRepo:
        return cls(f"{TIMM_ORG}/{tag}")

    @property
    def tag(self) -> str | None:
        """The published tag this repository holds (timm's repositories only)."""
        owner, name = self.repo_id.split("/")
        return name if owner == TIMM_ORG and name in PRETRAINED and PRETRAINED[name].on_hub else None

    @property
    def storage_name(self) -> str:
        """The name its converted weights are kept under in the weights root."""
        name = self.tag or self.repo_id.replace("/", "--")
        return name if self.revision is None else f"{name}@{self.revision}"

    @property
    def directory(self) -> Path:
        """Where its converted weights are kept: ``weights_root()/<storage_name>``."""
        from tresnet_jax.weights.storage import weights_root

        return weights_root() / self.storage_name

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


@dataclasses.dataclass(frozen=True)
class Fetched:
    """A downloaded checkpoint: its local file, the resolved commit and timm's config, if any."""

    checkpoint: Path
    revision: str
    config: dict[str, Any]


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in _TRUE


def _download(repo: HubRepo, filename: str, offline: bool) -> Path:
    from huggingface_hub import errors, hf_hub_download

    try:
        return Path(
            hf_hub_download(
                repo.repo_id,
                filename,
                revision=repo.revision,
                cache_dir=os.environ.get("HF_HUB_CACHE") or None,
                local_files_only=offline,
                library_name="tresnet-jax",
            )
        )
    except errors.LocalEntryNotFoundError:
        how = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
        raise InputError(
            f"{repo}: {filename} is not in the Hugging Face cache and {how}; fetch it on a connected machine "
            f"with `hf download {repo.repo_id} {filename} config.json` (same HF_HUB_CACHE/HF_HOME), "
            "or unset HF_HUB_OFFLINE"
        ) from None
    except errors.GatedRepoError:
        raise InputError(f"{repo}: gated repository; accept its terms on the hub and set HF_TOKEN") from None
    except errors.RepositoryNotFoundError:
        raise InputError(f"{repo}: no such repository on the hub (or private: set HF_TOKEN)") from None
    except errors.RevisionNotFoundError:
        raise InputError(f"{repo}: no revision {repo.revision!r}") from None
    except errors.EntryNotFoundError:
        raise InputError(f"{repo}: has no {filename}") from None
    except errors.HfHubHTTPError as err:
        raise InputError(f"{repo}: hub request failed ({str(err).splitlines()[0]})") from None


def fetch(repo: HubRepo) -> Fetched:
    """Download (or find in the hub cache) a repository's ``model.safetensors`` and
    ``config.json``; InputError with one line saying what to do when that is impossible."""
    offline = _offline()
    checkpoint = _download(repo, CHECKPOINT_FILE, offline)
    config: dict[str, Any] = {}
    try:
        config_path = _download(repo, CONFIG_FILE, offline)
    except InputError:
        log.info("%s: no %s; the architecture is inferred from the tensors", repo, CONFIG_FILE)
    else:
        try:
            loaded = json.loads(config_path.read_text())
        except (OSError, ValueError) as err:
            raise InputError(f"{repo}: unreadable {CONFIG_FILE} ({err})") from None
        if not isinstance(loaded, dict):
            raise InputError(f"{repo}: {CONFIG_FILE} is not a JSON object")
        config = loaded
    # The cache keeps files under snapshots/<commit>/: the revision actually read.
    return Fetched(checkpoint, checkpoint.parent.name, config)


def convert_fetched(
    repo: HubRepo,
    fetched: Fetched,
    model: ModelSpec | None = None,
    num_classes: int | None = None,
    tag: str | None = None,
) -> tuple[Any, WeightsInfo]:
    """(Converted variables, what they are) of a fetched checkpoint, in memory and without
    PyTorch; the tag is the repository's unless ``tag`` is given, the architecture config.json's."""
    from tresnet_jax.weights.conversion import convert_checkpoint
    from tresnet_jax.weights.torch_io import read_state_dict

    if model is None and fetched.config.get("architecture") in ARCHITECTURES:
        model = resolve(fetched.config["architecture"])
    try:
        converted, info = convert_checkpoint(
            read_state_dict(fetched.checkpoint), fetched.checkpoint, model, num_classes, tag or repo.tag
        )
    except InputError as err:
        raise InputError(f"{repo}: {err}") from None
    info = info.replace(source=dataclasses.replace(info.source, repo=repo.repo_id, revision=fetched.revision))
    if info.tag is None:
        info = info.replace(preprocessing=info.preprocessing.replace(**_config_preprocessing(repo, fetched.config)))
    return converted, info


def _config_preprocessing(repo: HubRepo, config: dict[str, Any]) -> dict[str, Any]:
    """Input size, crop and interpolation from timm's ``pretrained_cfg`` in ``config.json``."""
    cfg = config.get("pretrained_cfg")
    if not isinstance(cfg, dict):
        return {}
    out: dict[str, Any] = {}
    size = cfg.get("input_size")
    if isinstance(size, list) and len(size) == 3 and all(isinstance(v, int) and v > 0 for v in size):
        if size[1] != size[2]:
            raise InputError(f"{repo}: {CONFIG_FILE} input_size {size} is not square")
        out["input_size"] = size[1]
    if isinstance(cfg.get("crop_pct"), (int, float)) and 0 < cfg["crop_pct"] <= 1:
        out["crop_pct"] = float(cfg["crop_pct"])
    if cfg.get("interpolation") in ("bilinear", "bicubic", "nearest"):
        out["interpolation"] = cfg["interpolation"]
    return out


def pretrained_directory(repo: HubRepo) -> Path:
    """The weights directory of a hub repository: the stored one, or fetched, converted and
    stored now (atomically: a failure leaves nothing)."""
    from tresnet_jax.weights.storage import METADATA_FILE, save_weights

    directory = repo.directory
    if (directory / METADATA_FILE).is_file():
        return directory
    log.info("fetching %s from the Hugging Face hub", repo)
    fetched = fetch(repo)
    converted, info = convert_fetched(repo, fetched)
    written = save_weights(directory, converted.variables, info)
    log.info("converted %s (revision %s) to %s", repo, fetched.revision[:12], written)
    return written
