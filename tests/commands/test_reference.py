"""docs/commands.md is what the parsers generate, and every command line in README.md and docs/ parses."""
from __future__ import annotations

import argparse
import functools
import re
import shlex
from pathlib import Path

import pytest

from odegpt.commands.cli import UsageError
from odegpt.commands.reference import commands, reference

parsers_by_name = functools.cache(commands)  # building every parser once, not once per documented line

REPO = Path(__file__).resolve().parents[2]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_docs_commands_md_is_what_the_parsers_generate():
    assert (REPO / "docs" / "commands.md").read_text() == reference(), \
        "docs/commands.md is out of date: python -m odegpt.commands.reference > docs/commands.md"


def _words(line: str) -> list[str]:
    """A shell line's words up to its first pipe, redirection or comment (``printf ... | odegpt ...`` keeps the
    command after the pipe)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    words: list[str] = []
    for word in lexer:
        if word in ("|", "||", "&&", ";"):
            words = []
        elif word[0] in "|&;<>()":
            break
        else:
            words.append(word)
    return words


def _command(words: list[str]) -> list[str] | None:
    """``[program, *arguments]`` for a line that runs odegpt or the quickstart, else None."""
    for start, word in enumerate(words):
        if word in ("odegpt", ".venv/bin/odegpt"):
            return ["odegpt", *words[start + 1:]]
        if word == "-m" and words[start + 1:start + 2] == ["launcher.quickstart"]:
            return ["python -m launcher.quickstart", *words[start + 2:]]
    return None


def command_lines() -> list[tuple[str, list[str]]]:
    """Every command line in a ```bash block of README.md and docs/*.md (continuation lines joined)."""
    found = []
    for path in DOCS:
        for block in re.findall(r"^```bash\n(.*?)^```", path.read_text(), flags=re.S | re.M):
            for number, line in enumerate(block.replace("\\\n", " ").splitlines()):
                command = _command(_words(line))
                if command:
                    found.append((f"{path.relative_to(REPO)}: {line.strip()}", command))
    return found


def inline_commands() -> list[tuple[str, list[str]]]:
    """Inline code that names an odegpt command and its flags: `odegpt evaluate --target-compute F`."""
    found = []
    for path in DOCS:
        for span in re.findall(r"`(odegpt [a-z]+(?: [^`]*)?)`", path.read_text()):
            found.append((f"{path.relative_to(REPO)}: {span}", span.split()))
    return found


def test_the_docs_hold_command_lines_to_check():
    lines = [where for where, _ in command_lines()]
    assert len(lines) > 30 and any("README.md" in line for line in lines)


@pytest.mark.parametrize("where, command", command_lines(), ids=lambda value: "" if isinstance(value, list) else value)
def test_every_documented_command_line_parses(where, command):
    parsers = parsers_by_name()
    program, *arguments = command
    if program == "odegpt":
        name = f"odegpt {arguments[0]}"
        assert name in parsers, f"{where}: no command {name!r}"
        program, arguments = name, arguments[1:]
    try:
        parsers[program].parse_args(arguments)
    except (UsageError, SystemExit) as error:  # argparse's own parsers exit on an error
        pytest.fail(f"{where}: {error}")


@pytest.mark.parametrize("where, words", inline_commands(), ids=lambda value: "" if isinstance(value, list) else value)
def test_every_flag_named_beside_a_command_exists(where, words):
    parsers = parsers_by_name()
    name = f"odegpt {words[1]}"
    assert name in parsers, f"{where}: no command {name!r}"
    options = {flag for action in parsers[name]._actions if action.help != argparse.SUPPRESS
               for flag in action.option_strings}
    unknown = [word for word in words[2:] if word.startswith("--") and word.split("=")[0] not in options]
    assert not unknown, f"{where}: {name} has no option {', '.join(unknown)}"
