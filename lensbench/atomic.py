"""Atomic file writes: a reader sees the old file or the new one, never half of either."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator
import shutil


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=False, allow_nan=False) + "\n")


def tidy_beside(out: Path) -> None:
    """Undo what a killed `staging_dir`/`publish_dir` run left beside folder `out`: a previous folder moved
    aside goes back when nothing took its place, and staging folders are removed."""

    if not out.parent.is_dir():
        return
    olds = sorted(out.parent.glob(f".{out.name}.old-*"))
    if olds and not out.exists():
        os.replace(olds.pop(), out)
    for left in olds + sorted(out.parent.glob(f".{out.name}.partial-*")):
        shutil.rmtree(left, ignore_errors=True)


def staging_dir(out: Path) -> Path:
    """A fresh hidden sibling of folder `out` to build its new contents in (after `tidy_beside`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tidy_beside(out)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    staging.mkdir()
    return staging


def publish_dir(staging: Path, out: Path) -> None:
    """Put the staged folder at `out` with two renames; the old folder is removed only after the new one is in
    place (a kill between the renames is undone by the next `staging_dir`)."""

    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(staging, out)
    shutil.rmtree(old, ignore_errors=True)


def write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Call `writer(tmp_path)` and move the result into place atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)
