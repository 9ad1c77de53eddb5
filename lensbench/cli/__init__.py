"""`lensbench` command line. `main(argv)` runs in-process (tests call it directly).

The commands are registered by the modules of this package (`registry.command`): `analysis` (profile, models,
summary, capture, channels, laundry, concept-depth, relevance), `decisions` (plan, evaluate, compress, export)
and `faces` (demo, app, report). Bad input ends with one line on stderr naming the problem and the fix, and
exit status 2.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Sequence

from ..errors import LensbenchError
from . import analysis, decisions, faces  # noqa: F401  (each module registers its commands)
from .registry import COMMANDS, executor_of, memory_cap_of


def _quiet() -> None:
    """Keep third-party chatter (HF progress bars, advisory warnings) off the user's terminal."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # per-task advisory warnings, on every run
    try:
        from transformers.utils import logging as hf_logging  # heavy: only once a command runs

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lensbench", description="What every layer does, and which layers matter.")
    sub = p.add_subparsers(dest="command", required=True)
    for cmd in COMMANDS.values():
        cmd.arguments(sub.add_parser(cmd.name, help=cmd.help))
    return p


# Smallest value each numeric option takes (checked before any model is loaded).
MINIMUM = {"batch_size": 1, "n_texts": 1, "seq_len": 1, "max_tokens": 1, "speed_rounds": 1, "decode_tokens": 1,
           "folds": 2, "n_per_class": 1, "count": 1, "edit_n": 2, "cities": 0, "topics": 0, "interventions": 0,
           "generations": 1, "offspring": 1, "gptq_texts": 1, "group_size": 1, "lm_eval_limit": 1, "resolution": 1,
           "context": 1}


def check_args(args) -> None:
    """Numeric ranges, the port and the kind of --out, before any work."""
    for name, least in MINIMUM.items():
        value = getattr(args, name, None)
        if value is not None and value < least:
            raise LensbenchError(f"--{name.replace('_', '-')} must be at least {least}, got {value}")
    if getattr(args, "encoding", None) and not getattr(args, "texts", None):
        raise LensbenchError("--encoding applies to the file given with --texts: give --texts FILE, or drop --encoding")
    if hasattr(args, "executor"):
        args.executor_config = executor_of(args)
    if hasattr(args, "layer_by_layer"):
        args.memory_cap_bytes = memory_cap_of(args)
        if args.layer_by_layer and getattr(args, "executor_config", None) and args.executor_config.kind != "serial":
            raise LensbenchError("--layer-by-layer runs in this process (its weights stay in their files): drop "
                                 "--executor, or drop --layer-by-layer to run on workers")
    port = getattr(args, "port", None)
    if port is not None and not 1 <= port <= 65535:
        raise LensbenchError(f"--port must be between 1 and 65535, got {port}")
    out = getattr(args, "out", None)
    if out is None:
        return
    out = Path(out)
    if COMMANDS[args.command].out_is_file and out.is_dir():
        raise LensbenchError(f"--out {out} is a directory; give a file name, e.g. {out / 'out.json'}")
    if not COMMANDS[args.command].out_is_file and out.exists() and not out.is_dir():
        raise LensbenchError(f"--out {out} is a file; give a directory (it is created if missing)")
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())  # where the first write lands
    if existing == out and COMMANDS[args.command].out_is_file:  # a file written again: it is replaced in its folder
        existing = out.absolute().parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise LensbenchError(f"--out {out} cannot be written ({existing} is not a writable folder): choose another "
                             f"place")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet()
    try:
        check_args(args)
        return COMMANDS[args.command].run(args)
    except LensbenchError as exc:
        print(f"lensbench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lensbench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
