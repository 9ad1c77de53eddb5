"""The command registry: each `lensbench` command is a function registered with its arguments.

    def _arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("model")

    @command("name", "one line of help", _arguments)
    def cmd_name(args) -> int: ...

A new command is a module of this package that registers its commands and is imported in `cli/__init__.py`.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    out_is_file: bool = False  # --out names a file (else a directory)


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None], *, out_is_file: bool = False):
    """Register `run(args) -> exit status` as the command `name`."""
    def deco(run):
        COMMANDS[name] = Command(name, help, arguments, run, out_is_file)
        return run
    return deco
