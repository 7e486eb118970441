"""The `odegpt` command: one entry point whose subcommands come from the installed packages.

Subcommands are registered through the ``odegpt.commands`` entry-point group (see
pyproject.toml), so this module knows nothing of the packages that provide them. Registering imports
only the parsers (torch, transformers and DeepSpeed are imported by the subcommand that runs), so
`odegpt --help` is fast. SIGTERM ends a command as Ctrl-C does, through every ``finally`` on the way
out: a staged output folder is removed, never left half-written.

Every subcommand parses its options (odegpt.commands.options) and calls the library, which alone checks its
input: a ``ValueError`` it raises (``odegpt.errors.InputError`` and the like) is printed as one line,
``odegpt COMMAND: message``, with exit code 2; ``ODEGPT_TRACEBACK=1`` shows the traceback instead. A refusal of the
file system (permissions, a full disk) is one line naming the path, exit code 1.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from importlib.metadata import entry_points


class UsageError(ValueError):
    """A command line argparse cannot parse; its message is the whole line (``odegpt COMMAND: ...``)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors in odegpt's one error format: one line, exit code 2 (no usage dump; --help has it).
    Subcommands' parsers are of the same class."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="odegpt",
        description="Pretrain, export and run parameter-shared GPTs as ODE solvers.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for entry in sorted(entry_points(group="odegpt.commands"), key=lambda e: e.name):
        try:
            register = entry.load()
        except (ImportError, AttributeError) as error:  # a broken plugin must not hide the others
            print(f"odegpt: subcommand {entry.name!r} ({entry.value}) could not be loaded: {error}",
                  file=sys.stderr)
            continue
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as error:
        print(error, file=sys.stderr)
        return 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if threading.current_thread() is threading.main_thread():  # only the main thread may install handlers
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args.func(args) or 0)
    except ValueError as error:  # bad input, refused by the library (odegpt.errors): one line, no traceback
        if os.environ.get("ODEGPT_TRACEBACK"):
            raise
        print(f"odegpt {args.command}: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the file system said no (permissions, a full disk, ...): one line naming the path
        where = f": {error.filename}" if error.filename else ""
        print(f"odegpt {args.command}: {error.strerror or error}{where}", file=sys.stderr)
        return 1


def _terminate(signum, frame) -> None:
    """SIGTERM: leave as an exception does, so cleanup runs (a staged folder is removed), with the exit code a
    shell reports for a process that SIGTERM killed. Training installs handlers of its own (launcher.faults)."""
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
