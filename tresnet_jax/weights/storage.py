"""Where converted (or trained) weights live and how they are written and read.

A weights directory holds ``variables/`` (an Orbax checkpoint of ``{params, batch_stats}``)
and ``metadata.json`` (``weights.info.WeightsInfo``: model, classes, preprocessing, source).
Converted weights go to
``$TRESNET_JAX_WEIGHTS/<name>`` (default ``~/.cache/tresnet_jax/weights/<name>``, following
``$XDG_CACHE_HOME``), so they can be found by name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from flax import traverse_util

from tresnet_jax.errors import InputError
from tresnet_jax.weights.info import WeightsInfo

WEIGHTS_ENV = "TRESNET_JAX_WEIGHTS"
VARIABLES_DIR = "variables"
METADATA_FILE = "metadata.json"


def weights_root() -> Path:
    """The directory that holds converted weights by name."""
    if os.environ.get(WEIGHTS_ENV):
        return Path(os.environ[WEIGHTS_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "tresnet_jax" / "weights"


def find(name_or_path: str | os.PathLike) -> Path | None:
    """A weights directory at a path, or stored under ``weights_root()`` by that name; None."""
    path = Path(name_or_path).expanduser()
    if (path / METADATA_FILE).is_file():
        return path
    named = weights_root() / str(name_or_path)
    if os.sep not in str(name_or_path) and (named / METADATA_FILE).is_file():
        return named
    return None


def stored_names() -> list[str]:
    """Names of the weights directories under ``weights_root()``."""
    return sorted(p.parent.name for p in weights_root().glob(f"*/{METADATA_FILE}"))


def save_weights(
    directory: str | os.PathLike, variables: dict[str, Any], info: WeightsInfo, force: bool = False
) -> Path:
    """Write variables and what they are (``metadata.json``) to ``directory`` atomically.

    Everything is written into a temporary sibling directory that is renamed into place at the
    end: an interrupted or failed write leaves nothing behind, and an existing directory is
    replaced (only with ``force``) in one rename.
    """
    target = Path(directory).expanduser().absolute()
    check_writable(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    old = None
    try:
        tree = jax_tree_to_numpy(variables)
        with this_process_checkpointer() as checkpointer:
            checkpointer.save(tmp / VARIABLES_DIR, tree)
        (tmp / METADATA_FILE).write_text(json.dumps(info.to_json(), indent=2, sort_keys=True) + "\n")
        if target.exists():
            old = target.parent / f".{target.name}.old-{tmp.name.rsplit('-', 1)[-1]}"
            target.rename(old)
        tmp.rename(target)
    except BaseException:
        if old is not None and not target.exists():
            old.rename(target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def write_file_atomically(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(tmp)`` a temporary file beside ``path``, then rename it into place: readers see
    the old file or the new one, never a half-written one; a failure leaves no temporary."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.absolute().parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # what open() would give: mkstemp's 0600 hides it from other users
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_file(path: str | os.PathLike, force: bool) -> Path:
    """Refuse, before any work, an output file that would clobber one or cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a directory")
    if path.exists() and not force:
        raise InputError(f"{path}: exists; pass --force to replace it")
    if not path.absolute().parent.is_dir():
        raise InputError(f"{path.parent}: no such directory")
    return path


def this_process_checkpointer():
    """An Orbax checkpointer for host (numpy) trees that involves no other process: in a
    multi-host job only one process writes an export, and the others must not be waited for."""
    import jax
    import orbax.checkpoint as ocp

    me = jax.process_index()
    return ocp.StandardCheckpointer(
        multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    )


def check_writable(target: Path, force: bool) -> None:
    """Fail early, before any work, when ``target`` would be clobbered or cannot be made."""
    if target.exists() and not force:
        raise InputError(f"{target}: exists; pass --force to replace it")
    if target.exists() and not (target / METADATA_FILE).is_file():
        raise InputError(f"{target}: exists and is not a weights directory; refusing to replace it")
    parent = next((p for p in [target.parent, *target.parent.parents] if p.exists()), None)
    if parent is None or not os.access(parent, os.W_OK):
        raise InputError(f"{target.parent}: cannot create or write to this directory")


def jax_tree_to_numpy(variables: dict[str, Any]) -> dict[str, Any]:
    """Host float32 numpy copies of ``{params, batch_stats}``."""
    flat = traverse_util.flatten_dict(dict(variables))
    return traverse_util.unflatten_dict({k: np.asarray(v, np.float32) for k, v in flat.items()})


def read_info(directory: Path) -> WeightsInfo:
    """What the weights in ``directory`` are: its ``metadata.json``, of any version."""
    path = directory / METADATA_FILE
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: unreadable metadata ({err})") from None
    if not isinstance(document, dict):
        raise InputError(f"{path}: not a JSON object")
    return WeightsInfo.from_json(document, str(path))


def read_variables(directory: Path) -> dict[str, Any]:
    """The ``{params, batch_stats}`` numpy tree stored in a weights directory."""
    try:
        with this_process_checkpointer() as checkpointer:
            return checkpointer.restore((directory / VARIABLES_DIR).absolute())
    except Exception as err:  # noqa: BLE001 - orbax raises many types for damaged checkpoints
        raise InputError(f"{directory / VARIABLES_DIR}: unreadable checkpoint ({type(err).__name__}: {err})") from None
