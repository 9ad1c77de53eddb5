"""`profile_model`: stream texts through one capture per batch and fold every analyzer over it."""
from __future__ import annotations

import datetime
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from .version import __version__
from .analyzer import Scan, check_names, make, registered
from .executor import ExecutorConfig, run_items
from .replay import STATE_SITES, DenseRun
from .agreement import refresh
from .capture import CaptureSpec, capture_batch, batches
from .errors import LensbenchError
from .model import Model
from .offload import is_offloaded
from .units import templates_of
from .profiles import Profile
from . import checkpoint
from .bundled import NAMES

DEFAULT_ANALYSES = ("redundancy",)
DEFAULT_SEQ_LEN = 128


def resolve_seq_len(model: Model, requested: int | None) -> int:
    """The per-text token limit: `requested`, or 128 capped at the model's context."""
    ctx = model.max_context
    if requested is None:
        return min(DEFAULT_SEQ_LEN, ctx or DEFAULT_SEQ_LEN)
    if requested <= 0:
        raise LensbenchError(f"--seq-len must be positive, got {requested}")
    if ctx is not None and requested > ctx:
        raise LensbenchError(f"sequence length {requested} is longer than {model.name}'s context of {ctx} tokens; "
                             f"use --seq-len {ctx} or less")
    return requested


def _stream(model: Model, texts, analyzers, spec: CaptureSpec, batch_size: int, seq_len: int,
            progress: bool, resume: Path | None = None, every: float = 20.0) -> dict:
    """One capture per batch, folded into every analyzer; returns what was read. With `resume`, the
    analyzers' state is saved there at most every `every` seconds and a saved state of this same run is
    picked up, so a killed run continues after its last saved batch (see `checkpoint`)."""

    n_tokens, done = 0, 0
    per_batch = 1 + sum(a.steps_per_batch() for a in analyzers)  # the capture, then each scanned unit
    bar = tqdm(total=math.ceil(len(texts) / batch_size) * per_batch, desc=f"profiling {model.name}", unit="step",
               disable=not progress, file=sys.stderr, leave=False)
    base = [checkpoint.derived(a) for a in analyzers]
    key = checkpoint.run_key(model, texts, analyzers, batch_size, seq_len) if resume else ""
    if resume is not None:
        found = checkpoint.load(resume, key, analyzers)
        if found is not None:
            done, n_tokens = found
            bar.update(done * per_batch)
            print(f"lensbench: resuming after {done} finished batches ({resume.name})", file=sys.stderr)
    for a in analyzers:
        a.on_step_ = lambda: bar.update(1)
    last = time.monotonic()
    try:
        for index, batch in enumerate(batches(model, texts, batch_size, seq_len)):
            if index < done:
                continue
            trace, _ = capture_batch(model, spec, batch)
            bar.update(1)
            for a in analyzers:
                a.update(trace)
            n_tokens += batch.n_tokens
            if resume is not None and time.monotonic() - last >= every:
                state = checkpoint.snapshot(analyzers, base)
                if state is not None:
                    checkpoint.save(resume, key, index + 1, n_tokens, state)
                last = time.monotonic()
    finally:
        for a in analyzers:
            a.on_step_ = None
        bar.close()
    return {"n_texts": len(texts), "n_tokens": n_tokens, "seq_len": seq_len, "batch_size": batch_size}


@dataclass
class ScanWork:
    """What a worker does for the scans of a profile: items [batch, scan, item] of `Scan.items`, measured on
    the batch's dense run (captured once per batch and kept for the batch's next items)."""

    analyses: list[tuple[str, dict]]
    texts: list[str]
    batch_size: int
    seq_len: int

    def setup(self, model: Model) -> None:
        self.model_ = model
        self.scans_ = [make(name, **params) for name, params in self.analyses]
        for a in self.scans_:
            a.start(model)
        self.batches_ = list(batches(model, self.texts, self.batch_size, self.seq_len))
        self.spec_ = CaptureSpec(sites=STATE_SITES).validate(model)
        self.dense_ = (-1, None)

    def run(self, item: list) -> dict:
        b, k, what = item
        if self.dense_[0] != b:
            self.dense_ = (-1, None)  # the previous batch's states go before this batch's are made
            trace, _ = capture_batch(self.model_, self.spec_, self.batches_[b])
            self.dense_ = (b, DenseRun.from_trace(self.model_, trace))
        return self.scans_[k].measure(self.dense_[1], what)


def _sweep(model: Model, texts, scans: list[Scan], batch_size: int, seq_len: int, progress: bool,
           executor: ExecutorConfig, resume: Path | None) -> None:
    """The scans' items over every batch on `executor`, folded here in batch order (as `Scan.update` does)."""
    listed = list(batches(model, texts, batch_size, seq_len))
    per_batch = [[a.items(batch) for a in scans] for batch in listed]
    items = [[b, k, it] for b, lists in enumerate(per_batch) for k, its in enumerate(lists) for it in its]
    work = ScanWork([(a.name, a.params()) for a in scans], list(texts), batch_size, seq_len)
    key = checkpoint.run_key(model, texts, scans, batch_size, seq_len)
    with tqdm(total=len(items), desc=f"profiling {model.name} ({executor.kind})", unit="item",
              disable=not progress, file=sys.stderr, leave=False) as bar:
        results = run_items(work, model, items, executor, resume=resume, key=key, on_done=lambda *_: bar.update(1))
    at = 0
    for batch, lists in zip(listed, per_batch, strict=True):
        for a, its in zip(scans, lists, strict=True):
            for it in its:
                a.fold(it, results[at])
                at += 1
            a.end_batch(batch, its)


def check_layer_by_layer(names: Sequence[str]) -> None:
    """Refuse the analyses that read weights outside a forward pass, which a layer-by-layer model keeps on disk."""
    check_names(names)
    refused = [name for name in names if not registered()[name].layer_by_layer]
    if refused:
        ok = sorted(name for name, cls in registered().items() if cls.layer_by_layer)
        raise LensbenchError(f"analysis {', '.join(refused)} reads weights outside the forward pass, which a "
                             f"layer-by-layer model keeps on disk: drop --layer-by-layer, or use {', '.join(ok)}")


def model_card(model: Model) -> dict:
    """What a Profile records about its model (the fingerprint identifies it)."""
    return dict(model.card, fingerprint=model.fingerprint(), n_layers=model.n_layers, d_model=model.d_model,
                units=templates_of(model.adapter))


def profile_model(model: Model, texts: Sequence[str], *, analyses: Sequence[str] = DEFAULT_ANALYSES,
                  analysis_params: dict[str, dict] | None = None, batch_size: int = 8, seq_len: int | None = None,
                  data: dict | None = None, progress: bool = True, resume: str | Path | None = None,
                  resume_every: float = 20.0, executor: ExecutorConfig | None = None) -> Profile:
    """Profile `model` on `texts` with the named analyses (`lensbench.profile`; `profile_model` is the old name).

        >>> profile = lb.profile(model, texts, analyses=["redundancy"], progress=False)
        >>> "block_cosine" in profile.scores
        True

    Each text is truncated to `seq_len` tokens (default: 128, or the model's context if shorter). With
    `resume` (a file path), the running state is saved there as batches finish (at most every
    `resume_every` seconds) and a run killed part-way continues from it; remove the file once the profile is
    saved (the CLI does).

    With an `executor` other than serial, the scans (ablation, skip_effect, quant_sensitivity) run as work
    items on its workers and are folded here in the same order, so the profile equals the serial one; their
    finished items are kept beside `resume` (in RESUME-items/) so a killed run does only what is missing.
    """
    if isinstance(texts, str):  # one text, as capture() takes it; never one text per character
        texts = [texts]
    seq_len = resolve_seq_len(model, seq_len)
    params = analysis_params or {}
    if is_offloaded(model.module):
        check_layer_by_layer(analyses)
    analyzers = [make(name, **params.get(name, {})) for name in analyses]
    for a in analyzers:
        if a.needs_lm_head and not model.is_causal_lm:
            raise LensbenchError(f"analysis {a.name!r} needs a causal LM; {model.name} is an encoder")
        a.start(model)
    sites = tuple(dict.fromkeys(s for a in analyzers for s in a.sites))
    if sites and not texts:
        raise LensbenchError("no texts to profile on: give a non-empty text file")
    skipped = 0
    if sites:
        texts, skipped = scorable(model, texts)
        streamed = analyzers
        if executor is not None and executor.kind != "serial":
            scans = [a for a in analyzers if isinstance(a, Scan)]
            streamed = [a for a in analyzers if not isinstance(a, Scan)]
            if scans:
                _sweep(model, texts, scans, batch_size, seq_len, progress, executor,
                       Path(f"{resume}-items") if resume else None)
        if streamed:
            sites = tuple(dict.fromkeys(s for a in streamed for s in a.sites))
            read = _stream(model, texts, streamed, CaptureSpec(sites=sites).validate(model), batch_size, seq_len,
                           progress, Path(resume) if resume else None, resume_every)
        else:
            read = {"n_texts": len(texts), "n_tokens": sum(b.n_tokens for b in batches(model, texts, batch_size,
                                                                                     seq_len)),
                    "seq_len": seq_len, "batch_size": batch_size}
        data = {**(data or {}), **read}
        if skipped:
            data["skipped_too_short"] = skipped
    else:  # weight-only analyses: no forward pass, and no text to describe
        data = {}
    profile = Profile(
        model=model_card(model),
        data=data,
        meta={"lensbench": __version__, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "analyses": {a.name: a.params() for a in analyzers}},
    )
    for a in analyzers:
        profile.add(*a.finish())
    refresh(profile)
    return profile


def scorable(model: Model, texts: Sequence[str]) -> tuple[list[str], int]:
    """(texts with at least two content tokens, how many were left out). A causal model's statistics skip
    the first token (the attention sink) and a next-token score needs a second one, so a shorter text adds
    nothing; it is skipped with a count on stderr rather than ending the run."""

    enc = model.tokenizer(list(texts), add_special_tokens=True, return_special_tokens_mask=True)
    keep = [t for t, m in zip(texts, enc["special_tokens_mask"], strict=True) if len(m) - sum(m) >= 2]
    skipped = len(texts) - len(keep)
    if not keep:
        raise LensbenchError(f"none of the {len(texts)} texts has two or more tokens to score: give longer texts "
                             f"(a sentence or more each)")
    if skipped:
        print(f"lensbench: skipped {skipped} of {len(texts)} texts with fewer than two tokens to score",
              file=sys.stderr)
    return keep, skipped


def model_source(card: dict) -> str:
    """Where a profile's model can be loaded from again: its bundled name, local path or hub name."""

    if card.get("name") in NAMES:
        return card["name"]
    source = str(card.get("source", ""))
    if source.startswith("hf://"):
        return source[len("hf://"):]
    if source and source != "module":
        return source
    raise LensbenchError(f"the profile does not say where {card.get('name')!r} was loaded from: pass --model")
