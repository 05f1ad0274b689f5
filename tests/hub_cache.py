"""A Hugging Face hub cache laid out as huggingface_hub lays it, for offline tests:
``models--OWNER--NAME/{blobs/<sha256>, snapshots/<commit>/<file> -> blob, refs/main}``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def add_repo(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT) -> Path:
    """Put ``files`` of ``repo_id`` at ``commit`` (also ``main``) into the cache; returns the snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(Path("..", "..", "blobs", blob.name))
    return snapshot


def timm_files(state_dict: dict[str, np.ndarray], architecture: str, num_classes: int) -> dict[str, bytes]:
    """``model.safetensors`` and ``config.json`` as timm publishes them."""
    from safetensors.numpy import save

    tensors = {k: np.ascontiguousarray(v) for k, v in state_dict.items()}
    config = {
        "architecture": architecture,
        "num_classes": num_classes,
        "pretrained_cfg": {"input_size": [3, 224, 224], "crop_pct": 0.875, "interpolation": "bilinear"},
    }
    return {"model.safetensors": save(tensors), "config.json": json.dumps(config).encode()}
