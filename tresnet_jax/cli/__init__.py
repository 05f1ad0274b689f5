"""The command lines (installed as ``tresnet-train``, ``tresnet-eval``, ``tresnet-predict``,
``tresnet-convert``, ``tresnet-to-torch``, ``tresnet-export-onnx``, ``tresnet-export-stablehlo``;
``train.py`` and the other scripts of a checkout run them), and what every command line shares:
one-line errors and non-zero exits for bad input, the multi-host flags, the persistent
compilation cache.

May import everything of the package: the commands stand on all of it, and nothing imports them.
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
from collections.abc import Callable, Sequence

from tresnet_jax.errors import InputError
from tresnet_jax.weights.conversion import MULTI_LABEL_HELP

EXIT_INPUT_ERROR = 1
EXIT_INTERRUPTED = 130


def add_multihost_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that join a multi-host job (one process per host, ``jax.distributed``)."""
    hosts = parser.add_argument_group(
        "multi-host (one process per host; under srun or mpirun found from the environment)"
    )
    hosts.add_argument("--coordinator", help="host:port of process 0")
    hosts.add_argument("--num-processes", type=int, help="1 alone: a single process, whatever the launcher")
    hosts.add_argument("--process-id", type=int)


def add_multi_label_argument(parser: argparse.ArgumentParser) -> None:
    """``--multi-label``: the declaration that a PyTorch file's head is multi-label, in every
    command that converts one (the converter; eval.py and predict.py convert in memory;
    train.py's is ``--init-multi-label``)."""
    parser.add_argument("--multi-label", action="store_true", help=MULTI_LABEL_HELP)


def start_run(args: argparse.Namespace, compilation_cache: bool = True) -> None:
    """Join the multi-host job (named by the flags of ``add_multihost_arguments``, or by srun's
    or mpirun's environment) and say so, then turn on the compilation cache unless disabled."""
    from tresnet_jax.runtime.parallel import initialize_distributed

    joined = initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    if joined is not None:
        print(joined, flush=True)
    if compilation_cache:
        enable_compilation_cache()


def command(main: Callable[[Sequence[str] | None], int]) -> Callable[[Sequence[str] | None], int]:
    """Wrap a CLI's ``main(argv) -> exit code``: bad input and operating-system failures (disk
    full, permissions) print ``error: <reason>`` on one line and return 1, Ctrl-C returns 130;
    other exceptions are bugs and keep their traceback."""

    @functools.wraps(main)
    def wrapped(argv: Sequence[str] | None = None) -> int:
        show_library_messages()
        try:
            return main(argv)
        except (InputError, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_INPUT_ERROR
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED

    return wrapped


class _PrintHandler(logging.Handler):
    """Prints records to whatever ``sys.stdout`` is at the time (a stream kept from the start
    would outlive a redirection, e.g. a notebook cell's or a test's capture)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), flush=True)


def show_library_messages() -> None:
    """Print the library's informational messages (what is fetched from the hub, where it goes)."""
    logger = logging.getLogger("tresnet_jax")
    if not any(isinstance(h, _PrintHandler) for h in logger.handlers):
        logger.addHandler(_PrintHandler())
        logger.setLevel(logging.INFO)


COMPILATION_CACHE_ENV = "TRESNET_JAX_COMPILATION_CACHE"


def enable_compilation_cache() -> str | None:
    """Turn on JAX's persistent compilation cache, so a second start of the same program loads
    its compiled executables instead of compiling again.

    Location: ``$TRESNET_JAX_COMPILATION_CACHE``, else ``$JAX_COMPILATION_CACHE_DIR``, else
    ``~/.cache/tresnet_jax/jax_cache`` (following ``$XDG_CACHE_HOME``); the value ``off``
    disables it. Returns the directory used, or None.
    """
    import os
    from pathlib import Path

    import jax

    location = os.environ.get(COMPILATION_CACHE_ENV) or os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if location == "off":
        return None
    if not location:
        cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        location = str(Path(cache).expanduser() / "tresnet_jax" / "jax_cache")
    jax.config.update("jax_compilation_cache_dir", location)
    # Cache every program that took a noticeable time to compile, of any size.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return location
