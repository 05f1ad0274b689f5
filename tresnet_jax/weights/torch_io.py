"""Reading and writing PyTorch checkpoint files (``.pth``/``.pt``/``.bin`` pickles and
``.safetensors``) as ``{key: numpy array}`` dicts.

``.safetensors`` files (the Hugging Face hub's) are read with safetensors' NumPy API, so getting
pretrained weights needs no PyTorch; PyTorch is imported only for pickles. A checkpoint is
untrusted: pickles are read with ``torch.load(weights_only=True)``, which refuses any object
that would import code, so a malicious file is rejected, never executed.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tresnet_jax.errors import InputError
from tresnet_jax.weights.storage import check_output_file, write_file_atomically
from tresnet_jax.weights.torch_layout import CLASS_NAMES_ENTRY, checkpoint_class_names, unwrap_state_dict

SAFETENSORS_SUFFIX = ".safetensors"


@dataclasses.dataclass
class Checkpoint:
    """What a checkpoint file holds: its state_dict and, when it names them (ASL's
    ``idx_to_class``), its class names in class order."""

    state_dict: dict[str, np.ndarray]
    class_names: list[str] | None = None


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The state_dict of a checkpoint file as float32 numpy arrays (integer buffers such as
    ``num_batches_tracked`` keep their type). Raises InputError on anything unusable."""
    return read_checkpoint(path).state_dict


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """``read_state_dict``'s state_dict, and the class names stored beside it (checked: indices
    0 .. n-1, names strings; a safetensors file has none)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, not a checkpoint file")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: not readable (permission denied)")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: empty file")
    safetensors = path.suffix == SAFETENSORS_SUFFIX
    loaded = _read_safetensors(path) if safetensors else _read_pickle(path)
    try:
        state_dict = unwrap_state_dict(loaded)
        class_names = checkpoint_class_names(loaded)
    except InputError as err:
        raise InputError(f"{path}: {err}") from None
    if safetensors:
        return Checkpoint({key: _float32(value) for key, value in state_dict.items()})
    return Checkpoint({key: _torch_to_numpy(key, value, path) for key, value in state_dict.items()}, class_names)


def _read_pickle(path: Path) -> object:
    import pickle
    import warnings

    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. about the pickle protocol: the error says enough
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        found = re.search(r"GLOBAL (\S+)", text)
        if found:
            raise InputError(
                f"{path}: refused: the pickle would import {found.group(1)} (possible code execution); "
                "only tensors and plain containers are loaded"
            ) from None
        if "Weights only load failed" in text:
            detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
            reason = detail.group(1).strip() if detail else "it holds more than tensors and plain containers"
            raise InputError(f"{path}: refused by the safe (weights-only) loader: {reason}") from None
        raise InputError(f"{path}: not a PyTorch checkpoint ({_first_line(err)})") from None
    except RuntimeError as err:
        raise InputError(f"{path}: truncated or corrupt checkpoint ({_first_line(err)})") from None
    except Exception as err:  # noqa: BLE001 - any failure to parse untrusted bytes is bad input
        raise InputError(f"{path}: not a PyTorch checkpoint ({type(err).__name__}: {_first_line(err)})") from None


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except KeyError as err:  # a dtype NumPy has no type for (bfloat16, float8)
        raise InputError(f"{path}: holds tensors of type {err}, which this reader does not take") from None
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise InputError(f"{path}: truncated or corrupt safetensors file ({_first_line(err)})") from None


def _float32(value: np.ndarray) -> np.ndarray:
    return value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value


def _torch_to_numpy(key: str, value: object, path: Path) -> np.ndarray:
    import torch

    if not isinstance(value, torch.Tensor):
        raise InputError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
    value = value.detach().cpu()
    if value.is_floating_point():
        value = value.to(torch.float32)
    return value.numpy()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


TORCH_SAVE_SUFFIXES = (".pth", ".pt", ".bin")


def write_official_checkpoint(
    path: str | os.PathLike, state_dict: dict[str, np.ndarray], class_names: Sequence[str] | None, force: bool = False
) -> None:
    """Save as the authors' code saves (ASL, ML-Decoder): ``torch.save({"model": state_dict,
    "idx_to_class": {0: name, ...}})``, the class names left out when there are none; a
    ``.pth``/``.pt``/``.bin`` file (safetensors holds tensors only). Written as
    ``write_state_dict`` writes."""
    import torch

    path = Path(path)
    if path.suffix not in TORCH_SAVE_SUFFIXES:
        raise InputError(
            f"{path}: the official layout is a torch.save file of the state_dict and its class names; "
            f"name a {'/'.join(TORCH_SAVE_SUFFIXES)} file"
        )
    path = check_output_file(path, force)
    checkpoint: dict[str, object] = {"model": _tensors(state_dict)}
    if class_names is not None:
        checkpoint[CLASS_NAMES_ENTRY] = dict(enumerate(class_names))
    write_file_atomically(path, lambda tmp: torch.save(checkpoint, tmp))


def _tensors(state_dict: dict[str, np.ndarray]) -> dict[str, object]:
    """PyTorch tensors of copies (a numpy view of a JAX array is read-only, which torch warns of)."""
    import torch

    return {k: torch.from_numpy(np.array(v, order="C")) for k, v in state_dict.items()}


def write_state_dict(path: str | os.PathLike, state_dict: dict[str, np.ndarray], force: bool = False) -> None:
    """Save a state_dict as ``.safetensors`` or, for any other suffix, ``torch.save`` format.

    Written to a temporary file beside the target and renamed into place, so a failure never
    leaves a half-written file; an existing file is replaced only with ``force``.
    """
    import torch

    path = check_output_file(path, force)
    tensors = _tensors(state_dict)
    if path.suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import save_file

        write_file_atomically(path, lambda tmp: save_file(tensors, tmp))
    else:
        write_file_atomically(path, lambda tmp: torch.save(tensors, tmp))
