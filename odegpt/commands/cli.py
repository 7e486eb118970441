"""The `odegpt` command: one entry point whose subcommands come from the installed packages.

Subcommands are registered through the ``odegpt.commands`` entry-point group (see
pyproject.toml), so this module knows nothing of the packages that provide them. Registering is
cheap for the parsers themselves, but importing anything under ``odegpt`` runs the package's
``__init__``, which registers the model with transformers' Auto classes and so imports torch and
transformers: `odegpt --help` takes a few seconds. DeepSpeed and the data pipeline are imported
only by the subcommand that runs.
"""
from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points


class CommandError(Exception):
    """Bad input to a subcommand: ``main`` prints ``odegpt COMMAND: message`` (one line, no traceback)
    and exits with 2. Raise it for anything the user can fix; let real bugs raise as they are."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except CommandError as error:
        print(f"odegpt {args.command}: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the file system said no (permissions, a full disk, ...): one line naming the path
        where = f": {error.filename}" if error.filename else ""
        print(f"odegpt {args.command}: {error.strerror or error}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
