"""What every command line of shardllama shares: ``--version``, ``-v``/``-vv``/``--log-level``, and the logging
they set up.

Used by ``shardllama`` and each of its subcommands (:mod:`.flags`) and by the worker (``shardllama worker``,
``python -m workers``), which sets up its own logging in its own process.  The level goes to the
``shardllama`` logger (and ``workers``), not the root logger, so that ``-vv`` does not turn on the debug output of
every library underneath (asyncio, aiohttp, torch); a coordinator hands its level on to the workers it starts
(``launch._worker_argv``).
"""

from __future__ import annotations

import argparse
import logging
import sys

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOGGERS = ("shardllama", "workers")  # the packages' own loggers (workers log as shardllama.worker too)


def version() -> str:
    """The installed distribution's version (package metadata), else the package's ``__version__``."""
    from importlib import metadata

    try:
        return metadata.version("shardllama")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        import shardllama

        return getattr(shardllama, "__version__", "unknown")


class _VersionAction(argparse.Action):
    """``--version``: print ``shardllama X.Y.Z`` and exit 0 (the metadata is read only when asked)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0,
                         help=help or "print shardllama's version and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"shardllama {version()}")
        parser.exit(0)


def _level(text: str) -> int:
    if text.isdigit():  # a coordinator embedded by a program that logs at a level of its own (e.g. 5)
        return int(text)
    name = text.upper()
    if name not in LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(LEVELS)} (any case)")
    return getattr(logging, name)


_level.__name__ = "log level"


def add_version(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", action=_VersionAction)


def add_common(parser: argparse.ArgumentParser, verbose_into=None, verbose_help: str | None = None) -> None:
    """``--version``, ``-v``/``-vv`` and ``--log-level`` on ``parser``; ``verbose_into``: the group (e.g. one
    exclusive with ``-q``) that ``-v`` goes into instead."""
    add_version(parser)
    (verbose_into or parser).add_argument(
        "-v", "--verbose", action="count", default=0,
        help=verbose_help or "log more: -v what happens (info), -vv everything (debug)")
    parser.add_argument("--log-level", type=_level, metavar="LEVEL",
                        help=f"log at this level ({', '.join(LEVELS)}; any case); overrides -v (default WARNING)")


def log_level(ns: argparse.Namespace) -> int:
    """The level that ``--log-level`` or ``-v`` (INFO) / ``-vv`` (DEBUG) asks for; WARNING by default."""
    if getattr(ns, "log_level", None) is not None:
        return ns.log_level
    return max(logging.DEBUG, logging.WARNING - 10 * (getattr(ns, "verbose", 0) or 0))


def setup_logging(level: int, fmt: str) -> None:
    """One handler on stderr for everything at WARNING and above, and ``level`` for shardllama's own loggers."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.WARNING, format=fmt, stream=sys.stderr)
    for name in LOGGERS:
        logging.getLogger(name).setLevel(level)
