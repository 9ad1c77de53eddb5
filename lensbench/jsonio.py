"""Reading lensbench's JSON files strictly: a NaN or Infinity literal (which lensbench never writes; it
writes null for a missing value) is refused with the field that holds it, instead of flowing into
rankings and plans as a number."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class NonFinite(ValueError):
    """A NaN/Infinity literal at `field` (a JSON path such as scores.ablation_kl_block.values[3])."""

    def __init__(self, field: str, literal: str):
        super().__init__(f"{field} is {literal}")
        self.field, self.literal = field, literal


class _Marker:
    def __init__(self, literal: str):
        self.literal = literal


def loads(text: str) -> Any:
    """`json.loads`, raising NonFinite naming the first field that holds NaN, Infinity or -Infinity."""
    doc = json.loads(text, parse_constant=_Marker)
    hit = _find(doc, "")
    if hit is not None:
        raise NonFinite(*hit)
    return doc


def read(path: str | Path) -> Any:
    return loads(Path(path).read_text(encoding="utf-8"))


def read_document(path: Path, error: type[Exception], remake: str) -> Any:
    """A lensbench JSON file, or one line `error` naming what is wrong with it and `remake` (how to make it
    again): a NaN/Infinity literal (lensbench writes null for a missing value), or text that is not JSON."""
    try:
        return read(path)
    except NonFinite as exc:
        raise error(f"{path}: {exc.field} is {exc.literal}, which lensbench never writes (a missing value is "
                    f"null): the file was edited or made elsewhere; {remake}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not valid JSON ({exc}); it may be truncated: {remake}") from None


def _find(node: Any, where: str) -> tuple[str, str] | None:
    if isinstance(node, _Marker):
        return where or "the document", node.literal
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        hit = _find(child, f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}" if where else str(key))
        if hit is not None:
            return hit
    return None


def plain(value: Any) -> Any:
    """`value` as JSON values (numpy and torch scalars and arrays become floats, ints and lists), so a result
    is stored, sent and compared the same whichever process made it."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "tolist"):  # numpy and torch arrays and scalars
        return plain(value.tolist())
    return value
