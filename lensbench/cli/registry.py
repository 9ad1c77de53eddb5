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

from ..errors import LensbenchError
from ..executor import EXECUTORS, ExecutorConfig


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


def executor_arguments(p: argparse.ArgumentParser) -> None:
    """--executor, --workers and --ray-address, for the commands whose work spreads over workers."""
    p.add_argument("--executor", choices=EXECUTORS,
                   help="run the sweep's items here one by one (serial, the default), in local processes, or on Ray")
    p.add_argument("--workers", type=int, help="workers for --executor process|ray (default: one per CPU)")
    p.add_argument("--ray-address", metavar="HOST:PORT",
                   help="a running Ray cluster (implies --executor ray; default: start a local one on 127.0.0.1)")


def layer_arguments(p: argparse.ArgumentParser) -> None:
    """--layer-by-layer and --memory-cap, for the commands that run a model larger than memory."""
    p.add_argument("--layer-by-layer", action="store_true",
                   help="keep the weights in the model's safetensors files and read each module's in only while it "
                        "runs (models larger than memory; forward-only analyses and capture)")
    p.add_argument("--memory-cap", metavar="SIZE",
                   help="with --layer-by-layer: refuse before reading any weight when the run's estimated memory "
                        "exceeds SIZE, e.g. 2GiB or 500MB (default: the memory available now)")


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def memory_cap_of(args: argparse.Namespace) -> int | None:
    """--memory-cap in bytes (None: not given), checked."""
    if args.memory_cap is None:
        return None
    if not args.layer_by_layer:
        raise LensbenchError("--memory-cap applies to a --layer-by-layer run: add --layer-by-layer or drop it")
    text = args.memory_cap.strip().lower().replace(" ", "")
    number = text.rstrip("abcdefghijklmnopqrstuvwxyz")
    try:
        value = float(number) * _UNITS[text[len(number):]]
    except (ValueError, KeyError):
        value = -1.0
    if value <= 0:
        raise LensbenchError(f"--memory-cap {args.memory_cap!r} is not a size: give e.g. 2GiB, 500MB or 1e9")
    return int(value)


def executor_of(args: argparse.Namespace) -> ExecutorConfig:
    """The executor the flags ask for, checked (a Ray address is tried here, before any model loads)."""
    kind = args.executor or ("ray" if args.ray_address else "serial")
    if args.workers is not None and args.workers < 1:
        raise LensbenchError(f"--workers must be 1 or more, got {args.workers}")
    if args.workers is not None and kind == "serial":
        raise LensbenchError(f"--workers {args.workers} needs --executor process or ray (serial runs in this "
                             f"process): add --executor process")
    return ExecutorConfig(kind, args.workers, args.ray_address).check()
