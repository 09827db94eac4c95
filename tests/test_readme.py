"""The README's commands: every ``deltatl`` line of its shell blocks parses with today's flags."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from deltatl.cli import build_parser

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_commands() -> list[str]:
    """The arguments of each ``deltatl`` command in the README's bash blocks (continuations joined,
    comments, an elided ``...``, ``&`` and ``; wait`` removed)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#")[0].split("; wait")[0].replace("...", " ").strip().removesuffix("&")
            found = re.match(r"^(?:\S*/)?deltatl\s+(.*)$", line) or re.match(r"^torchrun .* -m deltatl (.*)$", line)
            if found:
                commands.append(found.group(1))
    return commands


def test_the_readme_shows_commands():
    assert len(readme_commands()) >= 20


@pytest.mark.parametrize("command", readme_commands())
def test_a_readme_command_parses(command, capsys):
    try:
        build_parser().parse_args(shlex.split(command))
    except SystemExit:
        pytest.fail(f"`deltatl {command}`: {capsys.readouterr().err.strip().splitlines()[-1]}")
